"""Where the content images come from: `data.content` entries and `data.manifest` rows as plain descriptions.

Nothing here opens an image, and list-file lines and manifest paths are not even checked for existence:
start-up must stay cheap for 100k files on a network disk, and a missing file is reported when its job runs.

`expand_content(entries)` turns each entry of `data.content` into `ContentFile`s:

- a folder: every image file below it, recursively, sorted by its path relative to the folder; hidden files
  and folders (name starting with ".") are skipped and symlinked folders are not followed;
- a glob pattern (contains `*`, `?` or `[` and is not an existing path), `**` matching any depth: the
  matching image files, sorted; paths are relative to the pattern's leading folders without glob characters;
- a list file (`.txt` or `.lst`): one image path per line, relative to the list file's folder unless
  absolute; empty lines and lines starting with "#" are skipped;
- an image file (`.png`, `.jpg`, ...; extensions are compared lower-cased).

Entries keep their order, and a file reached twice is kept at its first occurrence.

`read_manifest(path)` reads a CSV (header row required, `styles` and `masks` cells separated by ";") or a
JSONL file (one object per line) with one job per row, columns `MANIFEST_COLUMNS`; only `content` is required.
Relative paths in it are relative to the manifest's folder.

Errors are `UserError`s (`MissingFileError` for a path that does not exist) naming the config key, e.g.
`data.content[2]`, or `file:line` for a line of a list file or manifest.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from diffstyler.errors import MissingFileError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst")
MANIFEST_COLUMNS = ("content", "styles", "masks", "prompt", "scale", "output")

GLOB_CHARACTERS = re.compile(r"[*?[]")
CSV_LIST_SEPARATOR = ";"


@dataclass(frozen=True)
class ContentFile:
    """One content image.

    path: the path to open (the user's entry joined with what was found in it).
    rel: posix path relative to the entry's root folder, with extension, e.g. "sub/a.png"; never absolute,
      never with "..". Callers use it to name outputs and keep a folder's layout.
    where: for messages: "data.content[2]", or "<list file>:<line>" for a line of a list file.
    """

    path: str
    rel: str
    where: str


@dataclass(frozen=True)
class ManifestRow:
    """One job of a manifest.

    number: 1-based data row number (header, blank and empty rows not counted).
    where: "<manifest>:<line>" for messages (the row's first line in the file).
    content: the content path, joined to the manifest's folder unless absolute; rel: it relative to that folder
      (posix), or its file name when outside.
    styles: style names as given; () means every style of `data.styles`.
    masks: () or one per style, None meaning no mask for that style; paths joined like `content`.
    prompt, scale, output: None when empty or absent. `output` is checked by the caller.
    """

    number: int
    where: str
    content: str
    rel: str
    styles: tuple[str, ...]
    masks: tuple[Optional[str], ...]
    prompt: Optional[str]
    scale: Optional[float]
    output: Optional[str]


# --- data.content -------------------------------------------------------------------------------------------


def expand_content(entries: list[str], key: str = "data.content") -> list[ContentFile]:
    """The content files of all entries, in entry order, each file once (see the module docstring)."""
    files: list[ContentFile] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        for file in expand_entry(entry, f"{key}[{index}]"):
            # abspath+normpath, not realpath: realpath stats every path component of every file
            identity = os.path.normpath(os.path.abspath(file.path))
            if identity not in seen:
                seen.add(identity)
                files.append(file)
    return files


def expand_entry(entry: str, where: str) -> list[ContentFile]:
    if os.path.isdir(entry):
        return files_in_folder(entry, where)
    if os.path.isfile(entry):
        extension = os.path.splitext(entry)[1].lower()
        if extension in LIST_EXTENSIONS:
            return files_in_list(entry, where)
        if extension in IMAGE_EXTENSIONS:
            return [ContentFile(entry, os.path.basename(entry), where)]
        raise UserError(
            "not an image or list file",
            where,
            f"{entry}: give image files ({', '.join(IMAGE_EXTENSIONS)}), folders, glob patterns "
            f"or {' / '.join(LIST_EXTENSIONS)} lists of image paths",
        )
    if GLOB_CHARACTERS.search(entry):
        return files_matching(entry, where)
    raise MissingFileError("no such file or folder", where, f"{entry} does not exist")


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
    return name.startswith(".")


def files_in_folder(folder: str, where: str) -> list[ContentFile]:
    files = []
    for directory, subfolders, names in os.walk(folder):
        subfolders[:] = [name for name in subfolders if not is_hidden(name)]  # pruned in place: os.walk skips them
        # one relpath per folder, not per file: a folder may hold 100k images
        prefix = posix(os.path.relpath(directory, folder))
        prefix = "" if prefix == "." else prefix + "/"
        for name in names:
            if not is_hidden(name) and is_image_name(name):
                files.append(ContentFile(os.path.join(directory, name), prefix + name, where))
    if not files:
        raise UserError(
            "no image files", where, f"{folder} holds no {', '.join(IMAGE_EXTENSIONS)} file (hidden ones are skipped)"
        )
    return sorted(files, key=lambda file: file.rel)


def files_matching(pattern: str, where: str) -> list[ContentFile]:
    root = glob_root(pattern)
    matches = sorted(path for path in glob.glob(pattern, recursive=True) if is_image_name(path) and os.path.isfile(path))
    if not matches:
        raise UserError("no file matches", where, f"no {', '.join(IMAGE_EXTENSIONS)} file matches {pattern}")
    return [ContentFile(path, relative_or_name(path, root), where) for path in matches]


def glob_root(pattern: str) -> str:
    """The folder made of the pattern's leading components without glob characters: `photos/**/*.jpg` → `photos`."""
    parts = posix(pattern).split("/")
    leading: list[str] = []
    for part in parts[:-1]:  # the last part names files, even when it has no glob character
        if GLOB_CHARACTERS.search(part):
            break
        leading.append(part)
    root = "/".join(leading)
    if not root:
        return "/" if pattern.startswith(("/", os.sep)) else "."
    return root


def files_in_list(list_file: str, where: str) -> list[ContentFile]:
    folder = os.path.dirname(list_file)
    files = []
    # split("\n"), not splitlines(): that also splits at form feeds and U+2028, so line numbers would drift
    for line_number, line in enumerate(read_text(list_file, where).split("\n"), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        line_where = f"{list_file}:{line_number}"
        if not is_image_name(line):
            raise UserError(
                "not an image file", line_where, f"{line}: a list holds image paths ({', '.join(IMAGE_EXTENSIONS)})"
            )
        path = line if os.path.isabs(line) else os.path.join(folder, line)
        files.append(ContentFile(path, relative_or_name(path, folder or "."), line_where))
    if not files:
        raise UserError("no image paths", where, f"{list_file} lists no path (empty lines and # comments are skipped)")
    return files


# --- data.manifest ------------------------------------------------------------------------------------------


def read_manifest(path: str, key: str = "data.manifest") -> list[ManifestRow]:
    """The jobs of a CSV or JSONL manifest, in file order; [] for a manifest without rows."""
    if not os.path.exists(path):
        raise MissingFileError("no such manifest", key, f"{path} does not exist")
    if not os.path.isfile(path):
        raise UserError("manifest is not a file", key, f"{path} is a folder; give a .csv or .jsonl file")
    extension = os.path.splitext(path)[1].lower()
    if extension not in (".csv", ".jsonl"):
        raise UserError("unknown manifest format", key, f"{path}: give a .csv or .jsonl file")
    text = read_text(path, path)
    raw_rows = csv_rows(text, path) if extension == ".csv" else jsonl_rows(text, path)
    folder = os.path.dirname(path)
    return [
        manifest_row(number, where, values, folder)
        for number, (where, values) in enumerate(raw_rows, start=1)
    ]


def read_text(path: str, where: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as file:  # -sig: spreadsheet programs write a BOM
            return file.read()
    except UnicodeDecodeError as error:
        raise UserError("cannot read file", where, f"{path} is not UTF-8 text ({error.reason} at byte {error.start})")
    except OSError as error:
        raise UserError("cannot read file", where, f"{path}: {error.strerror or error}")


def csv_rows(text: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, values) of each data row; `styles` and `masks` values are lists."""
    reader = csv.reader(io.StringIO(text))
    header: Optional[list[str]] = None
    first_line = 1
    for cells in reader:
        where = f"{path}:{first_line}"  # a row's first line: a quoted cell may run over several lines
        first_line = reader.line_num + 1
        if all(not cell.strip() for cell in cells):
            continue
        if header is None:
            header = csv_header(cells, where)
            continue
        if len(cells) > len(header):
            raise UserError("too many cells", where, f"the row has {len(cells)} cells, the header {len(header)}")
        values: dict[str, Any] = dict(zip(header, cells))
        for name in ("styles", "masks"):
            if name in values:
                values[name] = csv_list(values[name])
        yield where, values


def csv_header(cells: list[str], where: str) -> list[str]:
    names = [cell.strip() for cell in cells]
    check_column_names(names, where)
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise UserError("repeated manifest column", where, ", ".join(duplicates))
    if "content" not in names:
        raise UserError("manifest has no content column", where, "the first row must name the columns, e.g. content,styles")
    return names


def csv_list(cell: str) -> list[str]:
    # an empty cell is no list, but "a.png;" is two entries: the second style has no mask
    return cell.split(CSV_LIST_SEPARATOR) if cell.strip() else []


def jsonl_rows(text: str, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    # split("\n"): a JSON string may hold a raw U+2028, which splitlines() would split at
    for line_number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_number}"
        try:
            values = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError("not a JSON line", where, f"{error.msg} at column {error.colno}")
        if not isinstance(values, dict):
            raise UserError("not a JSON object", where, 'each line must be one object, e.g. {"content": "a.png"}')
        check_column_names(list(values), where)
        yield where, values


def check_column_names(names: list[str], where: str) -> None:
    unknown = [name for name in names if name not in MANIFEST_COLUMNS]
    if unknown:
        raise UserError(
            "unknown manifest column", where, f"{', '.join(map(repr, unknown))}; known: {', '.join(MANIFEST_COLUMNS)}"
        )


def manifest_row(number: int, where: str, values: dict[str, Any], folder: str) -> ManifestRow:
    content = optional_text(values.get("content"), "content", where)
    if content is None:
        raise UserError("content is empty", where, "every row needs a content image path")
    styles = tuple(style for style in optional_texts(values.get("styles"), "styles", where) if style is not None)
    masks = tuple(optional_texts(values.get("masks"), "masks", where))
    if styles and masks and len(masks) != len(styles):
        raise UserError(
            "masks do not match styles", where, f"{len(masks)} masks for {len(styles)} styles: give one per style ('' for none)"
        )
    content_path = joined(folder, content)
    return ManifestRow(
        number=number,
        where=where,
        content=content_path,
        rel=relative_or_name(content_path, folder or "."),
        styles=styles,
        masks=tuple(None if mask is None else joined(folder, mask) for mask in masks),
        prompt=optional_text(values.get("prompt"), "prompt", where),
        scale=optional_scale(values.get("scale"), where),
        output=optional_text(values.get("output"), "output", where),
    )


def optional_texts(value: Any, name: str, where: str) -> list[Optional[str]]:
    """A list cell as `optional_text`s; JSONL may give one string instead of a list, null or absent is []."""
    if value is None:
        return []
    return [optional_text(item, name, where) for item in (value if isinstance(value, list) else [value])]


def optional_text(value: Any, name: str, where: str) -> Optional[str]:
    """The stripped string, None for null or an empty string."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise UserError(f"{name} is not text", where, f"got {json.dumps(value)}")
    return value.strip() or None


def optional_scale(value: Any, where: str) -> Optional[float]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    # bool is an int in Python, but `true` is no scale
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError("scale is not a number", where, f"got {json.dumps(value)}")
    try:
        scale = float(value)
    except ValueError:
        raise UserError("scale is not a number", where, f"got {value!r}") from None
    if not math.isfinite(scale):
        raise UserError("scale is not a number", where, f"got {value!r}; give a finite number")
    return scale


# --- paths --------------------------------------------------------------------------------------------------


def posix(path: str) -> str:
    return path.replace(os.sep, "/")


def joined(folder: str, path: str) -> str:
    return path if os.path.isabs(path) else os.path.join(folder, path)


def relative_or_name(path: str, root: str) -> str:
    """`path` relative to `root` in posix form, or its file name when it lies outside `root`."""
    try:
        rel = posix(os.path.relpath(path, root))
    except ValueError:  # Windows: another drive
        return os.path.basename(path)
    if rel == ".." or rel.startswith("../"):
        return os.path.basename(path)
    return rel
