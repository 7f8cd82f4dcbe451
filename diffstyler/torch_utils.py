"""Context managers that change a model for the duration of a block and put it back afterwards."""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Run a frozen module in eval mode without changing the mode Lightning expects."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


@contextlib.contextmanager
def base_model(unet: torch.nn.Module) -> Iterator[None]:
    """Run the UNet without any LoRA adapter inside the block."""
    has_adapters = bool(getattr(unet, "peft_config", None))
    if has_adapters:
        unet.disable_adapters()
    try:
        yield
    finally:
        if has_adapters:
            unet.enable_adapters()


@contextlib.contextmanager
def float32_model(model: torch.nn.Module) -> Iterator[None]:
    """The model in float32 inside the block; every parameter and buffer gets its own dtype back."""
    tensors = list(model.parameters()) + list(model.buffers())
    dtypes = [t.dtype for t in tensors]
    for tensor in tensors:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in zip(tensors, dtypes):
            tensor.data = tensor.data.to(dtype)
