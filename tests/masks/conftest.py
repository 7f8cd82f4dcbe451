"""Session fixtures of the mask tests: FastSAM and CLIP with random weights, built once."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from diffstyler.masks import FastSAMSegmenter
from tests.masks.fixtures import (
    IMGSZ,
    LOW_CONF,
    build_random_segment_weights,
    build_tiny_clip_folder,
    scene_image,
    tiny_config,
)


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
