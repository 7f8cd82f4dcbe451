"""Mask sources, mask shaping, the latent-grid rule, and FastSAM prompts (offline)."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler import masks
from diffstyler.errors import UserError
from diffstyler.masks import (
    FastSAMSegmenter,
    MaskError,
    MaskSpec,
    SegmenterConfig,
    TransformersClipScorer,
    load_mask_file,
    mask_to_latent,
    resolve_mask,
    save_mask_png,
)
from tests.fixtures_masks import build_random_segment_weights, build_tiny_clip_folder, scene_image

# FastSAM tests: 80x48 scene, network input 64 px. Random weights only give instances with a
# confidence threshold near zero.
IMGSZ = 64
LOW_CONF = 1e-6


# --------------------------------------------------------------------------------------------
# Shared fixtures (session scope lives here: tests/conftest.py belongs to someone else)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def ultralytics_env(tmp_path_factory):
    """Keep ultralytics' settings file inside the test's temp dir, and never go online."""
    base = tmp_path_factory.mktemp("ultralytics_env")
    wanted = {
        "YOLO_OFFLINE": "1",
        "YOLO_AUTOINSTALL": "0",
        "YOLO_CONFIG_DIR": str(base / "config"),
        "MPLCONFIGDIR": str(base / "mpl"),
    }
    saved = {key: os.environ.get(key) for key in wanted}
    for key, value in wanted.items():
        os.environ.setdefault(key, value)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def seg_weights(tmp_path_factory, ultralytics_env) -> Path:
    return build_random_segment_weights(tmp_path_factory.mktemp("fastsam") / "tiny-seg.pt")


@pytest.fixture(scope="session")
def clip_folder(tmp_path_factory) -> Path:
    return build_tiny_clip_folder(tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def segmenter(seg_weights, clip_folder) -> FastSAMSegmenter:
    return FastSAMSegmenter(tiny_config(seg_weights, clip_model=str(clip_folder)))


def tiny_config(weights: Path, **changes) -> SegmenterConfig:
    settings = dict(weights=str(weights), device="cpu", imgsz=IMGSZ, conf=LOW_CONF)
    return SegmenterConfig(**{**settings, **changes})


@pytest.fixture(scope="session")
def image() -> Image.Image:
    return scene_image(80, 48)


@pytest.fixture(scope="session")
def raw_instances(seg_weights, image) -> torch.Tensor:
    """Every instance FastSAM finds in the scene, straight from ultralytics, as bool [N, H, W]."""
    from ultralytics import FastSAM

    result = FastSAM(str(seg_weights)).predict(
        image, device="cpu", imgsz=IMGSZ, conf=LOW_CONF, iou=0.9, retina_masks=True, verbose=False
    )[0]
    assert len(result) > 5, "the random model should give several instances at this threshold"
    return result.masks.data.bool()


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def square_mask_file(tmp_path: Path, size: int = 64, top: int = 20, side: int = 10) -> Path:
    pixels = np.zeros((size, size), np.uint8)
    pixels[top : top + side, top : top + side] = 255
    return write_png(tmp_path / "square.png", pixels)


def no_segmenter():
    raise AssertionError("a file mask must not build a segmenter")


# --------------------------------------------------------------------------------------------
# MaskSpec
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "exactly one of file, text, box, points (got: none)"),
        ({"file": "a.png", "text": "dog"}, "(got: file, text)"),
        ({"box": [1, 2, 3]}, "4 numbers"),
        ({"box": [10, 0, 5, 8]}, "x0 < x1 and y0 < y1"),
        ({"box": [0, 8, 5, 8]}, "x0 < x1 and y0 < y1"),
        ({"points": [[1, 2], [3, 4]], "point_labels": [1]}, "point_labels has 1 entries but there are 2 points"),
        ({"points": [[1, 2]], "point_labels": [2]}, "1 (positive) or 0 (negative)"),
        ({"points": [[1, 2, 3]]}, "each point must be [x, y]"),
        ({"text": "  "}, "text prompt is empty"),
        ({"file": "a.png", "feather": -1}, "feather must be"),
    ],
)
def test_mask_spec_rejects_bad_input(kwargs, message):
    with pytest.raises(ValueError) as info:
        MaskSpec(**kwargs)
    assert message in str(info.value)


def test_mask_spec_normalises_numbers():
    spec = MaskSpec(box=[1, 2, 30, 40.5])
    assert spec.box == [1.0, 2.0, 30.0, 40.5]
    assert spec.describe() == "box [1.0, 2.0, 30.0, 40.5]"
    assert MaskSpec(points=[[3, 4]]).describe() == "points [[3.0, 4.0]] (labels [1])"


# --------------------------------------------------------------------------------------------
# Mask files
# --------------------------------------------------------------------------------------------


def test_rgb_file_any_nonzero_channel_is_region(tmp_path):
    pixels = np.zeros((48, 80, 3), np.uint8)
    pixels[5:15, 10:30] = (255, 0, 0)
    pixels[40, 70] = (0, 0, 1)  # very dark: luminance rounds it to 0, but it is nonzero
    mask = load_mask_file(write_png(tmp_path / "rgb.png", pixels), (80, 48))
    assert mask.dtype == torch.bool and mask.shape == (48, 80)
    assert int(mask.sum()) == 10 * 20 + 1
    assert bool(mask[40, 70]) and bool(mask[5, 10]) and not bool(mask[15, 10])


def test_grayscale_file(tmp_path):
    pixels = np.zeros((48, 80), np.uint8)
    pixels[0:4, 0:80] = 7
    mask = load_mask_file(write_png(tmp_path / "gray.png", pixels), (80, 48))
    assert mask.shape == (48, 80)
    assert int(mask.sum()) == 4 * 80
    assert bool(mask[:4].all()) and not bool(mask[4:].any())


def test_file_of_another_size_is_resized_nearest(tmp_path):
    small = np.zeros((24, 40), np.uint8)
    small[5:10, 10:20] = 255
    mask = load_mask_file(write_png(tmp_path / "half.png", small), (80, 48))
    expected = torch.zeros(48, 80, dtype=torch.bool)
    expected[10:20, 20:40] = True
    assert torch.equal(mask, expected)


def test_rgba_with_used_alpha_follows_alpha(tmp_path):
    pixels = np.full((16, 16, 4), 255, np.uint8)  # white everywhere ...
    pixels[..., 3] = 0  # ... but transparent
    pixels[4:8, 4:12] = (0, 0, 0, 255)  # an opaque black cut-out
    mask = load_mask_file(write_png(tmp_path / "cutout.png", pixels), (16, 16))
    assert int(mask.sum()) == 4 * 8 and bool(mask[4:8, 4:12].all())


def test_rgba_fully_opaque_follows_colour(tmp_path):
    pixels = np.zeros((16, 16, 4), np.uint8)
    pixels[..., 3] = 255
    pixels[0:2, :, 0] = 200
    mask = load_mask_file(write_png(tmp_path / "opaque.png", pixels), (16, 16))
    assert int(mask.sum()) == 2 * 16


def test_missing_and_non_image_files_raise_mask_error_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.png"
    with pytest.raises(MaskError, match="nowhere.png"):
        load_mask_file(missing, (8, 8))
    text_file = tmp_path / "notes.png"
    text_file.write_text("this is not an image")
    with pytest.raises(MaskError, match="notes.png.*not a readable image"):
        load_mask_file(text_file, (8, 8))
    assert issubclass(MaskError, ValueError)


# --------------------------------------------------------------------------------------------
# Shaping: invert, grow, feather, emptiness
# --------------------------------------------------------------------------------------------


def content(size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size)


def test_file_mask_resolves_without_segmenter(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path))), content(), no_segmenter)
    assert mask.dtype == torch.float32 and mask.shape == (64, 64)
    assert float(mask.sum()) == 100.0 and set(mask.unique().tolist()) == {0.0, 1.0}


def test_invert(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), invert=True), content(), no_segmenter)
    assert float(mask.sum()) == 64 * 64 - 100
    assert float(mask[25, 25]) == 0.0 and float(mask[0, 0]) == 1.0


@pytest.mark.parametrize("grow, side", [(3, 16), (1, 12), (-3, 4), (-4, 2)])
def test_grow_and_shrink_a_square_exactly(tmp_path, grow, side):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), grow=grow), content(), no_segmenter)
    assert float(mask.sum()) == side * side
    start = 20 - grow
    assert bool((mask[start : start + side, start : start + side] == 1).all())


def test_erosion_does_not_eat_from_the_image_border(tmp_path):
    path = square_mask_file(tmp_path, top=0, side=10)
    mask = resolve_mask(MaskSpec(file=str(path), grow=-2), content(), no_segmenter)
    assert float(mask.sum()) == 8 * 8 and float(mask[0, 0]) == 1.0


def test_grow_after_invert(tmp_path):
    # Inverting then growing the outside by 2 shrinks the hole from 10x10 to 6x6.
    spec = MaskSpec(file=str(square_mask_file(tmp_path)), invert=True, grow=2)
    assert float(resolve_mask(spec, content(), no_segmenter).sum()) == 64 * 64 - 36


def test_feather_band_and_exact_values(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), feather=4), content(), no_segmenter)
    # Exactly 1 only where everything within 4 px is region: rows/cols 24..25 of the 20..29 square.
    assert torch.equal(mask == 1, _square(64, 24, 2))
    # Exactly 0 further than 4 px outside: nonzero only on rows/cols 16..33.
    assert torch.equal(mask > 0, _square(64, 16, 18))
    band = (mask > 0) & (mask < 1)
    assert int(band.sum()) == 18 * 18 - 4
    # The corner pixel sees 5x5 region pixels of its 9x9 window.
    assert float(mask[20, 20]) == pytest.approx(25 / 81, abs=1e-7)
    assert float(mask[24, 20]) == pytest.approx(45 / 81, abs=1e-7)


def test_feather_keeps_a_region_at_the_image_edge_fully_on(tmp_path):
    path = square_mask_file(tmp_path, top=0, side=10)
    mask = resolve_mask(MaskSpec(file=str(path), feather=3), content(), no_segmenter)
    assert float(mask[0, 0]) == 1.0 and float(mask[6, 6]) == 1.0 and float(mask[7, 7]) < 1.0


def _square(size: int, start: int, side: int) -> torch.Tensor:
    grid = torch.zeros(size, size, dtype=torch.bool)
    grid[start : start + side, start : start + side] = True
    return grid


def test_empty_masks_raise_naming_the_source(tmp_path):
    black = write_png(tmp_path / "black.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(MaskError, match=r"mask file '.*black\.png'.* is empty"):
        resolve_mask(MaskSpec(file=str(black)), content((8, 8)), no_segmenter)
    white = write_png(tmp_path / "white.png", np.full((8, 8), 255, np.uint8))
    with pytest.raises(MaskError, match=r"white\.png' \(inverted\) is empty"):
        resolve_mask(MaskSpec(file=str(white), invert=True), content((8, 8)), no_segmenter)
    with pytest.raises(MaskError, match=r"square\.png' \(grow=-5\) is empty"):
        resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), grow=-5), content(), no_segmenter)


# --------------------------------------------------------------------------------------------
# Latent grid and saving
# --------------------------------------------------------------------------------------------


def test_mask_to_latent_non_square_any_pixel_rule():
    mask = torch.zeros(64, 96)  # H=64, W=96 -> latent 8 x 12
    mask[10:30, 17:40] = 1.0
    mask[63, 95] = 1e-30  # one faint pixel still claims its whole cell
    latent = mask_to_latent(mask, (8, 12))
    expected = torch.zeros(8, 12)
    expected[1:4, 2:5] = 1.0  # rows 8..31 and cols 16..39 hold the rectangle's pixels
    expected[7, 11] = 1.0
    assert latent.dtype == torch.float32
    assert torch.equal(latent, expected)


def test_mask_to_latent_covers_feathered_band(tmp_path):
    mask = resolve_mask(MaskSpec(file=str(square_mask_file(tmp_path)), feather=4), content(), no_segmenter)
    latent = mask_to_latent(mask, (8, 8))
    expected = torch.zeros(8, 8)
    expected[2:5, 2:5] = 1.0  # nonzero pixels 16..33 touch cells 2, 3, 4
    assert torch.equal(latent, expected)


def test_mask_to_latent_rejects_bad_shapes():
    with pytest.raises(ValueError, match="positive"):
        mask_to_latent(torch.ones(16, 16), (0, 2))
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_to_latent(torch.ones(1, 16, 16), (2, 2))


def test_save_mask_png_roundtrip_atomically(tmp_path):
    mask = torch.tensor([[0.0, 0.5, 1.0], [1.0, 0.25, 0.0]])
    target = tmp_path / "out" / "mask.png"
    save_mask_png(mask, target)
    save_mask_png(mask.flip(1), target)  # overwrite in place
    with Image.open(target) as saved:
        assert saved.mode == "L"
        assert np.asarray(saved).tolist() == [[255, 128, 0], [0, 64, 255]]
    assert sorted(p.name for p in target.parent.iterdir()) == ["mask.png"]  # no temp file left


# --------------------------------------------------------------------------------------------
# FastSAM through ultralytics (real architecture, random weights)
# --------------------------------------------------------------------------------------------


def test_random_weights_load_as_fastsam_segment_model(seg_weights):
    from ultralytics import FastSAM

    assert FastSAM(str(seg_weights)).task == "segment"


def test_offline_switches_keep_ultralytics_out_of_the_home_folder(monkeypatch, tmp_path):
    import tempfile

    for key in ("YOLO_OFFLINE", "YOLO_AUTOINSTALL", "YOLO_CONFIG_DIR", "MPLCONFIGDIR"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("MPLCONFIGDIR", "/somewhere/else")  # an explicit choice is kept
    masks._prepare_offline_ultralytics()
    assert os.environ["YOLO_OFFLINE"] == "1"
    assert os.environ["YOLO_AUTOINSTALL"] == "0"
    assert os.environ["YOLO_CONFIG_DIR"] == str(tmp_path / "diffstyler" / "ultralytics")
    assert os.environ["MPLCONFIGDIR"] == "/somewhere/else"


def test_box_prompt_picks_the_best_iou_instance(segmenter, image, raw_instances):
    box = [10, 8, 35, 30]
    mask = segmenter.box(image, box)
    assert mask.dtype == torch.bool and mask.shape == (48, 80)
    inside = raw_instances[:, 8:30, 10:35].sum(dim=(1, 2)).float()
    iou = inside / (25 * 22 + raw_instances.sum(dim=(1, 2)).float() - inside)
    matches = [i for i in range(len(raw_instances)) if torch.equal(raw_instances[i], mask)]
    assert matches, "the box mask must be one of FastSAM's instances"
    assert float(iou[matches[0]]) == pytest.approx(float(iou.max()))


def test_point_prompts_merge_instances_with_positive_and_without_negative(segmenter, image, raw_instances):
    x, y = 20, 15
    with_positive = raw_instances[:, y, x]
    mask = segmenter.points(image, [[x, y]])
    assert mask.shape == (48, 80) and mask.dtype == torch.bool
    assert torch.equal(mask, raw_instances[with_positive].any(dim=0))

    # A negative point that the smallest instance under the positive point leaves out, but other
    # instances under it cover: those must drop out of the merged mask.
    smallest = min(with_positive.nonzero().flatten().tolist(), key=lambda i: int(raw_instances[i].sum()))
    ny, nx = (raw_instances[with_positive].any(0) & ~raw_instances[smallest]).nonzero()[0].tolist()
    mask = segmenter.points(image, [[x, y], [nx, ny]], [1, 0])
    chosen = with_positive & ~raw_instances[:, ny, nx]
    assert 0 < int(chosen.sum()) < int(with_positive.sum())
    assert torch.equal(mask, raw_instances[chosen].any(dim=0))
    assert not bool(mask[ny, nx])


def test_box_and_points_through_resolve_mask(segmenter, image):
    mask = resolve_mask(MaskSpec(box=[10, 8, 35, 30], grow=1), image, lambda: segmenter)
    assert mask.shape == (48, 80) and mask.dtype == torch.float32
    assert torch.equal(mask, masks.grow_mask(segmenter.box(image, [10, 8, 35, 30]), 1).float())


@pytest.mark.parametrize("box", [[70, 10, 90, 30], [-1, 0, 10, 10], [0, 0, 80, 49]])
def test_box_outside_the_image(segmenter, image, box):
    with pytest.raises(MaskError, match=r"box \[.*\] lies outside the 80x48 content image"):
        segmenter.box(image, box)


def test_point_outside_the_image(segmenter, image):
    with pytest.raises(MaskError, match=r"points \[\[80.0, 5.0\]\] lie outside the 80x48"):
        segmenter.points(image, [[10, 5], [80, 5]])


def test_no_detection_names_the_prompt(seg_weights, image):
    strict = FastSAMSegmenter(tiny_config(seg_weights, conf=0.99))
    with pytest.raises(MaskError, match=r"no region for box \[1, 2, 30, 40\]"):
        strict.box(image, [1, 2, 30, 40])
    with pytest.raises(MaskError, match=r"no region for text prompt 'a dog'"):
        resolve_mask(MaskSpec(text="a dog"), image, lambda: strict)


def test_missing_weights_file_names_it(tmp_path, image):
    missing = tmp_path / "FastSAM-x.pt"
    segmenter = FastSAMSegmenter(SegmenterConfig(weights=str(missing)))
    with pytest.raises(FileNotFoundError) as info:
        segmenter.box(image, [0, 0, 10, 10])
    assert str(missing) in str(info.value)
    assert "ultralytics/assets/releases" in str(info.value)


class TouchOnUnpickle:
    """A stand-in for a malicious checkpoint object: unpickling it creates `marker` (a harmless side
    effect that proves code ran; a real attack would run a shell command the same way)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def write_code_running_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": TouchOnUnpickle(marker), "train_args": {}}, path)
    return path


