"""Writing results: PNGs that carry their settings, image grids, atomic writes.

Every PNG holds two text chunks:
- `parameters`: the A1111-style text most image tools show ("prompt", "Negative prompt: ...",
  then "Key: value, Key: value"); values holding commas, quotes or colons are JSON-quoted;
- `diffstyler`: the same settings as JSON, for exact round trips (`read_settings`).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid

PARAMETERS_KEY = "parameters"
SETTINGS_KEY = "diffstyler"


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """[1, 3, H, W] or [3, H, W] in [0, 1] to an 8-bit RGB image."""
    if pixels.dim() == 4:
        pixels = pixels[0]
    array = (pixels.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array)


def pil_to_unit(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image to [3, H, W] in [0, 1]."""
    array = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    return array.view(image.height, image.width, 3).permute(2, 0, 1).float() / 255


def _quote(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    if re.search(r'[,:"\n]', text) or text != text.strip():
        return json.dumps(text)
    return text


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    fields = ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items())
    return f"{prompt}\nNegative prompt: {negative_prompt}\n{fields}"


_FIELD = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """The A1111 text back into {"prompt", "Negative prompt", key: value-as-text}."""
    prompt, negative_line, fields = text.split("\n", 2)
    parsed = {"prompt": prompt, "Negative prompt": negative_line.removeprefix("Negative prompt: ")}
    for match in _FIELD.finditer(fields):
        key, value = match.group(1).strip(), match.group(2).strip()
        parsed[key] = json.loads(value) if value.startswith('"') else value
    return parsed


def atomic_save(image: Image.Image, path: str | os.PathLike, text_chunks: dict[str, str] | None = None) -> Path:
    """Save a PNG under a temporary name in the same folder, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_itxt(key, value)
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.stem}-", suffix=".png", delete=False) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
    os.replace(tmp.name, path)
    return path


def save_result(image: Image.Image, path: str | os.PathLike, prompt: str, negative_prompt: str, settings: dict[str, Any]) -> Path:
    chunks = {
        PARAMETERS_KEY: format_parameters(prompt, negative_prompt, settings),
        SETTINGS_KEY: json.dumps({"prompt": prompt, "negative_prompt": negative_prompt, **settings}),
    }
    return atomic_save(image, path, chunks)


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    with Image.open(path) as image:
        return json.loads(image.text[SETTINGS_KEY])


def read_parameters(path: str | os.PathLike) -> dict[str, str]:
    with Image.open(path) as image:
        return parse_parameters(image.text[PARAMETERS_KEY])


def image_grid(images: list[Image.Image], height: int) -> Image.Image:
    """One row of images scaled to a common height (content | style | result ...)."""
    tiles = []
    for image in images:
        width = max(1, round(image.width * height / image.height))
        tiles.append(pil_to_unit(image.resize((width, height), Image.Resampling.LANCZOS)))
    widest = max(t.shape[2] for t in tiles)
    padded = [torch.nn.functional.pad(t, (0, widest - t.shape[2]), value=1.0) for t in tiles]
    return to_pil(make_grid(padded, nrow=len(padded), padding=2, pad_value=1.0))
