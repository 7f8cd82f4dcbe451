"""Small builders shared by the stylization tests (tiny models only, no weights, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffstyler.lora import StyleLoRAConfig, add_style_adapter, save_lora
from diffstyler.models import ModelSpec, load_pipeline


def randomize_adapter(unet, name: str, seed: int, std: float = 0.3) -> None:
    """Give an adapter non-zero B matrices so that it changes the UNet (a fresh LoRA is a no-op)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param_name, param in unet.named_parameters():
            if f"lora_B.{name}." in param_name:
                param.copy_(torch.randn(param.shape, generator=generator) * std)


def tiny_pipe_with_adapter(name: str = "style", seed: int = 1, rank: int = 4):
    pipe = load_pipeline(ModelSpec(name="tiny"))
    add_style_adapter(pipe.unet, StyleLoRAConfig(rank=rank), name)
    randomize_adapter(pipe.unet, name, seed)
    pipe.unet.requires_grad_(False)
    return pipe


def write_random_lora(folder: Path, seed: int, prompt: str = "painting of sss") -> Path:
    """A LoRA file as `diffstyler fit` writes it, with random weights, plus its info file."""
    pipe = tiny_pipe_with_adapter("style", seed)
    save_lora(pipe.unet, "style", folder)
    (folder / "diffstyler_lora.json").write_text(json.dumps({"prompt": prompt, "base_model": "tiny"}))
    return folder / "pytorch_lora_weights.safetensors"
