"""The `diffstyler` command: one LightningCLI whose subcommands share trainer, logger and seed settings.

    diffstyler fit --config configs/style.yaml          # learn a style LoRA
    diffstyler fit --config configs/style.yaml --print_config > my.yaml
    diffstyler fit --config my.yaml --model.lora.rank 8
    diffstyler predict --config configs/stylize.yaml       # stylize content images
    diffstyler fit --config configs/style.yaml --data.images '[styles/]' --data.one_lora_per_image true
    diffstyler test --config configs/protocols/styleid.yaml  # a protocol file: one section per subcommand

Each subcommand has its own LightningModule and DataModule, listed in `MODES`; `main` picks the
pair from the subcommand before building the parser, and hands the subcommand only its section
of a protocol file (`protocol_stage`). The resolved config of a run is saved as
`config.yaml` next to its TensorBoard logs.

Order of work (LightningCLI in lightning 2.6): parse → check → seed → instantiate data and model →
Trainer → `trainer.fit`. The checks (`check_inputs`: every config dataclass built once so a bad
value is reported with its key, the `fit --ckpt_path` checkpoint read weights-only) and the data
module (which reads its images) run before the model loads its weights in `configure_model`, so
a bad input fails in seconds.

Errors in the user's input or environment (`USER_ERRORS`) are printed as one line,
`diffstyler <subcommand>: error: <what> (<file or key>): <why>`, with exit status 2 (as argparse
uses for a bad command line); `--debug` or DIFFSTYLER_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import os
import re
import sys
import typing
from typing import Any, Optional

from pathlib import Path

import yaml
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from diffstyler.callbacks import first_failure
from diffstyler.callbacks.first_failure import (
    AnotherRankFailed,
    ReportFirstFailure,
    failure_of_another_rank,
    wait_for_launcher_exit,
)
from diffstyler.callbacks.progress import JobProgressBar
from diffstyler.checks import check_checkpoint_file
from diffstyler.data import StyleDataModule, StylizeDataModule
from diffstyler.errors import UserError, config_error, first_line
from diffstyler.images import ImageLoadError
from diffstyler.lora_per_image import ImageLoRA, already_trained, expected_record, image_loras
from diffstyler.masks import MaskError
from diffstyler.models import ModelLoadError
from diffstyler.evaluation.data import EvaluationDataModule
from diffstyler.evaluation.evaluator import QualityEvaluator
from diffstyler.evaluation.report import METRICS_NAME
from diffstyler.predictor import StylizePredictor
from diffstyler.results import DONE, FAILED, RESULTS_NAME, SKIPPED
from diffstyler.training import StyleLoRAModule

# subcommand -> (LightningModule class, LightningDataModule class). The only place to add one.
MODES: dict[str, tuple[type[LightningModule], type[LightningDataModule]]] = {
    "fit": (StyleLoRAModule, StyleDataModule),
    "predict": (StylizePredictor, StylizeDataModule),
    "test": (QualityEvaluator, EvaluationDataModule),
}
DEFAULT_MODE = "fit"
LOG_DIR = "outputs/logs"
DESCRIPTION = "DiffStyler: learn style LoRAs on Stable Diffusion 2.1-base and stylize image regions with them."
# Errors about the user's inputs: shown as one line instead of a traceback. ImageLoadError,
# MaskError and ModelLoadError predate UserError; ArgumentError is jsonargparse's (exit_on_error off).
USER_ERRORS = (UserError, FileNotFoundError, ImageLoadError, MaskError, ModelLoadError, ArgumentError)
USER_ERROR_STATUS = 2
JOBS_FAILED_STATUS = 1  # some jobs of a predict run failed (each recorded in results.jsonl); the rest are done
MAX_FAILURES_SHOWN = 20
DEBUG_FLAG = "--debug"
DEBUG_VARIABLE = "DIFFSTYLER_DEBUG"
# Lightning's own names for a checkpoint it finds itself (`--ckpt_path last`); no file to check.
SPECIAL_CHECKPOINTS = ("last", "hpc", "registry")
MODEL_HINT = "set model.model.name to a hub id, a local diffusers folder, a .safetensors/.ckpt file or 'tiny'"


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
        # exit_on_error off: jsonargparse raises ArgumentError, which `main` prints as one line.
        kwargs.setdefault("parser_kwargs", {"description": DESCRIPTION, "exit_on_error": False})
        super().__init__(model_class, datamodule_class, args=args, **kwargs)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        subcommand = self.subcommand
        trainer.callbacks.append(ReportFirstFailure(lambda error, rank: failure_line(subcommand, error, rank)))
        if subcommand == "predict":
            count_jobs_in_progress_bar(trainer)
        return trainer

    def fit(self, **kwargs: Any) -> None:
        """`trainer.fit`; with `data.one_lora_per_image`, one fresh fit per style image."""
        if getattr(self.datamodule, "one_lora_per_image", False):
            fit_one_lora_per_image(self, kwargs.get("ckpt_path"))
        else:
            self.trainer.fit(**kwargs)

    def predict(self, **kwargs: Any) -> None:
        """`trainer.predict`, keeping no per-job results in memory unless `--return_predictions true`:
        they are in results.jsonl, and a 100k-job run would hold them all until the end."""
        if kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)

    def after_predict(self) -> None:
        """The run's summary on rank zero; exit status 1 when a job failed (the others are done)."""
        writer = self.model.writer
        summary = writer.summary
        if not summary:
            return
        folder = writer.folder
        if self.trainer.is_global_zero:
            for line in writer.failures[:MAX_FAILURES_SHOWN]:
                print(f"diffstyler predict: job failed: {line}", file=sys.stderr)
            print(summary_line(summary, folder / RESULTS_NAME), file=sys.stderr)
        if summary[FAILED]:
            sys.exit(JOBS_FAILED_STATUS)

    def after_test(self) -> None:
        """The scores on rank zero: how many results were scored, and the metrics."""
        scores = getattr(self.model, "scores", None)
        if not scores or not self.trainer.is_global_zero:
            return
        for name, entry in (scores.get("runs") or {"": scores}).items():
            label = f" {name}:" if name else ""
            print(f"diffstyler test:{label} scored {entry['count']} of {entry['listed']} results: LPIPS {entry['lpips']:.4f}, "
                  f"FID {entry['fid']:.2f}, ArtFID {entry['artfid']:.2f}, CFSD {entry['cfsd']:.4f}", file=sys.stderr)
        print(f"diffstyler test: reports in {Path(self.model.output) / METRICS_NAME} (and the CSV and PNG beside it)", file=sys.stderr)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        # Runs before LightningCLI reads the checkpoint's hyper-parameters and instantiates anything.
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand is not None:
            check_inputs(self.config[subcommand], *MODES[subcommand])

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        lightning_subcommands = LightningCLI.subcommands()
        return {name: lightning_subcommands[name] for name in MODES}


