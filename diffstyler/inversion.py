"""Deterministic inversion of a content latent, at exactly the sampler's timesteps.

`invert` climbs the schedule from the clean latent z_0 to z_T with the denoiser of a backbone
(DDIM for a UNet; the flow-matching ODE backwards for a transformer: `sampling.invert`) and returns
the whole trajectory, indexed like the sampler: trajectory[i] is the latent at sampling step i
(timestep timesteps[i]) and trajectory[N] is z_0. The reference row of the stylization batch and
the mask fusion read from it. `substeps` > 1 inserts finer steps between the sampler's timesteps
(the paper inverts with 1000 steps: 20 sub-steps for a 50-step sampler); only the sampler's
timesteps are kept.

`InversionCache` stores trajectories as safetensors keyed by everything that changes them, and
`TrajectoryStore` keeps the last few in memory in front of it and inverts the missing contents
together, so a second style on the same content skips the inversion.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Hashable, Optional, Sequence, TypeVar

import torch
from safetensors.torch import load_file, save

from diffstyler.backbones import Backbone
from diffstyler.conditioning import Conditioning
from diffstyler.errors import first_line
from diffstyler.outputs import atomic_write, remove_abandoned_temporary_files
from diffstyler.sampling import InversionCallback, Schedule
from diffstyler.sampling import invert as invert_latents



@torch.no_grad()
def invert(backbone: Backbone, latent: torch.Tensor, conditioning: Conditioning, schedule: Schedule, substeps: int = 1,
           callback: Optional[InversionCallback] = None, progress: bool = True, guidance: Optional[float] = None) -> torch.Tensor:
    """Trajectory [N + 1, C, h, w] of the inversion of `latent` [1, C, h, w] with the denoiser as
    given: run it inside `torch_utils.base_model` to invert with the base model."""
    return invert_batch(backbone, latent, conditioning, schedule, substeps, callback, progress, guidance)[0]


@torch.no_grad()
def invert_batch(backbone: Backbone, latents: torch.Tensor, conditioning: Conditioning, schedule: Schedule, substeps: int = 1,
                 callback: Optional[InversionCallback] = None, progress: bool = True,
                 guidance: Optional[float] = None) -> list[torch.Tensor]:
    """`invert` of several latents [B, C, h, w] of one size in one call per move; one trajectory
    [N + 1, C, h, w] per latent. `conditioning` (one row) is shared by all of them."""
    rows = conditioning.expand(latents.shape[0])
    return invert_latents(lambda x, t: backbone.predict(x, t, rows, guidance), latents, schedule, substeps, callback, progress)


# --- cache ------------------------------------------------------------------------------------

OPTIONAL_KEY_FIELDS = ("vae_tiling", "solver", "guidance")


@dataclass(frozen=True)
class InversionKey:
    """Everything an inversion depends on."""

    image_sha256: str
    model: str
    height: int
    width: int
    steps: int
    substeps: int
    prompt: str
    dtype: str
    # The VAE's tiles when the content is encoded in tiles (`memory.vae_tiling_setting`), a
    # flow-matching inversion's solver other than Euler, and the guidance scale of a model that
    # reads it as an input (FLUX.1-dev); each left out of the digest when None, so that adding them
    # changed no stored trajectory's name.
    vae_tiling: Optional[str] = None
    solver: Optional[str] = None
    guidance: Optional[float] = None

    def digest(self) -> str:
        fields = {k: v for k, v in self.__dict__.items() if not (k in OPTIONAL_KEY_FIELDS and v is None)}
        text = json.dumps(fields, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]


class InversionCache:
    """Trajectories on disk as `<digest>.safetensors`, written atomically.

    The cache only saves time, and a trajectory from it is used only when it is whole: a file that
    cannot be read (truncated, not safetensors), of another shape, or holding NaN or inf values is
    reported with a warning naming it, recomputed and written again. A folder that cannot be written
    (full, read-only) is reported once, and the run goes on without it. Temporary files of killed
    writes of an entry are removed when the entry is next read or written.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.write_failed = False  # reported once per folder

    def path(self, key: InversionKey) -> Path:
        return self.folder / f"{key.digest()}.safetensors"

    def load(self, key: InversionKey, shape: Optional[tuple[int, ...]] = None) -> Optional[torch.Tensor]:
        """The cached trajectory, or None when there is none or it is unusable (then it is recomputed).

        `shape`: the trajectory's expected shape, when known; a file of another shape is unusable.
        """
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            trajectory = load_file(str(path))["trajectory"]
        except Exception as error:  # safetensors has its own error types for a broken file
            warn_cache_ignored(path, first_line(error))
            return None
        if shape is not None and tuple(trajectory.shape) != tuple(shape):
            warn_cache_ignored(path, f"it holds shape {tuple(trajectory.shape)}, expected {tuple(shape)}")
            return None
        if not torch.isfinite(trajectory).all():
            warn_cache_ignored(path, "it holds NaN or inf values")
            return None
        return trajectory

    def save(self, key: InversionKey, trajectory: torch.Tensor) -> Optional[Path]:
        path = self.path(key)
        metadata = {k: str(v) for k, v in key.__dict__.items()}
        data = save({"trajectory": trajectory.detach().cpu().contiguous()}, metadata=metadata)
        try:
            remove_abandoned_temporary_files(path)
            atomic_write(path, lambda handle: handle.write(data))
        except OSError as error:
            if not self.write_failed:
                self.write_failed = True
                warnings.warn(f"inversion cache not written ({self.folder}): {error.strerror or first_line(error)}; "
                              "the run goes on without it")
            return None
        return path


