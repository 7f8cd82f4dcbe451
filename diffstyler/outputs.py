"""Writing results: PNGs that carry their settings, image grids, atomic writes inside a folder.

Every PNG holds two text chunks:
- `parameters`: the A1111-style text most image tools show ("prompt", "Negative prompt: ...",
  then "Key: value, Key: value"); values holding commas, quotes or colons are JSON-quoted, and so
  are prompts holding a line break (or starting with a quote), so the text always parses back;
- `diffstyler`: the same settings as JSON, for exact round trips (`read_settings`).

Every file is written by `atomic_write` (temporary name, then rename) at a path checked by
`path_inside`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch
from PIL import Image, PngImagePlugin
from torchvision.utils import make_grid

from diffstyler.errors import UserError

PARAMETERS_KEY = "parameters"
SETTINGS_KEY = "diffstyler"
# sha256 of everything that changes the pixels (`results.settings_hash`): decides whether a rerun
# may keep the file.
SETTINGS_HASH_KEY = "diffstyler_settings_sha256"


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


def _prompt_line(prompt: str) -> str:
    """The prompt as one line: verbatim (as A1111 writes it) unless it holds a line break or starts
    with a quote; then JSON-quoted, so that the three-line layout always parses back."""
    if "\n" in prompt or "\r" in prompt or prompt.startswith('"'):
        return json.dumps(prompt, ensure_ascii=False)
    return prompt


def _prompt_from_line(line: str) -> str:
    return json.loads(line) if line.startswith('"') else line


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    fields = ", ".join(f"{key}: {_quote(value)}" for key, value in settings.items())
    return f"{_prompt_line(prompt)}\nNegative prompt: {_prompt_line(negative_prompt)}\n{fields}"


_FIELD = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """The A1111 text back into {"prompt", "Negative prompt", key: value-as-text}.

    Exactly three lines, because `format_parameters` writes each prompt on one line.
    """
    prompt, negative_line, fields = text.split("\n", 2)
    parsed = {
        "prompt": _prompt_from_line(prompt),
        "Negative prompt": _prompt_from_line(negative_line.removeprefix("Negative prompt: ")),
    }
    for match in _FIELD.finditer(fields):
        key, value = match.group(1).strip(), match.group(2).strip()
        parsed[key] = json.loads(value) if value.startswith('"') else value
    return parsed


def path_inside(folder: str | os.PathLike, name: str | os.PathLike, key: str) -> Path:
    """`folder / name`, resolved, refused unless it lies strictly inside `folder`.

    Every output goes through here before it is written, so that no name (a style name, a content
    file stem, a job edited by hand) can place a file elsewhere. `key` is the config key of `folder`.
    """
    root = Path(folder).resolve()
    target = (root / name).resolve()
    if target == root or not target.is_relative_to(root):
        raise UserError(f"refusing to write {str(name)!r}", key, f"it lies outside the output folder {root}")
    return target


TEMPORARY_PREFIX = ".dstmp-"


def temporary_path(path: Path) -> Path:
    """A fresh temporary name next to `path`: a fixed prefix, a short hash of the target's name (so
    `temporary_files` finds it again) and a random part; 44 bytes whatever the target's length."""
    target = hashlib.sha256(path.name.encode()).hexdigest()[:16]
    return path.with_name(f"{TEMPORARY_PREFIX}{target}-{secrets.token_hex(8)}.tmp")


def temporary_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files left next to `path` by interrupted writes of it.

    Also the names older versions used: `.<stem>-<8 chars>.png` (atomic_save) and
    `.<name>.<pid>.<32 hex>.tmp` (save_mask_png).
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    target = hashlib.sha256(path.name.encode()).hexdigest()[:16]
    patterns = [
        re.compile(re.escape(f"{TEMPORARY_PREFIX}{target}-") + r"[0-9a-f]{16}\.tmp"),
        re.compile(re.escape(f".{path.stem}-") + r"[a-z0-9_]{8}\.png"),
        re.compile(re.escape(f".{path.name}.") + r"\d+\.[0-9a-f]{32}\.tmp"),
    ]
    return [p for p in path.parent.iterdir() if any(pattern.fullmatch(p.name) for pattern in patterns)]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(handle)` under a temporary name in the same folder, then rename it
    into place: a reader or a crash never sees a half-written file, and a failed write leaves none.

    The temporary file is opened with "xb" (not mkstemp / NamedTemporaryFile, which create 0600
    files), so the result gets the usual umask permissions (0644 under umask 022).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_path(path)
    try:
        with open(temporary, "xb") as handle:
            write(handle)
        os.replace(temporary, path)  # same folder, so a rename on one filesystem
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def atomic_save(image: Image.Image, path: str | os.PathLike, text_chunks: dict[str, str] | None = None) -> Path:
    """Save a PNG with `text_chunks` (iTXt) atomically (`atomic_write`)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text_chunks or {}).items():
        info.add_itxt(key, value)
    return atomic_write(path, lambda handle: image.save(handle, format="PNG", pnginfo=info))


def save_result(
    image: Image.Image,
    path: str | os.PathLike,
    prompt: str,
    negative_prompt: str,
    settings: dict[str, Any],
    settings_hash: str | None = None,
) -> Path:
    chunks = {
        PARAMETERS_KEY: format_parameters(prompt, negative_prompt, settings),
        SETTINGS_KEY: json.dumps({"prompt": prompt, "negative_prompt": negative_prompt, **settings}),
    }
    if settings_hash is not None:
        chunks[SETTINGS_HASH_KEY] = settings_hash
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