# --- fit over a folder: one LoRA per style image ----------------------------------------------

def fit_one_lora_per_image(cli: DiffStylerCLI, ckpt_path: Optional[str]) -> None:
    """Train this process's style images one LoRA each (see `diffstyler.lora_per_image`): for
    each image not trained yet, the fit config with `data.images` that one image and
    `model.output_dir` its folder is instantiated again (data module, model, trainer, callbacks,
    logger: nothing carries over from the previous image) and fitted.

    Every image's LoRA folder is checked before the first training starts, so a rerun with other
    settings is refused before it spends any time.
    """
    data, model, trainer = cli.datamodule, cli.model, cli.trainer
    if ckpt_path:
        raise config_error("ckpt_path", "not with data.one_lora_per_image: a rerun resumes by skipping the LoRAs already trained")
    if trainer.world_size > 1:
        raise config_error("trainer.devices", f"data.one_lora_per_image trains each LoRA in one process, got {trainer.world_size} "
                           "processes; use trainer.devices 1 and share the images with data.num_processes and data.process_index")
    loras = image_loras(data.images, data.sha256, model.output_dir)
    expected = expected_record(model.recipe(), planned_steps(trainer), data.prompt, data.resolution)
    todo = [lora for lora in loras if not already_trained(lora, expected)]
    share = f" (process {data.process_index} of {data.num_processes})" if data.num_processes > 1 else ""
    print(f"diffstyler fit: {len(loras)} style images{share}: {len(loras) - len(todo)} already trained, "
          f"{len(todo)} to train, one LoRA each in {model.output_dir}/<image stem>", file=sys.stderr)
    whole_config = cli.config
    for number, lora in enumerate(todo, start=1):
        print(f"diffstyler fit: [{number}/{len(todo)}] {lora.image} -> {lora.folder}", file=sys.stderr)
        cli.config = config_for_image(whole_config, cli.subcommand, lora)  # also what SaveConfigCallback saves
        # The LoRA's initial weights come from the global RNG: seeded again, each image starts as
        # it would in a fit of its own, wherever it is in the list.
        seed = cli.config[cli.subcommand].get("seed_everything")
        if seed is not False and seed is not None:
            seed_everything(seed, workers=True, verbose=False)
        cli.instantiate_classes()  # LightningCLI's own: data module, model and trainer from cli.config
        gc.collect()  # the previous image's model (trainer and module refer to each other) before this one loads
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.config = whole_config
    if todo:
        print(f"diffstyler fit: {len(todo)} LoRA{'' if len(todo) == 1 else 's'} trained, "
              f"{len(loras) - len(todo)} already there; in {model.output_dir}", file=sys.stderr)