def test_the_crafted_checkpoint_runs_code_when_fully_unpickled(tmp_path):
    # Guards the next test: its payload must be live, or "no marker" would prove nothing.
    marker = tmp_path / "ran"
    torch.load(write_code_running_checkpoint(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.exists()


def test_fastsam_weights_that_run_code_are_refused_without_running_it(tmp_path, ultralytics_env, image):
    marker = tmp_path / "code-ran"
    weights = write_code_running_checkpoint(tmp_path / "FastSAM-s.pt", marker)
    with pytest.raises(Exception) as info:
        FastSAMSegmenter(SegmenterConfig(weights=str(weights), device="cpu")).box(image, [0, 0, 10, 10])
    assert not marker.exists(), "unpickling the weights ran code"
    assert isinstance(info.value, UserError), repr(info.value)
    message = str(info.value)
    assert str(weights) in message and "\n" not in message


@pytest.fixture
def torch_load_flags(monkeypatch) -> list:
    """The `weights_only` argument of every torch.load call made while the test runs."""
    real_load = torch.load
    flags = []

    def recording_load(*args, **kwargs):
        flags.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    return flags


def test_fastsam_weights_are_only_ever_loaded_weights_only(seg_weights, image, torch_load_flags):
    # Loading and predicting (the predictor sets itself up from the loaded model) must never
    # unpickle the file again with full pickle.
    FastSAMSegmenter(tiny_config(seg_weights)).box(image, [10, 8, 35, 30])
    assert torch_load_flags == [True]


def test_reserved_tiny_fastsam_loads_through_the_safe_path(ultralytics_env, torch_load_flags):
    assert masks._load_fastsam(masks.TINY_FASTSAM).task == "segment"
    assert torch_load_flags == [True]


def test_detection_weights_are_refused(tmp_path, ultralytics_env, image):
    weights = build_random_segment_weights(tmp_path / "det.pt", "yolov8n.yaml")
    with pytest.raises(ValueError, match="'detect' model"):
        FastSAMSegmenter(SegmenterConfig(weights=str(weights))).box(image, [0, 0, 10, 10])


# --------------------------------------------------------------------------------------------
# Text prompts with a transformers CLIP
# --------------------------------------------------------------------------------------------


def kept_for_text(raw_instances: torch.Tensor) -> list[int]:
    """Instances FastSAM's text prompt scores: it skips those of 100 pixels or fewer."""
    return [i for i in range(len(raw_instances)) if int(raw_instances[i].sum()) > 100]


def test_text_prompt_with_tiny_clip_from_a_local_folder(segmenter, image, raw_instances, monkeypatch):
    calls = []
    real_call = TransformersClipScorer.__call__

    def recording(self, images, texts):
        scores = real_call(self, images, texts)
        calls.append((len(images), list(texts), scores))
        return scores

    monkeypatch.setattr(TransformersClipScorer, "__call__", recording)
    mask = segmenter.text(image, "a dog")
    assert mask.dtype == torch.bool and mask.shape == (48, 80)
    (n_crops, texts, scores), = calls
    keep = kept_for_text(raw_instances)
    assert texts == ["a dog"] and n_crops == len(keep) and scores.shape == (1, len(keep))
    assert torch.equal(mask, raw_instances[keep[int(scores.argmax())]])


def test_text_prompt_picks_the_crop_the_scores_say(segmenter, image, raw_instances, monkeypatch):
    keep = kept_for_text(raw_instances)
    natural = masks.resolve_mask(MaskSpec(text="a cat"), image, lambda: segmenter) > 0
    # Choose a crop whose mask differs from the natural winner, and make it score highest.
    chosen = next(j for j in reversed(range(len(keep))) if not torch.equal(raw_instances[keep[j]], natural))
    real_call = TransformersClipScorer.__call__

    def controlled(self, images, texts):
        scores = torch.zeros_like(real_call(self, images, texts))
        scores[0, chosen] = 1.0
        return scores

    monkeypatch.setattr(TransformersClipScorer, "__call__", controlled)
    mask = segmenter.text(image, "a cat")
    assert torch.equal(mask, raw_instances[keep[chosen]])


def load_clip(folder: Path):
    from transformers import CLIPModel, CLIPProcessor

    return CLIPModel.from_pretrained(str(folder)), CLIPProcessor.from_pretrained(str(folder))


def test_scorer_gives_cosine_similarities(clip_folder):
    model, processor = load_clip(clip_folder)
    scorer = TransformersClipScorer(model, processor)
    crops = [Image.new("RGB", (20, 12), colour) for colour in ("red", "blue", "white")]
    scores = scorer(crops, ["a dog", "a cat"])
    assert scores.shape == (2, 3)
    assert bool((scores.abs() <= 1 + 1e-5).all())
    # The same crop twice scores the same.
    again = scorer([crops[1], crops[1]], ["a dog"])
    assert float(again[0, 0]) == pytest.approx(float(scores[0, 1]), abs=1e-5)


def test_injected_clip_is_used_without_loading(seg_weights, clip_folder, image, monkeypatch):
    model, processor = load_clip(clip_folder)
    config = tiny_config(seg_weights, clip_model="/does/not/exist")
    injected = FastSAMSegmenter(config, clip_model=model, clip_processor=processor)
    mask = injected.text(image, "a dog")
    assert mask.shape == (48, 80)
    with pytest.raises(OSError, match="/does/not/exist"):
        FastSAMSegmenter(config).text(image, "a dog")
    with pytest.raises(ValueError, match="together"):
        FastSAMSegmenter(config, clip_model=model)


def test_a_fastsam_mask_leaves_torch_its_thread_count(seg_weights, image):
    """ultralytics' device selection sets torch's threads to min(8, cpus - 1) for the whole process.
    Catches a run that, after its first mask, denoises on other threads (slower, other float sums)."""
    from ultralytics.utils import NUM_THREADS

    before = torch.get_num_threads()
    torch.set_num_threads(NUM_THREADS + 1)
    try:
        FastSAMSegmenter(tiny_config(seg_weights)).box(image, [10, 8, 35, 30])
        assert torch.get_num_threads() == NUM_THREADS + 1
    finally:
        torch.set_num_threads(before)
