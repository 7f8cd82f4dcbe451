"""Style LoRAs loaded on the pipeline's ONE denoiser, and the text conditionings they give, both cached.

`StyleAdapters` names each (LoRA file, scale) pair's adapter (`style0`, `style1`, ...: never reused,
so a cached conditioning can never be mistaken for another adapter's), keeps at most
`max_loaded` adapters (least recently used deleted first) and remembers the conditioning of
(prompt, adapter) pairs, since a dataset repeats the inversion prompt, the negative prompt and
each style's prompt. Adapters asked for inside `pinned()` are never deleted before the block
ends: a chunk of jobs needs all its adapters at once.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from typing import Iterator

import torch
from diffusers import DiffusionPipeline

from diffstyler.backbones import backbone_for
from diffstyler.conditioning import Conditioning
from diffstyler.console import quiet_library_calls
from diffstyler.lora import (
    BASE_ROW,
    encode_prompts_per_adapter,
    load_style_adapter,
    set_adapter_scales,
    set_text_encoder_scales,
    text_encoders,
)

MAX_LOADED_ADAPTERS = 16
MAX_CONDITIONINGS = 1024  # (prompt, adapter) pairs kept (300 KB each for SD 2.1, 600 KB for SDXL)


class StyleAdapters:
    def __init__(self, pipe: DiffusionPipeline, max_loaded: int = MAX_LOADED_ADAPTERS,
                 max_conditionings: int = MAX_CONDITIONINGS):
        self.pipe = pipe
        self.max_loaded = max_loaded
        self.max_conditionings = max_conditionings
        self.loaded: OrderedDict[tuple[str, float], str] = OrderedDict()  # (LoRA file, scale) -> adapter, LRU order
        self.scales: dict[str, float] = {}  # adapter -> its LoRA scale
        self.conditionings: OrderedDict[tuple[str, str], Conditioning] = OrderedDict()  # (prompt, adapter) -> one row
        self._count = 0
        self._pinned: list[set[str]] = []

    @contextlib.contextmanager
    def pinned(self) -> Iterator[None]:
        """The adapters asked for (`adapter_for`) inside the block stay loaded until it ends."""
        self._pinned.append(set())
        try:
            yield
        finally:
            self._pinned.pop()

    def adapter_for(self, lora: str | os.PathLike, scale: float = 1.0) -> str:
        """The adapter holding this LoRA file at this scale, loaded on first use."""
        key = (str(lora), float(scale))
        if key in self.loaded:
            self.loaded.move_to_end(key)
        else:
            name = f"style{self._count}"
            self._count += 1
            # Outside inference mode, which Lightning's predict runs in: loading reads the denoiser's
            # state dict, and a quantized weight (a torchao tensor subclass) cannot be detached there.
            # Quiet: diffusers' "No LoRA keys ... CLIPTextModel", PEFT's "Already found a `peft_config`".
            with torch.inference_mode(False), quiet_library_calls():
                self._make_room()
                load_style_adapter(self.pipe, lora, name)
            self.loaded[key] = name
            self.scales[name] = float(scale)
        name = self.loaded[key]
        if self._pinned:
            self._pinned[-1].add(name)
        return name

    def _make_room(self) -> None:
        """Delete the least recently used adapters not pinned until one more fits."""
        pinned = set().union(*self._pinned)
        for key, name in list(self.loaded.items()):
            if len(self.loaded) < self.max_loaded:
                return
            if name in pinned:
                continue
            self.pipe.delete_adapters(name)
            del self.loaded[key], self.scales[name]
            self.conditionings = OrderedDict((k, v) for k, v in self.conditionings.items() if k[1] != name)

    def activate(self, names: set[str] | list[str]) -> None:
        """Make exactly these adapters active on the denoiser, each at its LoRA scale."""
        set_adapter_scales(backbone_for(self.pipe).denoiser, {name: self.scales[name] for name in sorted(set(names))})

    def encode(self, prompts: list[str], adapters: list[str]) -> list[Conditioning]:
        """The conditioning of each (prompt, adapter) pair: prompt i through the text-encoder layers
        of `adapters[i]` where that LoRA has some (`BASE_ROW`: the base text encoder). The pairs not
        remembered are encoded in one text-encoder batch."""
        keys = list(zip(prompts, adapters))
        missing = list(dict.fromkeys(key for key in keys if key not in self.conditionings))
        if missing:
            loaded = sorted({adapter for _, adapter in missing if adapter != BASE_ROW})
            for encoder in text_encoders(self.pipe):  # SDXL's two
                set_text_encoder_scales(encoder, {name: self.scales[name] for name in loaded})
            encoded = encode_prompts_per_adapter(self.pipe, [p for p, _ in missing], [a for _, a in missing])
            for key, conditioning in zip(missing, encoded.split()):
                self.conditionings[key] = conditioning
        for key in keys:
            self.conditionings.move_to_end(key)
        found = [self.conditionings[key] for key in keys]
        while len(self.conditionings) > self.max_conditionings:
            self.conditionings.popitem(last=False)
        return found
