"""Shared fixtures. Tests run offline: HF_HUB_OFFLINE is forced before any Hugging Face import."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # read by huggingface_hub at import time, so set it first
os.environ["YOLO_OFFLINE"] = "1"  # ultralytics: no DNS look-ups at import
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `pytest -n 2` (the README's test command): one worker per core, so each worker, and every
    # process it starts, computes on one thread; two threads each would fight over the two cores.
    # Read by torch at import, and inherited by the CLI and DDP subprocesses.
    os.environ["OMP_NUM_THREADS"] = "1"

from pathlib import Path  # noqa: E402
from typing import Callable  # noqa: E402

from diffstyler.console import quiet_imports  # noqa: E402

quiet_imports()  # before diffusers imports: torchao's import notes (diffstyler.console)

import lightning.pytorch  # noqa: E402, F401  (its log handler takes sys.stderr when imported: before any test captures it;
#                                        `diffstyler.cli.main` imports lightning only when a command gets that far)
import pytest  # noqa: E402
import torch  # noqa: E402
from diffusers import StableDiffusionPipeline  # noqa: E402

from diffstyler.models import ModelSpec, load_pipeline  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
# Folders of the checkout that tests and tools may write into: the rest must look the same afterwards.
UNWATCHED_FOLDERS = {".git", ".venv", "__pycache__", ".pytest_cache"}


def checkout_files() -> set[str]:
    """Every file of the checkout (ignored ones too: outputs/ of a test is a leak), outside
    `UNWATCHED_FOLDERS`, relative to its root."""
    found = set()
    for folder, subfolders, files in os.walk(REPO_ROOT):
        subfolders[:] = [name for name in subfolders if name not in UNWATCHED_FOLDERS and not name.endswith(".egg-info")]
        found.update(os.path.relpath(os.path.join(folder, name), REPO_ROOT) for name in files)
    return found


@pytest.fixture(scope="module", autouse=True)
def checkout_stays_clean(request):
    """Fails the module whose tests leave a file in the checkout (a config.yaml saved into the
    working folder, outputs/ of a command run without its output options): tests write under tmp_path."""
    before = checkout_files()
    yield
    left = sorted(checkout_files() - before)
    assert not left, (f"files left in the checkout by {request.module.__name__} (or by a module running beside it on "
                      f"another xdist worker): {left[:20]}")


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[Path]:
    """Two random LoRA files as `diffstyler fit` writes them (with info files), named first and second."""
    from tests.helpers import write_random_lora

    folder = tmp_path_factory.mktemp("loras")
    return [write_random_lora(folder / name, seed) for name, seed in (("first", 1), ("second", 2))]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def tiny_pipe() -> Callable[[], StableDiffusionPipeline]:
    """A factory: every call returns a fresh `tiny` pipeline (same seed, hence same weights)."""

    def make_tiny_pipeline() -> StableDiffusionPipeline:
        return load_pipeline(ModelSpec("tiny"))

    return make_tiny_pipeline


@pytest.fixture(scope="session")
def style_image() -> Path:
    """The project's 64x64 smoke style image (made by scripts/make_smoke_data.py)."""
    return REPO_ROOT / "data" / "style_stripes.png"


@pytest.fixture(scope="session")
def unet_probe() -> Callable[[torch.nn.Module], torch.Tensor]:
    """A function giving a UNet's output on fixed inputs (batch 2, 8x8 latents, tiny text width 32)."""

    @torch.no_grad()
    def probe(unet: torch.nn.Module) -> torch.Tensor:
        generator = torch.Generator().manual_seed(1234)
        latents = torch.randn(2, 4, 8, 8, generator=generator)
        text = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator)
        timesteps = torch.tensor([10, 700])
        return unet(latents, timesteps, encoder_hidden_states=text).sample

    return probe


@pytest.fixture
def model_builds(monkeypatch) -> list[str]:
    """Records every model load ("random" for `tiny` and the like, or a real model's name) and every denoiser built
    ("unet", "transformer"), while still doing them: a check that must come before the model leaves it empty."""
    import dataclasses
    import functools

    import diffusers

    import diffstyler.models

    built: list[str] = []
    random_kind, load_real = diffstyler.models.random_kind, diffstyler.models._load_real_pipeline

    def recording_random_kind(name):
        kind = random_kind(name)
        if kind is None:
            return None
        return dataclasses.replace(kind, build_random=lambda *a, **k: built.append("random") or kind.build_random(*a, **k))

    def recording_init(label, init):
        @functools.wraps(init)  # diffusers reads the config's keys from its signature
        def record(self, *args, **kwargs):
            built.append(label)
            init(self, *args, **kwargs)
        return record

    monkeypatch.setattr(diffstyler.models, "random_kind", recording_random_kind)
    monkeypatch.setattr(diffstyler.models, "_load_real_pipeline", lambda spec: built.append(spec.name) or load_real(spec))
    for label, denoiser in [("unet", diffusers.UNet2DConditionModel), ("transformer", diffusers.SD3Transformer2DModel),
                            ("transformer", diffusers.FluxTransformer2DModel)]:
        monkeypatch.setattr(denoiser, "__init__", recording_init(label, denoiser.__init__))
    return built