def warn_cache_ignored(path: Path, why: str) -> None:
    warnings.warn(f"inversion cache file ignored ({path}): {why}; recomputing the inversion")


# --- memory in front of the disk, and batched inversion of what is missing ---------------------

RECENT_TRAJECTORIES = 8  # kept in memory (a few MB each at 512 px)
Content = TypeVar("Content")


class TrajectoryStore:
    """Inversion trajectories by `InversionKey`: the last `recent` in memory, every one on disk when
    a cache folder is given (`InversionCache`), and the missing ones inverted together."""

    def __init__(self, folder: Optional[str | os.PathLike] = None, recent: int = RECENT_TRAJECTORIES):
        self.disk = InversionCache(folder) if folder else None
        self.recent = recent
        self.memory: OrderedDict[InversionKey, torch.Tensor] = OrderedDict()

    def lookup(self, key: InversionKey, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The trajectory from memory or disk (a broken or misshaped file counts as missing), or None."""
        trajectory = self.memory.get(key)
        if trajectory is None and self.disk is not None:
            cached = self.disk.load(key, shape)
            trajectory = None if cached is None else cached.to(device, dtype)
        if trajectory is not None:
            self.remember(key, trajectory)
        return trajectory

    def remember(self, key: InversionKey, trajectory: torch.Tensor, save: bool = False) -> None:
        if save and self.disk is not None:
            self.disk.save(key, trajectory)
        self.memory[key] = trajectory
        self.memory.move_to_end(key)
        while len(self.memory) > self.recent:
            self.memory.popitem(last=False)

    def trajectories(
        self,
        requests: Sequence[tuple[InversionKey, Content]],
        shape_of: Callable[[InversionKey], tuple[int, ...]],
        invert_many: Callable[[list[Content]], list[torch.Tensor]],
        device: torch.device,
        dtype: torch.dtype,
        max_batch: Optional[int] = None,
    ) -> list[torch.Tensor]:
        """One trajectory per (key, content): stored ones as they are, the missing contents inverted
        by `invert_many` in groups of one size and prompt (at most `max_batch` per call), each
        content once however many requests name it."""
        found: dict[InversionKey, torch.Tensor] = {}
        missing: dict[InversionKey, Content] = {}
        for key, content in requests:
            if key in found or key in missing:
                continue
            trajectory = self.lookup(key, shape_of(key), device, dtype)
            if trajectory is None:
                missing[key] = content
            else:
                found[key] = trajectory
        groups: dict[Hashable, list[InversionKey]] = {}
        for key in missing:
            groups.setdefault((key.height, key.width, key.prompt), []).append(key)
        for keys in groups.values():
            size = max_batch or len(keys)
            for start in range(0, len(keys), size):
                batch = keys[start : start + size]
                for key, trajectory in zip(batch, invert_many([missing[k] for k in batch])):
                    self.remember(key, trajectory, save=True)
                    found[key] = trajectory
        return [found[key] for key, _ in requests]
