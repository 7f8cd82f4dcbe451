"""Builders for the mask tests: models that exist only with random weights here (no downloads),
and small images.

- a FastSAM-compatible .pt: the real YOLOv8-seg architecture (what FastSAM is) with random weights;
- a tiny transformers CLIP (model + tokenizer + image processor) saved to a local folder;
- mask PNGs and a content scene.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from diffstyler.masks import SegmenterConfig, build_random_fastsam_weights

# FastSAM tests: 80x48 scene, network input 64 px. Random weights only give instances with a
# confidence threshold near zero.
IMGSZ = 64
LOW_CONF = 1e-6


def build_random_segment_weights(path: Path, yaml_name: str = "yolov8n-seg.yaml") -> Path:
    """Save a random-weight ultralytics model built from one of its bundled yamls to `path`."""
    return build_random_fastsam_weights(path, yaml_name)


def write_tiny_clip_tokenizer_files(folder: Path) -> None:
    """A byte-level BPE vocabulary of lowercase letters (and their word-final forms) plus a few
    merges, enough for short English prompts."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    tokens = letters + [f"{c}</w>" for c in letters] + ["do", "dog</w>", "ca", "cat</w>"]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = ["#version: 0.2", "d o", "do g</w>", "c a", "ca t</w>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")


def build_tiny_clip_folder(folder: Path) -> Path:
    """Save a randomly initialised tiny CLIPModel and a matching CLIPProcessor to `folder`, so
    `from_pretrained(folder)` works offline exactly like a real checkpoint folder."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    write_tiny_clip_tokenizer_files(folder)
    tokenizer = CLIPTokenizer.from_pretrained(str(folder))
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            **special,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(str(folder))
    image_processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(str(folder))
    return folder


def scene_image(width: int = 80, height: int = 48) -> Image.Image:
    """A small deterministic RGB scene: textured background with two flat shapes."""
    rng = np.random.RandomState(0)
    pixels = (rng.rand(height, width, 3) * 60 + 100).astype(np.uint8)
    pixels[8:30, 10:35] = (220, 40, 40)
    pixels[20:44, 45:75] = (30, 60, 200)
    return Image.fromarray(pixels)


def tiny_config(weights: Path, **changes) -> SegmenterConfig:
    settings = dict(weights=str(weights), device="cpu", imgsz=IMGSZ, conf=LOW_CONF)
    return SegmenterConfig(**{**settings, **changes})


def write_png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def square_mask_file(tmp_path: Path, size: int = 64, top: int = 20, side: int = 10) -> Path:
    pixels = np.zeros((size, size), np.uint8)
    pixels[top : top + side, top : top + side] = 255
    return write_png(tmp_path / "square.png", pixels)


def content(size=(64, 64)) -> Image.Image:
    return Image.new("RGB", size)


def no_segmenter():
    raise AssertionError("a file mask must not build a segmenter")
