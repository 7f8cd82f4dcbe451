"""The `diffstyler` command: one LightningCLI whose subcommands share trainer, logger and seed settings.

    diffstyler fit --config configs/style.yaml          # learn a style LoRA
    diffstyler fit --config configs/style.yaml --print_config > my.yaml
    diffstyler fit --config my.yaml --model.lora.rank 8
    diffstyler predict --config configs/stylize.yaml       # stylize content images

Each subcommand has its own LightningModule and DataModule, listed in `MODES`; `main` picks the
pair from the subcommand before building the parser. The resolved config of a run is saved as
`config.yaml` next to its TensorBoard logs.

Order of work (LightningCLI in lightning 2.6): parse → seed → instantiate data and model →
Trainer → `trainer.fit`. The data module reads its images when instantiated, and the model loads
its weights only in `configure_model` inside `fit`, so a bad input path fails before any load.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import ArgsType, LightningCLI

from diffstyler.data import StyleDataModule, StylizeDataModule
from diffstyler.images import ImageLoadError
from diffstyler.masks import MaskError
from diffstyler.models import ModelLoadError
from diffstyler.predictor import StylizePredictor
from diffstyler.training import StyleLoRAModule

# subcommand -> (LightningModule class, LightningDataModule class). The only place to add one.
MODES: dict[str, tuple[type[LightningModule], type[LightningDataModule]]] = {
    "fit": (StyleLoRAModule, StyleDataModule),
    "predict": (StylizePredictor, StylizeDataModule),
}
DEFAULT_MODE = "fit"
LOG_DIR = "outputs/logs"
DESCRIPTION = "DiffStyler: learn style LoRAs on Stable Diffusion 2.1-base and stylize image regions with them."
# Errors about the user's inputs: shown as one message instead of a traceback.
INPUT_ERRORS = (FileNotFoundError, ImageLoadError, ModelLoadError, MaskError)


class DiffStylerCLI(LightningCLI):
    """LightningCLI with the subcommands of `MODES` and the project's shared defaults:
    a TensorBoardLogger under `outputs/logs/<subcommand>`, `seed_everything` 0, the resolved config
    saved (overwriting) next to the logs, and each module's own optimizer (no `--optimizer`)."""

    def __init__(
        self,
        model_class: type[LightningModule],
        datamodule_class: type[LightningDataModule],
        subcommand: str = DEFAULT_MODE,
        args: ArgsType = None,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("trainer_defaults", shared_trainer_defaults(subcommand))
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("auto_configure_optimizers", False)
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION})
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning_subcommands = LightningCLI.subcommands()
        return {name: lightning_subcommands[name] for name in MODES}


def shared_trainer_defaults(subcommand: str) -> dict[str, Any]:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": LOG_DIR, "name": subcommand},
        }
    }


def find_subcommand(args: list[str]) -> str:
    """The first argument naming a subcommand; `fit` when there is none (e.g. plain `--help`)."""
    return next((arg for arg in args if arg in MODES), DEFAULT_MODE)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the `diffstyler` console script (returns None: its value becomes the exit code)."""
    subcommand = find_subcommand(sys.argv[1:] if args is None else list(args))
    model_class, datamodule_class = MODES[subcommand]
    try:
        DiffStylerCLI(model_class, datamodule_class, subcommand=subcommand, args=args)
    except INPUT_ERRORS as error:
        sys.exit(f"diffstyler {subcommand}: error: {error}")


if __name__ == "__main__":
    main()
