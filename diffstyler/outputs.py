"""Writing results: PNGs that carry their settings, image grids, atomic writes inside a folder.

Every PNG holds two text chunks:
- `parameters`: the text A1111 writes and most image tools show: the prompt, "Negative prompt: ..."
  (left out when empty), then one line "Key: value, Key: value"; values holding commas, quotes or
  colons are JSON-quoted, as A1111 quotes them (`format_parameters`). Helpers give the fields A1111
  adds for the model and the LoRAs (`a1111_fields`: `Model hash`, `Lora hashes`) and the
  `<lora:name:scale>` tags of its prompts (`lora_tag`);
- `diffstyler`: the same settings as JSON, for exact round trips (`read_settings`).

Every file is written by `atomic_write` (temporary name, then rename) at a path checked by
`path_inside`. A temporary file is locked while it is written (`flock`), so that a run cleaning up
after a killed one (`remove_abandoned_temporary_files`) removes only files whose writer is gone,
never the file another run is writing into the same folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, BinaryIO, Callable, Sequence

try:  # POSIX; elsewhere temporary files are written unlocked
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

import torch
from PIL import Image, PngImagePlugin
from safetensors import safe_open
from torchvision.utils import make_grid

from diffstyler.errors import UserError
from diffstyler.images import sha256_file

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
    """A field's value as A1111's `infotext_utils.quote` writes it: JSON-quoted when it holds a comma,
    a colon or a line break (and here also a quote or spaces at either end, which A1111 would lose)."""
    text = value if isinstance(value, str) else json.dumps(value)
    if re.search(r'[,:"\n]', text) or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


NEGATIVE_PROMPT_LABEL = "Negative prompt:"


def _a1111_misreads(prompt: str, negative: bool) -> bool:
    """Whether A1111's `parse_generation_parameters` (modules/infotext_utils.py) would read this
    prompt back differently when written raw.

    It strips every line (spaces and a carriage return at either end are lost), joins the lines of
    each prompt skipping empty ones until the first non-empty one, and takes a line starting with
    "Negative prompt:" for the start of the negative prompt (in a negative prompt, it removes that
    label again from any such line after the first).
    """
    lines = prompt.split("\n")
    if any(line != line.strip() for line in lines):
        return True
    if len(lines) > 1 and lines[0] == "":
        return True
    return any(line.startswith(NEGATIVE_PROMPT_LABEL) for line in (lines[1:] if negative else lines))


def _looks_escaped(text: str) -> bool:
    """A one-line JSON string: how `_prompt_text` writes a prompt that A1111 would misread."""
    if len(text) < 2 or not (text.startswith('"') and text.endswith('"')) or "\n" in text:
        return False
    try:
        return isinstance(json.loads(text), str)
    except json.JSONDecodeError:
        return False


def _prompt_text(prompt: str, negative: bool) -> str:
    """The prompt raw, line breaks included (as A1111 writes it), unless A1111 would misread it raw,
    or `parse_parameters` would take it for an escaped one: then one JSON string (A1111 shows that
    string, quotes and `\\n` escapes included; `parse_parameters` and the JSON chunk give the exact
    prompt)."""
    if _a1111_misreads(prompt, negative) or _looks_escaped(prompt):
        return json.dumps(prompt, ensure_ascii=False)
    return prompt


def _prompt_from_text(text: str) -> str:
    return json.loads(text) if _looks_escaped(text) else text


def format_parameters(prompt: str, negative_prompt: str, settings: dict[str, Any]) -> str:
    """The A1111 `parameters` text: the prompt, "Negative prompt: <negative prompt>" (left out when
    it is empty, as A1111 does), and the settings as one line of "Key: value" fields.

    Multi-line prompts are written raw, so that A1111's own parsing reads them back; only a prompt
    that it would misread (see `_a1111_misreads`) is written as one JSON string. A1111 takes the
    last line for the settings only when it holds at least 3 fields: give it 3 or more.
    """
    lines = [_prompt_text(prompt, negative=False)]
    if negative_prompt:
        lines.append(f"{NEGATIVE_PROMPT_LABEL} {_prompt_text(negative_prompt, negative=True)}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in settings.items()))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, str]:
    """The text `format_parameters` writes back into {"prompt", "Negative prompt", key: value-as-text}.

    As A1111 reads it: the last line holds the settings, and the first line starting with
    "Negative prompt:" starts the negative prompt. Lines are not stripped: what is written raw
    needs no stripping, and texts written by older versions (always a negative prompt line, raw
    one-line prompts with spaces at the ends) read back exactly, but for a one-line prompt that
    itself began with "Negative prompt:".
    """
    *prompt_lines, fields = text.split("\n")
    negative_at = next((i for i, line in enumerate(prompt_lines) if line.startswith(NEGATIVE_PROMPT_LABEL)), len(prompt_lines))
    negative_lines = prompt_lines[negative_at:]
    if negative_lines:
        negative_lines[0] = negative_lines[0][len(NEGATIVE_PROMPT_LABEL):].removeprefix(" ")
    parsed = {
        "prompt": _prompt_from_text("\n".join(prompt_lines[:negative_at])),
        "Negative prompt": _prompt_from_text("\n".join(negative_lines)),
    }
    for match in _FIELD.finditer(fields):
        key, value = match.group(1).strip(), match.group(2).strip()
        parsed[key] = json.loads(value) if value.startswith('"') else value
    return parsed


# --- A1111's model and LoRA fields -------------------------------------------------------------

A1111_MODEL_HASH_LENGTH = 10  # modules/sd_models.py: CheckpointInfo.shorthash = sha256[0:10]
A1111_LORA_HASH_LENGTH = 12  # extensions-builtin/Lora/network.py: NetworkOnDisk.shorthash = hash[0:12]
SINGLE_FILE_CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt")


def a1111_model_hash(path: str | os.PathLike) -> str:
    """A1111's `Model hash` of a single-file checkpoint: the sha256 of the whole file, 10 hex digits."""
    return sha256_file(path)[:A1111_MODEL_HASH_LENGTH]


