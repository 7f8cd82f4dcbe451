"""Each job's own inputs, checked before the model loads (`StylizePredictor.check_run`).

What differs per job fails that job only, but much of it is knowable from the files in well under
a second, before a model of gigabytes is built:
- its content image decodes (a truncated photo, a file that is not an image, one over the pixel
  limit). Files are decoded in full, in job order, up to `FULL_DECODE_PIXELS` pixels in all; beyond
  that only their headers are read (a truncated file there fails its job when the job runs);
- each mask file decodes, and leaves pixels to style at the content's size once inverted and
  grown (`masks.styled_region`, the region `shape_mask` would style);
- each box and point prompt lies inside the content at the size it is stylized at (boxes and
  points are in the pixels of the content resized to `data.resolution`);
- each LoRA that only manifest rows name (those of `data.styles` stop the run: `check_run`) fits
  the model and holds finite weights.
Text prompts and what FastSAM finds need the segmenter: they are found when their job runs.

`job_input_failures` gives each failing job's error, with the same message as the job would fail
with. `jobs_that_run` decides: every job failing stops the run (`EveryJobFails`, one line per kind
of failure); with `data.on_error: stop` the first failure does; otherwise the failing jobs are
recorded as failed when the run starts and the others run.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from diffstyler.checks import check_lora_finite
from diffstyler.data.jobs import Job, StyleEntry
from diffstyler.errors import UserError, UserErrors
from diffstyler.images import LATENT_FACTOR, size_at_resolution, upright_image_size
from diffstyler.lora import check_lora_width
from diffstyler.masks.shape import hard_mask_from_image, open_mask_file, styled_region
from diffstyler.masks.spec import MaskSpec, check_prompt_inside, describe_mask_file

# Pixels decoded in full before the model loads: 256 photos of 512 x 512, or 5 of 12 MP, 1-3 s on a
# busy CPU core (benchmarks/bench_job_inputs.py: 10 ms per 512 x 512 PNG, 250 ms per 12 MP JPEG,
# against 0.2-1.6 ms for a header); the files beyond it are checked by their headers only.
FULL_DECODE_PIXELS = 1 << 26
MASK_FILES_KEPT = 8  # decoded mask files kept for the jobs that share them


class EveryJobFails(UserErrors):
    """Every job of the run would fail: one line per kind of failure."""


def job_input_failures(jobs: Iterable[Job], model: Optional[tuple[str, int]] = None, checked_loras: Iterable[str] = (),
                       full_decode_pixels: int = FULL_DECODE_PIXELS, multiple: int = LATENT_FACTOR) -> dict[str, UserError]:
    """{job id: the error it would fail with} for the jobs whose own inputs fail (see above).

    `model`: (its denoiser, the width its LoRAs are checked by: `models.model_lora_width`; None:
    not known before the model loads). `checked_loras`: LoRA files already checked for the whole
    run. `multiple`: what the model's image sides are multiples of (8, or 16 for a transformer)."""
    files = InputFiles(full_decode_pixels, model, checked_loras, multiple)
    failures = {}
    for job in jobs:
        try:
            files.check_job(job)
        except UserError as error:
            failures[job.id] = error
    return failures


def jobs_that_run(jobs: list[Job], failures: dict[str, UserError], on_error: str) -> list[tuple[Job, UserError]]:
    """The jobs to record as failed when the run starts, or the error that stops the run now:
    every job fails (`EveryJobFails`), or one does and `on_error` is "stop" (its own error)."""
    failed = [(job, failures[job.id]) for job in jobs if job.id in failures]
    if failed and len(failed) == len(jobs):
        raise EveryJobFails(lines_by_kind(failed))
    if failed and on_error == "stop":
        job, error = failed[0]
        raise error
    return failed


def lines_by_kind(failed: list[tuple[Job, UserError]]) -> list[str]:
    """One line per kind of failure (what failed), in the order first seen: the first job's error,
    and how many more jobs fail so."""
    kinds: OrderedDict[str, list[UserError]] = OrderedDict()
    for _, error in failed:
        kinds.setdefault(error.what, []).append(error)
    lines = []
    for errors in kinds.values():
        more = len(errors) - 1
        lines.append(errors[0].line() + (f" (and {more} more job{'s' if more > 1 else ''} alike)" if more else ""))
    return lines


class InputFiles:
    """The checks of `job_input_failures`, each file read once however many jobs share it."""

    def __init__(self, full_decode_pixels: int, model: Optional[tuple[str, int]], checked_loras: Iterable[str],
                 multiple: int = LATENT_FACTOR):
        self.decode_budget = full_decode_pixels
        self.model = model
        self.multiple = multiple
        self.sizes: dict[str, tuple[int, int] | UserError] = {}  # content path -> upright size, or its error
        self.loras: dict[str, Optional[UserError]] = {str(Path(lora)): None for lora in checked_loras}
        self.mask_regions: OrderedDict[str, np.ndarray | UserError] = OrderedDict()  # mask file -> its region

    def check_job(self, job: Job) -> None:
        size = size_at_resolution(self.content_size(job.content), job.resolution, self.multiple)
        for entry in job.styles:
            if entry.lora is not None:  # a StyleID style's image was decoded with the data module's styles
                self.check_lora(entry)
            if entry.mask is not None:
                self.check_mask(entry.mask, size)

    def content_size(self, path: str) -> tuple[int, int]:
        if path not in self.sizes:
            try:
                self.sizes[path] = self.image_size(path)
            except UserError as error:
                self.sizes[path] = error
        found = self.sizes[path]
        if isinstance(found, UserError):
            raise found
        return found

    def image_size(self, path: str) -> tuple[int, int]:
        """The upright size of an image, decoded in full while the budget lasts."""
        if self.decode_budget <= 0:
            return upright_image_size(path, decode=False)
        width, height = upright_image_size(path, decode=False)  # the pixel limit first: no bomb is decoded
        self.decode_budget -= width * height
        return upright_image_size(path, decode=True)

    def check_lora(self, entry: StyleEntry) -> None:
        lora = str(Path(entry.lora))
        if lora not in self.loras:
            try:
                if self.model is not None:
                    check_lora_width(Path(lora), self.model[1], self.model[0])
                check_lora_finite(Path(lora))
                self.loras[lora] = None
            except UserError as error:
                self.loras[lora] = error
        if self.loras[lora] is not None:
            raise self.loras[lora]

    def check_mask(self, spec: MaskSpec, size: tuple[int, int]) -> None:
        """The mask at the content's `size`: a file decodes and leaves pixels to style; a box or
        points lie inside."""
        if spec.file is None:
            check_prompt_inside(spec, size)
            return
        region = self.mask_region(spec.file)
        with warnings.catch_warnings():  # an aspect-ratio warning is the job's to give, when it runs
            warnings.simplefilter("ignore")
            hard = hard_mask_from_image(region, size, describe_mask_file(spec.file))
        styled_region(hard, spec.describe(), invert=spec.invert, grow=spec.grow)

    def mask_region(self, path: str) -> np.ndarray:
        """The mask file's nonzero pixels (bool [H, W], upright), decoded once for the jobs that
        share it; its error again for each of them."""
        found = self.mask_regions.get(path)
        if found is None:
            try:
                image = open_mask_file(path)
                found = hard_mask_from_image(image, image.size, describe_mask_file(path)).numpy()
            except UserError as error:
                found = error
            self.mask_regions[path] = found
            while len(self.mask_regions) > MASK_FILES_KEPT:
                self.mask_regions.popitem(last=False)
        self.mask_regions.move_to_end(path)
        if isinstance(found, UserError):
            raise found
        return found
