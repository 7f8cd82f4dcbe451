"""FastSAM: text, box and point prompts answered by ultralytics, fully offline.

Weights come from a local file and are loaded weights-only (no pickled code runs); text scoring
uses a transformers CLIP instead of OpenAI's `clip` package (which ultralytics would otherwise
import and download). `check_segmenter` fails on missing or unusable weights before any model
loads.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError
from PIL import Image

from diffstyler.errors import MissingFileError, UserError, first_line
from diffstyler.masks.spec import MaskError, SegmenterConfig, check_box_inside, check_points_inside

FASTSAM_WEIGHTS_URL = "https://github.com/ultralytics/assets/releases/download/v8.4.0/"
TINY_FASTSAM = "tiny"
WEIGHTS_KEY = "model.segmenter.weights"
CLIP_KEY = "model.segmenter.clip_model"


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
        checked = check_box_inside(box, image.size)
        return self._prompted(image, f"box {box}", bboxes=checked)

    def points(self, image: Image.Image, points, labels=None) -> torch.Tensor:
        points, labels, source = check_points_inside(points, labels, image.size)
        return self._prompted(image, source, points=points, labels=labels)

    def text(self, image: Image.Image, prompt: str) -> torch.Tensor:
        if not prompt or not prompt.strip():
            raise MaskError("empty text prompt", f"text prompt '{prompt}'", "give words that describe the region")
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
            "FastSAM found no region", what,
            f"nothing above model.segmenter.conf={self.config.conf}; try another prompt, a lower conf, or a mask file",
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


# --------------------------------------------------------------------------------------------
# Checks before any model loads
# --------------------------------------------------------------------------------------------


def check_segmenter(config: SegmenterConfig, text_prompts: bool) -> None:
    """Fail now, with the one-line UserError a mask would fail with later, if FastSAM's weights are
    missing, unreadable or not loadable weights-only, or (only when `text_prompts` are used) the
    CLIP model cannot be found. Meant to run before any model loads: it loads the FastSAM weights
    once (weights-only, as the masks will) but not CLIP's."""
    if config.weights != TINY_FASTSAM:  # built in memory: nothing on disk to check
        _load_fastsam(config.weights)
    if text_prompts:
        check_clip_model(config.clip_model)


# --------------------------------------------------------------------------------------------
# FastSAM weights
# --------------------------------------------------------------------------------------------


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
    path = _readable_weights_file(weights)
    _prepare_offline_ultralytics()
    from ultralytics import FastSAM

    with _weights_only_checkpoint_loading():
        model = FastSAM(str(path))
    if model.task != "segment":
        raise UserError(
            f"'{weights}' is a '{model.task}' model", WEIGHTS_KEY,
            "FastSAM needs a segmentation model: use the official FastSAM-s.pt or FastSAM-x.pt",
        )
    return model


def _readable_weights_file(weights: str) -> Path:
    """The weights file, checked here because ultralytics would otherwise try to download a
    missing one, and fails on other names with an assertion."""
    path = Path(weights).expanduser()
    if not path.exists():
        raise MissingFileError(
            f"FastSAM weights file '{weights}' not found", WEIGHTS_KEY,
            f"download the official FastSAM-s.pt or FastSAM-x.pt from the ultralytics assets release "
            f"({FASTSAM_WEIGHTS_URL}FastSAM-s.pt), place it locally and set {WEIGHTS_KEY} to its path",
        )
    if not path.is_file() or path.suffix != ".pt":
        raise UserError(
            f"FastSAM weights '{weights}' are not a .pt file", WEIGHTS_KEY, "give the FastSAM-s.pt or FastSAM-x.pt file"
        )
    try:
        with path.open("rb") as file:
            is_archive = zipfile.is_zipfile(file)
    except OSError as error:
        raise UserError(f"cannot read the FastSAM weights file '{weights}'", WEIGHTS_KEY, error.strerror or str(error)) from error
    if not is_archive:
        # torch saves checkpoints as zip archives; torch's weights-only unpickler fails on some
        # other bytes with errors that ultralytics does not turn into its own.
        raise UserError(
            f"FastSAM weights file '{weights}' is not a torch checkpoint", WEIGHTS_KEY,
            "it is not the zip archive torch.save writes: re-download FastSAM-s.pt or FastSAM-x.pt",
        )
    return path


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
                f"refused to load the FastSAM weights '{weight}'",
                WEIGHTS_KEY,
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


# --------------------------------------------------------------------------------------------
# The CLIP model for text prompts
# --------------------------------------------------------------------------------------------

CLIP_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_clip_model(name: str) -> None:
    """Fail as loading the CLIP model `name` (a local folder or a Hugging Face model id) would, but
    without loading it: its config must describe a CLIP model and a weights file must be there. A
    model id is looked up in the local Hugging Face cache when HF_HUB_OFFLINE is set; otherwise it
    is downloaded when first used, and nothing is checked now."""
    folder = Path(name).expanduser()
    wanted = ("config.json", *CLIP_WEIGHT_FILES)
    if folder.is_dir():
        files = {filename: folder / filename for filename in wanted if (folder / filename).is_file()}
        lacking = "the folder has no"
    elif is_offline_mode():
        files = _cached_files(name, wanted)
        lacking = "no such folder, and the local Hugging Face cache (HF_HUB_OFFLINE is set) holds no"
    else:
        return
    if "config.json" not in files:
        raise _clip_error(name, f"{lacking} config.json")
    try:
        model_type = json.loads(files["config.json"].read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise _clip_error(name, f"its config.json cannot be read: {first_line(error)}") from error
    if model_type != "clip":
        raise _clip_error(name, f"its config.json describes a '{model_type}' model, not a CLIP model")
    if not any(filename in files for filename in CLIP_WEIGHT_FILES):
        raise _clip_error(name, f"{lacking} weights file ({' or '.join(CLIP_WEIGHT_FILES)})")


def _cached_files(model_id: str, filenames: tuple[str, ...]) -> dict[str, Path]:
    """Those of `filenames` that the local Hugging Face cache holds for `model_id` (none when
    `model_id` is not a valid model id, e.g. a path to a missing folder)."""
    try:
        found = {filename: try_to_load_from_cache(model_id, filename) for filename in filenames}
    except HFValidationError:
        return {}
    # Besides a path, the look-up answers None (not cached) or a marker (known not to exist).
    return {filename: Path(path) for filename, path in found.items() if isinstance(path, str)}


def _load_clip(name: str):
    from transformers import CLIPModel, CLIPProcessor

    try:
        return CLIPModel.from_pretrained(name), CLIPProcessor.from_pretrained(name)
    except OSError as error:
        raise _clip_error(name, first_line(error)) from error


def _clip_error(name: str, why: str) -> UserError:
    return UserError(
        f"cannot load the CLIP model '{name}' for text masks",
        CLIP_KEY,
        f"{why}. Set {CLIP_KEY} to a local folder holding a transformers CLIP model and processor, or "
        "download the model into the Hugging Face cache first (with HF_HUB_OFFLINE=1 only cached models load)",
    )