def a1111_lora_hash(path: str | os.PathLike) -> str:
    """The short hash A1111 writes in `Lora hashes` for this LoRA file (12 hex digits).

    A1111 (extensions-builtin/Lora/network.py, `NetworkOnDisk`) takes the file's `sshs_model_hash`
    metadata when kohya's tools wrote one; else, for a .safetensors file, the sha256 of everything
    after the header (`modules/hashes.py: addnet_hash_safetensors`), so that editing the metadata
    keeps the hash; for another file, the sha256 of the whole file.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        return sha256_file(path)[:A1111_LORA_HASH_LENGTH]
    with safe_open(str(path), framework="pt") as file:
        recorded = (file.metadata() or {}).get("sshs_model_hash")
    return (recorded or _sha256_after_header(path))[:A1111_LORA_HASH_LENGTH]


def a1111_lora_name(name: str) -> str:
    """A LoRA's name as A1111 can carry it in a `<lora:name:scale>` tag and in `Lora hashes`: without
    ":" and "," (A1111 removes them in `Lora hashes`; ":" ends the name in a tag), ">" (ends the
    tag) and line breaks, and without spaces at either end (A1111 strips them when it reads the
    field back)."""
    return re.sub(r"[:,>\r\n]", "", name).strip()


def lora_tag(name: str, scale: float) -> str:
    """A1111's prompt tag for a LoRA at a scale, e.g. `<lora:ink_wash:0.8>`. A1111 finds the LoRA
    by this name among the files in its `models/Lora` folder (file name or `ss_output_name`)."""
    return f"<lora:{a1111_lora_name(name)}:{_number(scale)}>"


def a1111_fields(model: str | os.PathLike | None, loras: Sequence[tuple[str, str | os.PathLike]]) -> dict[str, str]:
    """The fields A1111 adds to its settings line for the model and the LoRAs (name, file):
    `Model hash` where the model is one file (a hub id or a diffusers folder has no A1111 hash),
    and `Lora hashes`, "name: hash, name: hash" (`format_parameters` quotes it, as A1111 does), each
    the hash of the file A1111 loads: the kohya export beside our LoRA when `fit` wrote one
    (`export.a1111_lora_file`)."""
    from diffstyler.export import a1111_lora_file  # it writes through this module: imported when asked

    fields = {}
    if model is not None and str(model).endswith(SINGLE_FILE_CHECKPOINT_SUFFIXES) and Path(model).is_file():
        fields["Model hash"] = a1111_model_hash(model)
    if loras:
        fields["Lora hashes"] = ", ".join(f"{a1111_lora_name(name)}: {a1111_lora_hash(a1111_lora_file(file))}" for name, file in loras)
    return fields


def _number(value: float) -> str:
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _sha256_after_header(path: str | os.PathLike) -> str:
    stat = os.stat(path)
    return _cached_sha256_after_header(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _cached_sha256_after_header(path: str, size: int, mtime_ns: int) -> str:
    """Once per file version (path, size, modification time), as `images.sha256_file` for whole files."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        # a safetensors file starts with the header's length (8 bytes, little-endian), then the header
        handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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
    files), so the result gets the usual umask permissions (0644 under umask 022). It stays locked
    until it has its final name (see `remove_abandoned_temporary_files`); when a cleaner took it in
    the instant between its creation and its lock, it is written once more.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        temporary = temporary_path(path)
        try:
            with open(temporary, "xb") as handle, open(temporary, "rb") as lock_holder:
                lock(lock_holder, blocking=True)  # held by its own descriptor until after the rename
                write(handle)
                handle.close()  # flushed and closed first: a full disk fails here, not in the renamed file
                os.replace(temporary, path)  # same folder, so a rename on one filesystem
            return path
        except FileNotFoundError:
            temporary.unlink(missing_ok=True)
            if attempt == 2 or not path.parent.is_dir():
                raise
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    raise AssertionError("unreachable: the second attempt returns or raises")


def lock(handle: IO[bytes], blocking: bool) -> bool:
    """An exclusive `flock` on an open file, released when it is closed (or its process dies).
    False when another process holds it (non-blocking); True, unlocked, where locks are not
    supported (no fcntl, or a filesystem that refuses them)."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP: a filesystem without locks
        return True
    return True


def remove_abandoned_temporary_files(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files left next to `path` by writes that will never finish (a killed or
    failed process); a temporary file still locked by its writer (another run writing into the same
    folder now) is left alone. Returns the files removed."""
    removed = []
    for temporary in temporary_files(path):
        # FileNotFoundError: renamed into place (or removed) meanwhile by its writer
        with contextlib.suppress(FileNotFoundError), open(temporary, "rb") as handle:
            if lock(handle, blocking=False):  # else being written
                temporary.unlink()
                removed.append(temporary)
    return removed


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
    tags: str = "",
) -> Path:
    """Save a PNG with its `parameters` text (A1111's: the prompt followed by `tags`, e.g. the
    `<lora:name:scale>` tags of its LoRAs) and its settings as JSON (the exact prompt)."""
    shown_prompt = f"{prompt} {tags}" if tags else prompt
    chunks = {
        PARAMETERS_KEY: format_parameters(shown_prompt, negative_prompt, settings),
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