def planned_steps(trainer: Trainer) -> int:
    """The optimizer steps each LoRA gets: one batch per epoch (`data.style`), so the smaller of
    max_steps and max_epochs."""
    limits = [limit for limit in (trainer.max_steps, trainer.max_epochs) if limit is not None and limit > 0]
    if not limits:
        raise config_error("trainer.max_steps", "data.one_lora_per_image needs a number of steps (trainer.max_steps)")
    return min(limits)


def config_for_image(config: Namespace, subcommand: str, lora: ImageLoRA) -> Namespace:
    """The fit config of one style image: its image, its output folder, its own logger folder."""
    config = copy.deepcopy(config)
    section = config[subcommand]
    section.data.images = [lora.image]
    section.data.one_lora_per_image = False
    section.data.process_index, section.data.num_processes = 0, 1
    section.model.output_dir = str(lora.folder)
    logger = section.trainer.get("logger")
    # A logger folder per image, so that checkpoints of two images never share a folder.
    if isinstance(logger, Namespace) and isinstance(logger.get("init_args"), Namespace) and "name" in logger.init_args:
        logger.init_args.name = f"{logger.init_args.name or 'lightning_logs'}/{lora.name}"
    return config


# --- defaults and progress -------------------------------------------------------------------

def count_jobs_in_progress_bar(trainer: Trainer) -> None:
    """Lightning's own progress bar (tqdm, or rich where it is installed), if the trainer has one,
    replaced by one that counts jobs; a progress bar the user configured is kept."""
    for index, callback in enumerate(trainer.callbacks):
        if type(callback) in (TQDMProgressBar, RichProgressBar):
            trainer.callbacks[index] = JobProgressBar()


def summary_line(summary: dict[str, int], results: Path) -> str:
    total = sum(summary.values())
    return (f"diffstyler predict: {total} job{'' if total == 1 else 's'}: {summary[DONE]} done, "
            f"{summary[SKIPPED]} already done (skipped), {summary[FAILED]} failed; results in {results}")


# Trainer defaults that make a run without --config follow the paper (section IV): 200 LoRA steps.
# Without max_steps Lightning would fall back to max_epochs=1000, and an epoch is one step here.
PAPER_TRAINER_DEFAULTS: dict[str, dict[str, Any]] = {"fit": {"max_steps": 200}, "predict": {}, "test": {}}


def shared_trainer_defaults(subcommand: str) -> dict[str, Any]:
    return {
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": LOG_DIR, "name": subcommand},
        },
        **PAPER_TRAINER_DEFAULTS[subcommand],
    }


def find_subcommand(args: list[str]) -> str:
    """The first argument naming a subcommand; `fit` when there is none (e.g. plain `--help`)."""
    return next((arg for arg in args if arg in MODES), DEFAULT_MODE)


# --- checks before anything is instantiated ---------------------------------------------------

