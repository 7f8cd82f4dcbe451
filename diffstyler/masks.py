"""Region masks for localized style transfer.

A mask says where the style goes. It comes from one of four sources (a mask file, a text prompt,
a box, or points) and is then shaped the same way whatever its source:

    hard mask -> invert -> grow/shrink -> (must not be empty) -> feather -> soft mask in [0, 1]

Text, box and point prompts are answered by FastSAM through ultralytics, fully offline: weights
come from a local file and text scoring uses a transformers CLIP instead of OpenAI's `clip`
package (which ultralytics would otherwise import and download).

The diffusion model works on a latent grid 8x smaller than the image; `mask_to_latent` brings a
pixel mask onto that grid so that the style region always covers the whole pixel mask.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from diffstyler.errors import UserError
from diffstyler.images import HIGH_BIT_MODES, ImageLoadError, open_upright_image
from diffstyler.outputs import atomic_save


FASTSAM_WEIGHTS_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0/"


class MaskError(ValueError):
    """A mask cannot be made from what the user gave (bad file, prompt that finds nothing, ...)."""


# --------------------------------------------------------------------------------------------
# What the user asks for
# --------------------------------------------------------------------------------------------


@dataclass
class MaskSpec:
    """One style region. Exactly one of `file`, `text`, `box`, `points` must be set.

    `box` is [x0, y0, x1, y1] and `points` are [x, y] pairs, both in content-image pixels.
    `point_labels` are 1 (the region contains this point) or 0 (it does not); default all 1.
    `grow` > 0 dilates, < 0 erodes the region by that many pixels; `feather` softens its edge.
    """

    file: Optional[str] = None
    text: Optional[str] = None
    box: Optional[list[float]] = None
    points: Optional[list[list[float]]] = None
    point_labels: Optional[list[int]] = None
    invert: bool = False
    grow: int = 0
    feather: int = 0

    def __post_init__(self):
        given = [name for name in ("file", "text", "box", "points") if getattr(self, name) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"a mask needs exactly one of file, text, box, points (got: {found})")
        if self.file is not None and not str(self.file).strip():
            raise ValueError("mask file path is empty")
        if self.text is not None and not self.text.strip():
            raise ValueError("mask text prompt is empty")
        if self.box is not None:
            self.box = _checked_box(self.box)
        if self.points is not None:
            self.points = _checked_points(self.points)
        if self.point_labels is not None:
            if self.points is None:
                raise ValueError("point_labels were given without points")
            self.point_labels = _checked_labels(self.point_labels, len(self.points))
        if int(self.grow) != self.grow:
            raise ValueError(f"grow must be a whole number of pixels, got {self.grow!r}")
        if int(self.feather) != self.feather or self.feather < 0:
            raise ValueError(f"feather must be a whole number of pixels >= 0, got {self.feather!r}")
        self.grow, self.feather = int(self.grow), int(self.feather)

    def describe(self) -> str:
        """Name the source in error messages, so the user knows which of several masks failed."""
        if self.file is not None:
            return f"mask file '{self.file}'"
        if self.text is not None:
            return f"text prompt '{self.text}'"
        if self.box is not None:
            return f"box {self.box}"
        labels = self.point_labels if self.point_labels is not None else [1] * len(self.points)
        return f"points {self.points} (labels {labels})"


def _checked_box(box) -> list[float]:
    if not isinstance(box, (list, tuple)) or len(box) != 4:
        raise ValueError(f"box must be [x0, y0, x1, y1] (4 numbers), got {box!r}")
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box must contain 4 numbers, got {box!r}") from None
    if not (x0 < x1 and y0 < y1):
        raise ValueError(f"box {box!r} must have x0 < x1 and y0 < y1")
    return [x0, y0, x1, y1]


def _checked_points(points) -> list[list[float]]:
    if not isinstance(points, (list, tuple)) or not points:
        raise ValueError(f"points must be a non-empty list of [x, y] pairs, got {points!r}")
    checked = []
    for point in points:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise ValueError(f"each point must be [x, y], got {point!r} in {points!r}")
        try:
            checked.append([float(point[0]), float(point[1])])
        except (TypeError, ValueError):
            raise ValueError(f"point {point!r} must contain 2 numbers") from None
    return checked


def _checked_labels(labels, n_points: int) -> list[int]:
    if len(labels) != n_points:
        raise ValueError(f"point_labels has {len(labels)} entries but there are {n_points} points")
    if any(label not in (0, 1) for label in labels):
        raise ValueError(f"point_labels must be 1 (positive) or 0 (negative), got {labels!r}")
    return [int(label) for label in labels]


@dataclass
class SegmenterConfig:
    """How to run FastSAM. `weights` is a local FastSAM-s.pt / FastSAM-x.pt file, or `tiny`: FastSAM's
    architecture (YOLOv8-seg) with seeded random weights, for smoke runs without weights (it finds
    arbitrary instances, and only at a very low `conf`). `clip_model` is a transformers model id or
    local folder, used only for text prompts."""

    weights: str = "FastSAM-s.pt"
    device: Optional[str] = None
    imgsz: int = 1024
    conf: float = 0.4
    iou: float = 0.9
    clip_model: str = "openai/clip-vit-base-patch32"


# --------------------------------------------------------------------------------------------
# Mask files
# --------------------------------------------------------------------------------------------


def load_mask_file(path, size: tuple[int, int]) -> torch.Tensor:
    """Read a mask image as a bool [H, W] tensor for a content image of `size` = (width, height).

    Nonzero means region. For colour files a pixel is in the region if any colour channel is
    nonzero (a luminance conversion would round very dark colours to 0 and lose them). If the
    file has an alpha channel that is actually used (some pixel not fully opaque), the alpha
    alone decides (alpha > 0), because cut-outs often hide arbitrary colours under transparent
    pixels. A file of another size is resized with nearest neighbour so no grey values appear.
    Lossy formats (JPEG) put faint noise near edges that counts as region: prefer PNG.
    """
    try:
        # Upright like the content (load_image), so the mask lines up with the photo it was drawn on.
        region = _nonzero_region(open_upright_image(path))
    except (FileNotFoundError, ImageLoadError) as err:
        raise MaskError(f"mask file '{path}': {err}") from err

    width, height = size
    if region.shape != (height, width):
        as_image = Image.fromarray(region.astype(np.uint8) * 255)
        region = np.asarray(as_image.resize((width, height), Image.Resampling.NEAREST)) > 0
    return torch.from_numpy(np.ascontiguousarray(region))


def _nonzero_region(image: Image.Image) -> np.ndarray:
    if image.mode in HIGH_BIT_MODES:
        # 16-bit and float greyscale would be clipped by a conversion to 8-bit RGB.
        return np.asarray(image) != 0
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        alpha = np.asarray(image.convert("RGBA"))[..., 3]
        if alpha.min() < 255:
            return alpha > 0
    return np.asarray(image.convert("RGB")).max(axis=-1) > 0


# --------------------------------------------------------------------------------------------
# FastSAM prompts
# --------------------------------------------------------------------------------------------


def _prepare_offline_ultralytics() -> None:
    """Must run before ultralytics is imported: it reads these variables at import time.

    Without them ultralytics probes DNS on import, may pip-install packages, and writes its
    settings to ~/.config. Its settings go to the temporary folder instead: nothing is written
    into the user's home. setdefault keeps whatever the user chose explicitly.
    """
    cache = Path(tempfile.gettempdir()) / "diffstyler"
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "0")
    os.environ.setdefault("YOLO_CONFIG_DIR", str(cache / "ultralytics"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))


class TransformersClipScorer:
    """Scores image crops against texts with a transformers CLIP: a (texts x crops) matrix of
    cosine similarities, the same contract as ultralytics' own `_clip_inference`."""

    def __init__(self, model, processor, device=None):
        self.model = model.eval()
        self.processor = processor
        if device is not None:
            self.model.to(device)

    @torch.no_grad()
    def __call__(self, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
        inputs = self.processor(text=texts, images=images, return_tensors="pt", padding=True)
        weight = next(self.model.parameters())
        text_features = _features(
            self.model.get_text_features(
                input_ids=inputs["input_ids"].to(weight.device),
                attention_mask=inputs["attention_mask"].to(weight.device),
            )
        )
        # A half-precision CLIP needs half-precision pixels.
        pixels = inputs["pixel_values"].to(weight.device, weight.dtype)
        image_features = _features(self.model.get_image_features(pixel_values=pixels))
        text_features = F.normalize(text_features.float(), dim=-1)
        image_features = F.normalize(image_features.float(), dim=-1)
        return text_features @ image_features.T


@contextlib.contextmanager
def torch_threads_kept():
    """Give torch its thread count back after ultralytics: its `select_device` sets
    `torch.set_num_threads(min(8, cpus - 1))` for the whole process (1 on a 2-core machine), which
    would slow down, and change the float sums of, everything the run does after its first mask."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _features(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding;
    # older releases returned the embedding tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@functools.cache
def _text_prompt_predictor_class():
    # One class object for the process: ultralytics rebuilds its predictor whenever it is handed
    # a different predictor class, which would cost a model setup per prompt.
    from ultralytics.models.fastsam import FastSAMPredictor

    class TextScoringFastSAMPredictor(FastSAMPredictor):
        """FastSAMPredictor whose text scoring is delegated to `self.text_scorer`, so ultralytics
        never reaches for OpenAI's `clip` package or its download."""

        text_scorer: Optional[Callable[[list[Image.Image], list[str]], torch.Tensor]] = None

        def _clip_inference(self, images, texts):
            if self.text_scorer is None:
                raise RuntimeError("no text scorer attached to the FastSAM predictor")
            return self.text_scorer(images, texts).to(self.device)

    return TextScoringFastSAMPredictor


class FastSAMSegmenter:
    """Turns box, point and text prompts into a bool [H, W] mask with FastSAM.

    FastSAM first segments everything in the image; ultralytics' own `FastSAMPredictor.prompt`
    then picks instances: for a box the one with the best IoU against it, for points every
    instance containing a positive point and no negative point, for text the instance whose crop
    CLIP scores highest. The picked instances are merged into one mask.

    `clip_model` / `clip_processor` may be given ready-built (a transformers CLIPModel and
    CLIPProcessor); otherwise they are loaded from `config.clip_model` on the first text prompt.
    Either way the CLIP model is moved to FastSAM's device.
    """

    def __init__(self, config: Optional[SegmenterConfig] = None, clip_model=None, clip_processor=None):
        if (clip_model is None) != (clip_processor is None):
            raise ValueError("clip_model and clip_processor must be given together")
        self.config = config or SegmenterConfig()
        self._clip_parts = (clip_model, clip_processor) if clip_model is not None else None
        self._scorer: Optional[TransformersClipScorer] = None
        self._model = None

    def box(self, image: Image.Image, box) -> torch.Tensor:
        x0, y0, x1, y1 = _checked_box(box)
        width, height = image.size
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise MaskError(f"box {box} lies outside the {width}x{height} content image")
        return self._prompted(image, f"box {box}", bboxes=[x0, y0, x1, y1])

    def points(self, image: Image.Image, points, labels=None) -> torch.Tensor:
        points = _checked_points(points)
        labels = _checked_labels(labels, len(points)) if labels is not None else [1] * len(points)
        width, height = image.size
        # Points index pixels, so x == width is already outside (ultralytics would clamp it silently).
        outside = [p for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
        if outside:
            raise MaskError(f"points {outside} lie outside the {width}x{height} content image")
        return self._prompted(image, f"points {points} (labels {labels})", points=points, labels=labels)

    def text(self, image: Image.Image, prompt: str) -> torch.Tensor:
        if not prompt or not prompt.strip():
            raise MaskError("text prompt is empty")
        return self._prompted(image, f"text prompt '{prompt}'", texts=[prompt])

    def _prompted(self, image: Image.Image, what: str, **prompt) -> torch.Tensor:
        with torch_threads_kept():
            return self._prompted_by_fastsam(image, what, **prompt)

    def _prompted_by_fastsam(self, image: Image.Image, what: str, **prompt) -> torch.Tensor:
        everything = self._segment_everything(image)
        if len(everything[0]) == 0:
            raise self._nothing_found(what)
        predictor = self._fastsam().predictor
        # CLIP is loaded only here: it is large, and useless when FastSAM found nothing at all.
        predictor.text_scorer = self._text_scorer(predictor.device) if "texts" in prompt else None
        picked = predictor.prompt(everything, **prompt)[0]
        if len(picked) == 0 or picked.masks is None:
            raise self._nothing_found(what)
        return picked.masks.data.bool().any(dim=0).cpu()

    def _nothing_found(self, what: str) -> MaskError:
        return MaskError(
            f"FastSAM found no region for {what} (conf={self.config.conf}); "
            "try another prompt, a lower conf, or a mask file"
        )

    def _segment_everything(self, image: Image.Image) -> list:
        """ultralytics `Results` of FastSAM's segment-everything pass (ultralytics is imported lazily)."""
        model = self._fastsam()
        return model.predict(
            image.convert("RGB"),
            predictor=_text_prompt_predictor_class(),
            device=self.config.device,
            imgsz=self.config.imgsz,
            conf=self.config.conf,
            iou=self.config.iou,
            # Masks at the image's own resolution, so they line up with content pixels.
            retina_masks=True,
            verbose=False,
        )

    def _fastsam(self):
        if self._model is None:
            self._model = _load_fastsam(self.config.weights)
        return self._model

    def _text_scorer(self, device: torch.device) -> TransformersClipScorer:
        if self._scorer is None:
            model, processor = self._clip_parts or _load_clip(self.config.clip_model)
            # Same device as FastSAM: its crops can number in the hundreds.
            self._scorer = TransformersClipScorer(model, processor, device=device)
        return self._scorer


TINY_FASTSAM = "tiny"


def build_random_fastsam_weights(path, yaml_name: str = "yolov8n-seg.yaml", seed: int = 0) -> Path:
    """Save an ultralytics model built from one of its bundled yamls, with seeded random weights."""
    _prepare_offline_ultralytics()
    from ultralytics import YOLO

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        YOLO(yaml_name).save(str(path))
    finally:
        torch.random.set_rng_state(state)
    return Path(path)


def _load_fastsam(weights: str):
    if weights == TINY_FASTSAM:
        with tempfile.TemporaryDirectory(prefix="diffstyler-fastsam-") as folder:
            return _load_fastsam(str(build_random_fastsam_weights(Path(folder) / "tiny-fastsam.pt")))
    path = Path(weights).expanduser()
    if not path.is_file():
        # Checked here because ultralytics would otherwise try to download the file.
        raise FileNotFoundError(
            f"FastSAM weights file '{weights}' not found. Download the official FastSAM-s.pt or "
            f"FastSAM-x.pt from the ultralytics assets release ({FASTSAM_WEIGHTS_URL}FastSAM-s.pt), "
            "place it locally and point SegmenterConfig.weights at it."
        )
    _prepare_offline_ultralytics()
    from ultralytics import FastSAM

    with _weights_only_checkpoint_loading():
        model = FastSAM(str(path))
    if model.task != "segment":
        raise ValueError(f"'{weights}' is a '{model.task}' model; FastSAM needs a segmentation model")
    return model


_CHECKPOINT_LOADER_LOCK = threading.Lock()


@contextlib.contextmanager
def _weights_only_checkpoint_loading():
    """Make ultralytics load `.pt` checkpoints with `torch.load(weights_only=True)`.

    A `.pt` file is a pickle, and ultralytics fully unpickles it by default: a crafted weights file
    runs any code it likes. ultralytics has a restricted mode of its own (`torch_safe_load(...,
    safe_only=True)`: weights-only loading that allows exactly the globals a checkpoint names
    when they are ultralytics / torch.nn model classes, plus a few data types), but only as a
    per-call argument or a process-wide environment flag read at import. Its `load_checkpoint`
    (what `FastSAM(path)` calls) looks `torch_safe_load` up in its module, so for the duration of
    the load that name answers with the restricted mode. The model it returns is what the
    predictor later uses: the file is unpickled once, weights-only. (ultralytics registers the
    allowed classes with torch for the rest of the process: model classes and a getattr limited to
    their methods, nothing that runs arbitrary code.)
    """
    from ultralytics.nn import tasks

    # Restricted loading needs torch's checkpoint global scan; without it ultralytics would
    # silently fall back to a full unpickle.
    if not getattr(getattr(tasks, "_SafeLoad", None), "SUPPORTED", False):
        raise RuntimeError(
            "this torch / ultralytics cannot load FastSAM weights weights-only; refusing to unpickle them"
        )
    unrestricted = tasks.torch_safe_load

    def weights_only(weight, safe_only=None):
        try:
            return unrestricted(weight, safe_only=True)
        # TypeError: ultralytics' answer to a global outside its allow-list, a TorchScript archive
        # or a damaged file; ModuleNotFoundError: a module the checkpoint names is missing (in
        # restricted mode ultralytics does not install it).
        except (TypeError, ModuleNotFoundError) as error:
            raise UserError(
                "refused to load FastSAM weights",
                str(weight),
                f"{_refusal_reason(error)}; only ultralytics checkpoints made of known model classes are "
                "loaded (weights-only: no pickled code runs). Use the official FastSAM-s.pt or FastSAM-x.pt",
            ) from error

    with _CHECKPOINT_LOADER_LOCK:  # the patched name is process-wide
        tasks.torch_safe_load = weights_only
        try:
            yield
        finally:
            tasks.torch_safe_load = unrestricted


def _refusal_reason(error: BaseException) -> str:
    # torch names the first global outside the allow-list; ultralytics' own message around it
    # only recommends its detection models.
    match = re.search(r"Unsupported global: GLOBAL (\S+)", str(error.__cause__ or ""))
    if match:
        return f"it names {match.group(1)}, which is not an allowed model class"
    return " ".join(str(error).replace("ERROR ❌️", "").split())


def _load_clip(name: str):
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except OSError as err:
        raise OSError(
            f"cannot load the CLIP model '{name}' used for text masks: {err}. Set "
            "SegmenterConfig.clip_model to a local folder holding a transformers CLIP model and processor."
        ) from err


# --------------------------------------------------------------------------------------------
# From a spec to a soft mask
# --------------------------------------------------------------------------------------------


def resolve_mask(
    spec: MaskSpec,
    image: Image.Image,
    segmenter_factory: Optional[Callable[[], FastSAMSegmenter]] = None,
) -> torch.Tensor:
    """Float [H, W] mask in [0, 1] for `image` (the content image).

    `segmenter_factory` is called only for text/box/point specs, so file masks never load
    FastSAM; None means a segmenter with the default SegmenterConfig.
    """
    hard = _hard_mask(spec, image, segmenter_factory or (lambda: FastSAMSegmenter(SegmenterConfig())))
    return shape_mask(hard, spec)


def shape_mask(hard: torch.Tensor, spec: MaskSpec) -> torch.Tensor:
    """A hard mask shaped by the spec's options: invert, grow, (must not be empty), feather."""
    if spec.invert:
        hard = ~hard
    hard = grow_mask(hard, spec.grow)
    if not hard.any():
        steps = [step for step, used in (("inverted", spec.invert), (f"grow={spec.grow}", spec.grow)) if used]
        shaped = f" ({', '.join(steps)})" if steps else ""
        raise MaskError(f"the mask from {spec.describe()}{shaped} is empty: no pixel would be styled")
    return feather_mask(hard, spec.feather)


def hard_mask_from_image(mask, size: tuple[int, int], argument: str = "mask") -> torch.Tensor:
    """A mask given as a PIL image, an array or a tensor ([H, W] or [H, W, C]) as a bool [H, W] mask
    for a content of `size` = (width, height), by the rules of mask files (`load_mask_file`)."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if isinstance(mask, np.ndarray):
        if mask.ndim == 3 and mask.shape[-1] == 1:
            mask = mask[..., 0]
        if mask.ndim == 2:
            region = mask != 0
        elif mask.ndim == 3 and mask.shape[-1] in (3, 4):
            region = _nonzero_region(Image.fromarray(np.asarray(mask).astype(np.uint8) if mask.dtype == bool else mask))
        else:
            raise MaskError(f"{argument}: an array of shape {mask.shape} is not a mask; give [H, W] or [H, W, C]")
    elif isinstance(mask, Image.Image):
        region = _nonzero_region(mask)
    else:
        raise MaskError(f"{argument}: {type(mask).__name__} is not a mask image")
    return _resized_region(region, size)


def _resized_region(region: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    width, height = size
    if region.shape != (height, width):
        as_image = Image.fromarray(region.astype(np.uint8) * 255)
        region = np.asarray(as_image.resize((width, height), Image.Resampling.NEAREST)) > 0
    return torch.from_numpy(np.ascontiguousarray(region))


def _hard_mask(spec: MaskSpec, image: Image.Image, segmenter_factory) -> torch.Tensor:
    if spec.file is not None:
        return load_mask_file(spec.file, image.size)
    segmenter = segmenter_factory()
    if spec.text is not None:
        return segmenter.text(image, spec.text)
    if spec.box is not None:
        return segmenter.box(image, spec.box)
    return segmenter.points(image, spec.points, spec.point_labels)


def grow_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Dilate (pixels > 0) or erode (pixels < 0) a bool mask with a square of side 2|pixels|+1.

    A square keeps counts predictable: a k x k square becomes (k + 2n) x (k + 2n). Pixels beyond
    the image border are ignored (max-pool pads with -inf), so erosion does not eat a region
    from the image edge.
    """
    if pixels == 0:
        return mask.bool()
    n = abs(pixels)
    grid = mask.bool().float()[None, None]
    if pixels > 0:
        return (F.max_pool2d(grid, 2 * n + 1, stride=1, padding=n) > 0)[0, 0]
    outside = F.max_pool2d(1 - grid, 2 * n + 1, stride=1, padding=n)
    return (outside == 0)[0, 0]


def feather_mask(mask: torch.Tensor, pixels: int) -> torch.Tensor:
    """Soft edge of `pixels` px on each side of the region's border.

    Rule: each output pixel is the fraction of region pixels in the (2p+1) x (2p+1) square
    around it (a box blur). So a pixel whose every neighbour within p px (Chebyshev distance,
    inside the image) is region is exactly 1, a pixel with no region within p px is exactly 0,
    and only the band within p px of the border is in between. Outside the image the nearest
    edge pixel is repeated, so a region touching the border stays 1 there. Counts are summed in
    integers, which makes 0 and 1 exact rather than merely close.
    """
    hard = mask.bool()
    if pixels == 0:
        return hard.float()
    p = pixels
    counts = hard.to(torch.int64)
    for dim in (0, 1):
        counts = _window_sums(counts, p, dim)
    return counts.float() / float((2 * p + 1) ** 2)


def _window_sums(values: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    # Sum of the 2r+1 values centred on each position along `dim`, edges replicated.
    length = values.shape[dim]
    index = torch.arange(-radius, length + radius).clamp(0, length - 1)
    padded = values.index_select(dim, index)
    cumulative = torch.cumsum(padded, dim=dim)
    zero = torch.zeros_like(cumulative.narrow(dim, 0, 1))
    cumulative = torch.cat([zero, cumulative], dim=dim)
    window = 2 * radius + 1
    return cumulative.narrow(dim, window, length) - cumulative.narrow(dim, 0, length)


# --------------------------------------------------------------------------------------------
# Latent grid and saving
# --------------------------------------------------------------------------------------------


def mask_to_latent(mask: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Float 0/1 [h, w] mask on the latent grid (the image is 8x larger in each direction).

    A latent cell is inside if ANY pixel of its window has mask > 0, so the styled latent region
    covers the whole pixel mask including its feathered band; pixels outside the mask are put
    back from the content image afterwards. The windows are those of area interpolation
    (adaptive pooling): exactly the 8 x 8 block when the image is 8x the latent size.
    """
    h, w = (int(v) for v in latent_hw)
    if h <= 0 or w <= 0:
        raise ValueError(f"latent size must be positive, got {latent_hw!r}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be [H, W], got shape {tuple(mask.shape)}")
    # Max over the window is "any > 0" without the underflow an average of tiny values could hit.
    pooled = F.adaptive_max_pool2d(mask.float()[None, None], (h, w))[0, 0]
    return (pooled > 0).float()


def save_mask_png(mask: torch.Tensor, path, text_chunks: Optional[dict[str, str]] = None) -> None:
    """Write `mask` ([H, W], values in [0, 1]) as an 8-bit greyscale PNG (0..255), atomically, with
    optional PNG text chunks (`outputs.atomic_save`)."""
    pixels = (mask.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    atomic_save(Image.fromarray(pixels), path, text_chunks)
