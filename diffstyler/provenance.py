"""What changes a result's pixels, listed once.

`PixelSettings` holds every setting a result's pixels depend on besides the images themselves;
`DiffStylerPipeline.pixel_settings` is the one place that fills it. Three things are read from it,
so that a setting added there reaches all three:
- `inversion_key(image)`: the inversion cache's key of an image as it is inverted (its pixels, and
  the settings an inversion depends on);
- `rerun_hash(content_sha256)`: the hash stored in each PNG; a rerun keeps a file only when it
  matches. The content counts by its file's sha256 there, so that a rerun decides without decoding it;
- `recorded(...)`: what a result's PNG metadata and results.jsonl record, A1111's names first.
Files count by their content (sha256), never by their path.

Settings added after results were made appear in the hash and the key only where they apply (the
inversion solver other than Euler, VAE tiling where it tiles, the guidance where the denoiser reads
it, StyleID's settings with image styles), so that adding them redid no existing result and renamed
no stored trajectory.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional

from PIL import Image

from diffstyler.data.jobs import StyleEntry
from diffstyler.injection import InjectionConfig
from diffstyler.inversion import InversionKey
from diffstyler.methods import StyleIDConfig
from diffstyler.outputs import a1111_fields
from diffstyler.results import settings_hash
from diffstyler.stylize import SamplingConfig


@dataclass(frozen=True)
class StyleFiles:
    """A style's files by content: its LoRA's, its mask file's and its image's sha256 (None where it has none)."""

    lora_sha256: Optional[str]
    mask_file_sha256: Optional[str]
    image_sha256: Optional[str]


@dataclass(frozen=True)
class PixelSettings:
    """Everything besides the images that changes a result's pixels (see the module's docstring)."""

    model_name: str  # as given: what the PNG records
    model: dict  # the model's fingerprint (name, revision, files, dtype, ...)
    model_id: str  # the inversion cache's name for the model (the fingerprint without the dtype)
    dtype: str  # the denoiser's
    sampler_fields: dict  # A1111's names of the sampler and guidance (`Backbone.a1111_sampling_fields`)
    sampling: SamplingConfig
    inversion_solver: Optional[str]  # the flow-matching inversion's solver that runs, when not Euler
    inversion_guidance: Optional[float]  # the guidance scale, where the denoiser reads it (FLUX.1-dev)
    injection: InjectionConfig  # DiffStyler's (LoRA styles)
    styleid: Optional[StyleIDConfig]  # StyleID's, where a style is an image
    styles: tuple[StyleEntry, ...]
    style_files: tuple[StyleFiles, ...]
    segmenter: Optional[dict]  # FastSAM's settings, where the styles have masks
    composite: bool
    seed: int
    resolution: int  # the content's longer side as stylized
    vae_tiling: Optional[str]  # the VAE's tiles where it tiles an image of this resolution
    sweep: Optional[dict] = None  # the ablation grid's settings, where one is made

    @property
    def has_masks(self) -> bool:
        return any(entry.mask is not None for entry in self.styles)

    def inversion_key(self, image: Image.Image) -> InversionKey:
        """The cache key of `image` (the content, or an image style's image at the content's size)
        inverted under these settings."""
        if max(image.size) != self.resolution:
            raise ValueError(f"an image of {image.width}x{image.height} is not inverted at resolution {self.resolution}")
        return InversionKey(
            image_sha256=hashlib.sha256(f"{image.width}x{image.height}:".encode() + image.tobytes()).hexdigest(),
            model=self.model_id,
            height=image.height,
            width=image.width,
            steps=self.sampling.steps,
            substeps=self.sampling.inversion_substeps,
            prompt=self.sampling.inversion_prompt,
            dtype=self.dtype,
            vae_tiling=self.vae_tiling,
            solver=self.inversion_solver,
            guidance=self.inversion_guidance,
        )

    def rerun_hash(self, content_sha256: str) -> str:
        """The hash of everything that changes the pixels of a job's outputs, its content given by
        its file's sha256."""
        return settings_hash({
            "model": self.model,
            "dtype": self.dtype,
            "sampling": self.sampling.fingerprint(),
            "injection": asdict(self.injection),
            **({"styleid": asdict(self.styleid)} if self.styleid is not None else {}),
            "sweep": self.sweep,
            "segmenter": self.segmenter,
            "composite": self.composite if self.has_masks else None,
            "seed": self.seed,
            "resolution": self.resolution,
            **({"vae_tiling": self.vae_tiling} if self.vae_tiling else {}),
            "content_sha256": content_sha256,
            "styles": [style_fingerprint(entry, files) for entry, files in zip(self.styles, self.style_files)],
        })

    def recorded(self, size: tuple[int, int], content: Optional[str] = None, job: Optional[str] = None) -> dict[str, Any]:
        """What a result's PNG metadata records (A1111's names first, then ours); `size` is the
        result's (width, height), `content` its content file, `job` its job id."""
        return {
            "Steps": self.sampling.steps,
            **self.sampler_fields,
            "Seed": self.seed,
            "Size": f"{size[0]}x{size[1]}",
            "Model": self.model_name,
            **a1111_fields(self.model_name, [(entry.name, entry.lora) for entry in self.styles if entry.lora is not None]),
            **({"VAE tiling": self.vae_tiling} if self.vae_tiling else {}),
            "Content": content,
            "Job": job,
            "Styles": [{**asdict(entry), "method": entry.method, **recorded_hash(entry, files)}
                       for entry, files in zip(self.styles, self.style_files)],
            **({"StyleID": asdict(self.styleid)} if self.styleid is not None else {}),
            "Injection": asdict(self.injection),
            **({"Sweep": self.sweep} if self.sweep else {}),
            "Sampling": asdict(self.sampling),
            "Composite": self.composite,
        }


def style_files(entry: StyleEntry, image_sha256: Callable[[StyleEntry], Optional[str]],
                file_sha256: Callable[[str], str]) -> StyleFiles:
    """The style's files by content; `image_sha256` gives its image's (a file's, or the pixels' of
    an image given in memory)."""
    return StyleFiles(
        lora_sha256=file_sha256(entry.lora) if entry.lora is not None else None,
        mask_file_sha256=file_sha256(entry.mask.file) if entry.mask is not None and entry.mask.file else None,
        image_sha256=image_sha256(entry) if entry.image else None,
    )


def style_fingerprint(entry: StyleEntry, files: StyleFiles) -> dict[str, Any]:
    """What of a style changes the pixels, its files by sha256."""
    mask = None if entry.mask is None else {**asdict(entry.mask), "file_sha256": files.mask_file_sha256}
    return {
        "prompt": entry.prompt,
        "scale": float(entry.scale),
        "lora_sha256": files.lora_sha256,
        "mask": mask,
        "image_sha256": files.image_sha256,
    }


def recorded_hash(entry: StyleEntry, files: StyleFiles) -> dict[str, Optional[str]]:
    """The file a style is made from, as the PNG records it: its LoRA's, or an image style's image."""
    return {"lora_sha256": files.lora_sha256} if entry.lora is not None else {"image_sha256": files.image_sha256}