def check_inputs(config: Namespace, model_class: type, datamodule_class: type) -> None:
    """Everything about the subcommand's config that needs no model (raises UserError)."""
    for group, component in (("model", model_class), ("data", datamodule_class)):
        check_dataclass_values(config.get(group), component, group)
    checkpoint = config.get("ckpt_path")
    if checkpoint and checkpoint not in SPECIAL_CHECKPOINTS:
        check_checkpoint_file(checkpoint, "ckpt_path")
        # Lightning would load it with torch's default; weights only, whatever --weights_only says.
        config.weights_only = True


def check_dataclass_values(values: Optional[Namespace], component: type, group: str) -> None:
    """Build every dataclass argument of `component` from `values` once, naming the key that fails.

    jsonargparse builds them too, but its message for a dataclass inside Optional or a list (e.g.
    `data.styles[0].mask`) is a multi-line union report that does not say which key failed.
    """
    if values is None:
        return
    hints = typing.get_type_hints(component.__init__)
    for name, hint in hints.items():
        if name != "return" and name in values:
            build_value(values[name], hint, f"{group}.{name}")


def build_value(value: Any, hint: Any, key: str) -> Any:
    """`value` (as parsed) built into `hint`'s dataclasses, nested through Optional, Union and lists."""
    if value is None:
        return None
    if dataclasses.is_dataclass(hint) and isinstance(value, (Namespace, dict)):
        return build_dataclass(value, hint, key)
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (list, tuple) and arguments and isinstance(value, (list, tuple)):
        items = [build_value(item, arguments[0], f"{key}[{index}]") for index, item in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is typing.Union:
        dataclass_options = [option for option in arguments if dataclasses.is_dataclass(option)]
        if len(dataclass_options) == 1:
            return build_value(value, dataclass_options[0], key)
        given = [option for option in arguments if option is not type(None)]
        if len(given) == 1:  # Optional[list[...]]
            return build_value(value, given[0], key)
    return value


def build_dataclass(value: Namespace | dict, cls: type, key: str) -> Any:
    items = dict(value.items(branches=True, nested=False)) if isinstance(value, Namespace) else dict(value)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    arguments = {name: build_value(item, hints.get(name), f"{key}.{name}") for name, item in items.items() if name in fields}
    try:
        return cls(**arguments)
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise config_error(key, first_line(error)) from error


# --- reporting --------------------------------------------------------------------------------

def user_error_line(error: BaseException) -> str:
    """What `main` prints after `diffstyler <subcommand>: error: `."""
    if isinstance(error, UserError):
        return first_line(error.line())
    if isinstance(error, ArgumentError):
        return argument_error_line(str(error))
    if isinstance(error, ModelLoadError):
        return f"{first_line(error)} ({MODEL_HINT}; --debug for the full message)"
    return first_line(error)


def argument_error_line(message: str) -> str:
    """jsonargparse's 'Parser key "a.b":\n  reason' as `invalid config value (a.b): reason`."""
    found = re.match(r'\s*Parser key "([^"]+)":\s*(.*)', message, re.DOTALL)
    if found is None:
        return first_line(message)
    reasons = [line.strip(" -") for line in found.group(2).splitlines() if line.strip(" -")]
    return config_error(found.group(1), "; ".join(reasons)).line()


def split_debug_flag(args: list[str]) -> tuple[bool, list[str]]:
    """(debug?, args without --debug): the flag is ours, LightningCLI must not see it."""
    debug = DEBUG_FLAG in args or os.environ.get(DEBUG_VARIABLE, "") not in ("", "0")
    return debug, [arg for arg in args if arg != DEBUG_FLAG]


def failure_line(subcommand: str, error: BaseException, rank: Optional[int]) -> tuple[str, int]:
    """The line and exit status for `error`; user errors are one line, others point at their traceback."""
    place = f"[rank {rank}] " if rank is not None else ""
    if isinstance(error, USER_ERRORS):
        return f"diffstyler {subcommand}: error: {place}{user_error_line(error)}", USER_ERROR_STATUS
    return f"diffstyler {subcommand}: error: {place}{type(error).__name__}: {first_line(error)} (traceback above)", 1


def interrupted_by_another_rank(error: BaseException) -> bool:
    """Whether `AnotherRankFailed` (raised by the signal another rank sends) is in the error's chain:
    it can strike inside a file read, whose handler then reports it as a broken file."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, AnotherRankFailed):
            return True
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return False


def exit_for(subcommand: str, error: BaseException) -> None:
    """Print the one line for a user error and exit; in a multi-process run, show the first failing
    rank's error in place of a broken connection. Returns (the caller re-raises) for anything else."""
    current_run = first_failure.current_run  # set by ReportFirstFailure in a multi-process run
    rank = current_run.rank if current_run is not None else None
    earlier = failure_of_another_rank(current_run) if current_run is not None else None
    if earlier is not None and (not isinstance(error, USER_ERRORS) or interrupted_by_another_rank(error)):
        if rank == 0:
            print(earlier["line"], file=sys.stderr)
        sys.exit(earlier["status"])
    if isinstance(error, USER_ERRORS):
        print(failure_line(subcommand, error, rank)[0], file=sys.stderr)
        if current_run is not None and not current_run.is_launcher:
            wait_for_launcher_exit(current_run)
        sys.exit(USER_ERROR_STATUS)


# --- protocol files (a section per subcommand) and the entry point ----------------------------

def protocol_stage(args: list[str], subcommand: str) -> list[str]:
    """Each `--config FILE` where FILE holds a section per subcommand (a protocol such as
    configs/protocols/styleid.yaml) replaced by `--config <FILE's section>` right after the
    subcommand: `diffstyler fit --config P` and `diffstyler --config P fit` both run P's fit.

    LightningCLI builds one module pair for all its subcommands, so it would check every section
    of such a file against this subcommand's classes and refuse the other stages' keys. The
    section goes inline as YAML (jsonargparse reads a config string as a file). The ranks that
    DDP starts run `main` on the original command line, and so pick the same section.
    """
    if subcommand not in args:
        return args
    kept, stages = [], []
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--config" and index + 1 < len(args):
            file, width = args[index + 1], 2
        elif arg.startswith("--config="):
            file, width = arg.split("=", 1)[1], 1
        else:
            kept.append(arg)
            index += 1
            continue
        section = protocol_section(file, subcommand)
        if section is None:
            kept += args[index : index + width]
        else:
            stages += ["--config", section]
        index += width
    position = kept.index(subcommand) + 1
    return kept[:position] + stages + kept[position:]


def protocol_section(file: str, subcommand: str) -> Optional[str]:
    """The subcommand's section of `file` as YAML when the file is a protocol (a subcommand's name
    among its top-level keys), else None (a plain config, or one LightningCLI will report)."""
    try:
        top = yaml.safe_load(Path(file).read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(top, dict) or not any(name in top for name in MODES):
        return None
    if not isinstance(top.get(subcommand), dict):
        stages = ", ".join(name for name in MODES if name in top)
        raise UserError(f"no {subcommand} section", file, f"this protocol file has sections {stages}; add {subcommand}:")
    return yaml.safe_dump(top[subcommand], sort_keys=False)


def main(args: Optional[list[str]] = None) -> None:
    """Entry point of the `diffstyler` console script (returns None: its value becomes the exit code).

    A user error ends the process with one line on stderr and status 2; with --debug it is raised.
    """
    if args is None:
        # LightningCLI reads sys.argv itself, and DDP relaunches sys.argv for the other ranks.
        debug, sys.argv[1:] = split_debug_flag(sys.argv[1:])
    else:
        debug, args = split_debug_flag(list(args))
    if debug:
        os.environ[DEBUG_VARIABLE] = "1"  # for the ranks that DDP starts
    subcommand = find_subcommand(sys.argv[1:] if args is None else args)
    model_class, datamodule_class = MODES[subcommand]
    try:
        if args is None:
            sys.argv[1:] = protocol_stage(sys.argv[1:], subcommand)
        else:
            args = protocol_stage(args, subcommand)
        DiffStylerCLI(model_class, datamodule_class, subcommand=subcommand, args=args)
    except Exception as error:  # not BaseException: Ctrl-C and sys.exit keep their meaning
        if not debug:
            exit_for(subcommand, error)
        raise


if __name__ == "__main__":
    main()
