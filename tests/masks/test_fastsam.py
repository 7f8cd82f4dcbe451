"""FastSAM prompts offline (real architecture, random weights), text scoring with a transformers
CLIP, weights-only loading, and the checks before any model loads."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from PIL import Image

from diffstyler.errors import MissingFileError, UserError
from diffstyler.masks import (
    FastSAMSegmenter,
    MaskError,
    MaskSpec,
    SegmenterConfig,
    TransformersClipScorer,
    check_segmenter,
    grow_mask,
    resolve_mask,
)
from diffstyler.masks import fastsam
from tests.masks.fixtures import build_random_segment_weights, tiny_config

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
    fastsam._prepare_offline_ultralytics()
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
    assert torch.equal(mask, grow_mask(segmenter.box(image, [10, 8, 35, 30]), 1).float())


@pytest.mark.parametrize("box", [[70, 10, 90, 30], [-1, 0, 10, 10], [0, 0, 80, 49]])
def test_box_outside_the_image(segmenter, image, box):
    with pytest.raises(MaskError, match=r"^box outside the content image \(box \[.*\]\): the content image is 80x48 pixels$"):
        segmenter.box(image, box)


def test_point_outside_the_image(segmenter, image):
    with pytest.raises(MaskError, match=r"points \[\[80.0, 5.0\]\] lie outside the 80x48"):
        segmenter.points(image, [[10, 5], [80, 5]])


def test_no_detection_names_the_prompt(seg_weights, image):
    strict = FastSAMSegmenter(tiny_config(seg_weights, conf=0.99))
    with pytest.raises(MaskError, match=r"^FastSAM found no region \(box \[1, 2, 30, 40\]\): .*conf=0.99"):
        strict.box(image, [1, 2, 30, 40])
    with pytest.raises(MaskError, match=r"^FastSAM found no region \(text prompt 'a dog'\)"):
        resolve_mask(MaskSpec(text="a dog"), image, lambda: strict)


def test_missing_weights_file_names_it(tmp_path, image):
    missing = tmp_path / "FastSAM-x.pt"
    segmenter = FastSAMSegmenter(SegmenterConfig(weights=str(missing)))
    with pytest.raises(MissingFileError) as info:
        segmenter.box(image, [0, 0, 10, 10])
    assert info.value.where == "model.segmenter.weights"
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
    assert info.value.where == "model.segmenter.weights"


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
    assert fastsam._load_fastsam(fastsam.TINY_FASTSAM).task == "segment"
    assert torch_load_flags == [True]


def test_detection_weights_are_refused(tmp_path, ultralytics_env, image):
    weights = build_random_segment_weights(tmp_path / "det.pt", "yolov8n.yaml")
    with pytest.raises(UserError, match="'detect' model") as info:
        FastSAMSegmenter(SegmenterConfig(weights=str(weights))).box(image, [0, 0, 10, 10])
    assert info.value.where == "model.segmenter.weights"


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
    natural = resolve_mask(MaskSpec(text="a cat"), image, lambda: segmenter) > 0
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


@pytest.mark.slow
def test_injected_clip_is_used_without_loading(seg_weights, clip_folder, image, monkeypatch):
    model, processor = load_clip(clip_folder)
    config = tiny_config(seg_weights, clip_model="/does/not/exist")
    injected = FastSAMSegmenter(config, clip_model=model, clip_processor=processor)
    mask = injected.text(image, "a dog")
    assert mask.shape == (48, 80)
    with pytest.raises(UserError, match="/does/not/exist") as info:
        FastSAMSegmenter(config).text(image, "a dog")
    assert info.value.where == "model.segmenter.clip_model" and "\n" not in str(info.value)
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


# --------------------------------------------------------------------------------------------
# Checks before any model loads
# --------------------------------------------------------------------------------------------


def one_line_error(info, key: str) -> str:
    assert isinstance(info.value, UserError), repr(info.value)
    message = str(info.value)
    assert info.value.where == key and "\n" not in message, message
    return message


def test_usable_segmenter_settings_pass_the_check(seg_weights, clip_folder):
    """Catches a check that refuses what the masks would load: random-weight FastSAM weights, the
    reserved `tiny`, and a CLIP folder holding config and weights."""
    check_segmenter(tiny_config(seg_weights, clip_model=str(clip_folder)), text_prompts=True)
    check_segmenter(SegmenterConfig(weights="tiny", clip_model=str(clip_folder)), text_prompts=True)


def test_check_names_missing_fastsam_weights_and_where_to_get_them(tmp_path):
    """Catches a check that leaves the missing file to ultralytics (which would try to download it)."""
    missing = tmp_path / "FastSAM-s.pt"
    with pytest.raises(MissingFileError) as info:
        check_segmenter(SegmenterConfig(weights=str(missing)), text_prompts=False)
    message = one_line_error(info, "model.segmenter.weights")
    assert str(missing) in message and fastsam.FASTSAM_WEIGHTS_URL in message


def test_check_refuses_a_folder_given_as_fastsam_weights(tmp_path):
    with pytest.raises(UserError) as info:
        check_segmenter(SegmenterConfig(weights=str(tmp_path)), text_prompts=False)
    assert "not a .pt file" in one_line_error(info, "model.segmenter.weights")


def test_check_refuses_fastsam_weights_that_run_code_without_running_it(tmp_path, ultralytics_env):
    """Catches a check that unpickles the weights fully (the payload would run) or lets the refusal
    out as a traceback."""
    marker = tmp_path / "code-ran"
    weights = write_code_running_checkpoint(tmp_path / "FastSAM-s.pt", marker)
    with pytest.raises(UserError) as info:
        check_segmenter(SegmenterConfig(weights=str(weights)), text_prompts=False)
    assert not marker.exists(), "unpickling the weights ran code"
    message = one_line_error(info, "model.segmenter.weights")
    assert str(weights) in message and "weights-only" in message


@pytest.mark.parametrize("damage", ["text", "truncated"])
def test_check_refuses_a_damaged_fastsam_file(tmp_path, seg_weights, damage):
    """Catches torch's weights-only unpickler reaching the user as a traceback (an IndexError for
    some bytes that are no checkpoint)."""
    weights = tmp_path / "FastSAM-s.pt"
    whole = seg_weights.read_bytes()
    weights.write_bytes(b"this is not a checkpoint" if damage == "text" else whole[: len(whole) // 2])
    with pytest.raises(UserError) as info:
        check_segmenter(SegmenterConfig(weights=str(weights)), text_prompts=False)
    assert str(weights) in one_line_error(info, "model.segmenter.weights")


def clip_folder_copy(clip_folder: Path, target: Path, drop: str = "", config_changes: dict | None = None) -> Path:
    shutil.copytree(clip_folder, target)
    if drop:
        (target / drop).unlink()
    if config_changes:
        config = json.loads((target / "config.json").read_text())
        (target / "config.json").write_text(json.dumps({**config, **config_changes}))
    return target


@pytest.mark.parametrize(
    "drop, config_changes, reason",
    [
        ("config.json", None, "the folder has no config.json"),
        ("", {"model_type": "bert"}, "describes a 'bert' model, not a CLIP model"),
        ("model.safetensors", None, "the folder has no weights file"),
    ],
)
def test_check_refuses_a_folder_that_is_not_a_clip_model(tmp_path, seg_weights, clip_folder, drop, config_changes, reason):
    """Catches a check that only asks whether the folder exists: the first text prompt would then
    fail in the middle of a run."""
    folder = clip_folder_copy(clip_folder, tmp_path / "not_a_clip", drop, config_changes)
    config = tiny_config(seg_weights, clip_model=str(folder))
    with pytest.raises(UserError) as info:
        check_segmenter(config, text_prompts=True)
    message = one_line_error(info, "model.segmenter.clip_model")
    assert str(folder) in message and reason in message and "local folder" in message


def test_check_leaves_the_clip_model_alone_without_text_prompts(seg_weights):
    """Catches a CLIP check on box- and point-only runs, which never load CLIP."""
    check_segmenter(tiny_config(seg_weights, clip_model="/no/such/clip"), text_prompts=False)


def test_check_refuses_an_uncached_model_id_offline(seg_weights, monkeypatch, tmp_path):
    """Catches a check that passes every name that is not a folder: offline, the first text
    prompt would fail. Online the model would be downloaded when used, so nothing is refused."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    config = tiny_config(seg_weights, clip_model="diffstyler-tests/uncached-clip")
    assert huggingface_hub.constants.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1
    with pytest.raises(UserError) as info:
        check_segmenter(config, text_prompts=True)
    message = one_line_error(info, "model.segmenter.clip_model")
    assert "diffstyler-tests/uncached-clip" in message and "HF_HUB_OFFLINE" in message
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    check_segmenter(config, text_prompts=True)


def put_in_hub_cache(cache: Path, model_id: str, folder: Path) -> None:
    """Lay `folder`'s files out as the Hugging Face cache holds a downloaded model id."""
    repo = cache / ("models--" + model_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(folder, repo / "snapshots" / commit)


def test_a_cached_model_id_passes_the_check_offline_and_loads(seg_weights, clip_folder, monkeypatch, tmp_path):
    """Catches a check that accepts only local folders (a cached hub id is what most users have),
    and one whose cache look-up disagrees with the one loading the model."""
    cache = tmp_path / "hub_cache"
    put_in_hub_cache(cache, "diffstyler-tests/tiny-clip", clip_folder)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    check_segmenter(tiny_config(seg_weights, clip_model="diffstyler-tests/tiny-clip"), text_prompts=True)
    model, _ = fastsam._load_clip("diffstyler-tests/tiny-clip")
    assert model.config.model_type == "clip"
