"""Output names: what every file of a job is called, and the rules that keep names safe.

The ONE place output names are made (`JobFiles.for_job`, `default_output_name`) and checked: every
name part is a plain file name (`check_name_part`), no file name exceeds 255 bytes, and no two files
of a run share a name (`distinct_job_outputs`, compared case-folded). Names never come from a position
in a list, so adding inputs renames nothing. The writer resolves every name inside the output folder
again before writing (`outputs.path_inside`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Optional, Sequence

from diffstyler.errors import UserError

if TYPE_CHECKING:
    from diffstyler.data.jobs import JobSpec, StyleEntry

MAX_FILE_NAME_BYTES = 255  # the file name limit of ext4, XFS, APFS, NTFS...


@dataclass(frozen=True)
class JobFiles:
    """Every file a job writes, relative to the output folder.

    results: `<name>.png`, or `<name>_<style>.png` per style when several styles have no masks.
    grid: `<name>_grid.png` (written only with `model.output.grid`, but always reserved).
    masks: `<name>_mask<k>_<style>.png` per style, None for styles without a mask.
    """

    results: tuple[str, ...]
    grid: str
    masks: tuple[Optional[str], ...]

    @classmethod
    def for_job(cls, name: str, styles: Sequence["StyleEntry"]) -> "JobFiles":
        if styles[0].mask is not None or len(styles) == 1:
            results = (f"{name}.png",)
        else:
            results = tuple(f"{name}_{entry.name}.png" for entry in styles)
        masks = tuple(f"{name}_mask{k}_{entry.name}.png" if entry.mask is not None else None for k, entry in enumerate(styles))
        return cls(results, f"{name}_grid.png", masks)

    def labelled(self) -> list[tuple[str, str]]:
        """(what it is, file name) for each file."""
        labelled = [(f"result {k}", name) for k, name in enumerate(self.results)]
        labelled.append(("grid", self.grid))
        labelled += [(f"mask {k}", name) for k, name in enumerate(self.masks) if name is not None]
        return labelled


def style_name_key(given: list["StyleEntry"], index: int) -> str:
    """The config key a style's name comes from: its `name`, or its `lora` when the name is derived."""
    return f"data.styles[{index}].{'name' if given[index].name else 'lora'}"


def distinct_style_names(given: list["StyleEntry"], resolved: list["StyleEntry"], where: Optional[str] = None) -> list["StyleEntry"]:
    """Check every style name, and make derived names distinct (the same LoRA twice, e.g. at two
    scales, would otherwise write both results to one file) by appending the style's index.

    Names given in the config are the user's choice: a repeated one is refused, not renamed.
    `where` names the input in messages (default: the `data.styles` key).
    """
    derived = [entry.name for entry in resolved]
    named = []
    for index, entry in enumerate(resolved):
        name = entry.name
        if not given[index].name and derived.count(name) > 1:
            name = f"{name}-{index}"
        key = where or style_name_key(given, index)
        check_name_part(name, key)
        earlier = [k for k, other in enumerate(named) if other.name == name]
        if earlier:
            raise UserError(f"style name {name!r} is used twice", key,
                            f"data.styles[{earlier[0]}] has it too; give each style its own name")
        named.append(dataclasses.replace(entry, name=name))
    return named


def check_name_part(name: str, key: str) -> str:
    """Refuse a name that goes into output file names unless it is a plain file name: no separator,
    no `.`/`..`, no leading dot (hidden files, and our temporary files' prefix), no control characters."""
    unsafe = (
        not name
        or name.startswith(".")
        or any(separator in name for separator in ("/", "\\"))
        or any(ord(character) < 32 or ord(character) == 127 for character in name)
    )
    if unsafe:
        raise UserError(f"unusable output name {name!r}", key,
                        "names used in output file names must be plain file names (no '/', '\\', "
                        "leading '.' or control characters)")
    return name


def check_output_name(name: str, key: str) -> str:
    """An output name is a relative posix path (`sub/photo_style`: outputs mirror the input tree)
    whose every part is a plain file name (`check_name_part`), so it stays inside the output folder."""
    if name.startswith("/"):
        raise UserError(f"unusable output name {name!r}", key, "output names are relative to model.output.folder")
    for part in name.split("/"):
        check_name_part(part, key)
    return name


def rel_stem(rel: str) -> str:
    """`sub/photo.png` -> `sub/photo`."""
    return str(PurePosixPath(rel).with_suffix(""))


def default_output_name(rel: str, styles: Sequence["StyleEntry"], together: bool) -> str:
    """The output name made from the content's path relative to its input root and the style
    names, never from a position in a list, so adding inputs renames nothing.

    together (every style on one content, today's behaviour): `<rel stem>`; otherwise (one job per
    pairing or manifest row): `<rel stem>_<style>`, `<rel stem>_<style>+<style>` for fused masked
    styles, and `<rel stem>` when several unmasked styles each write `<name>_<style>.png` anyway.
    """
    stem = rel_stem(rel)
    if together or (len(styles) > 1 and styles[0].mask is None):
        return stem
    return f"{stem}_{'+'.join(entry.name for entry in styles)}"


def disambiguated(name: str, content: str) -> str:
    """`name` with a short hash of the content's path: stable, whatever the order of the inputs."""
    digest = hashlib.sha256(os.path.normpath(os.path.abspath(content)).encode()).hexdigest()[:8]
    return f"{name}-{digest}"


def distinct_job_outputs(specs: list["JobSpec"]) -> list[tuple["JobSpec", JobFiles]]:
    """Each job with its files, no file name shared in the whole run (results, grids and masks
    alike), so no job overwrites another's file or is skipped because of it.

    A derived name whose files would meet another job's (two inputs with the same relative path,
    content `x_grid.png` next to `x.png`) gets a hash of its content path appended; a name the user
    gave is refused instead, and so is a clash inside one job (a style named `grid`). Names are
    compared case-folded because on macOS and Windows `X.png` and `x.png` are one file.
    """
    taken: dict[str, tuple[int, str]] = {}  # case-folded file name -> (job index, which output it is)
    jobs = []
    for index, spec in enumerate(specs):
        check_output_name(spec.name, spec.where)
        files = JobFiles.for_job(spec.name, spec.styles)
        if not spec.given and any(file.casefold() in taken for _, file in files.labelled()):
            spec = dataclasses.replace(spec, name=disambiguated(spec.name, spec.content))
            files = JobFiles.for_job(spec.name, spec.styles)
        for what, file in files.labelled():
            label = f"the {what} of {spec.where}"
            longest = max(len(part.encode()) for part in file.split("/"))
            if longest > MAX_FILE_NAME_BYTES:
                raise UserError(f"output file name too long ({longest} bytes)", spec.where,
                                f"{label} would be {file!r}, over {MAX_FILE_NAME_BYTES} bytes; "
                                "shorten the content's file name or the style names")
            if file.casefold() in taken:
                other_job, other_label = taken[file.casefold()]
                # inside one job only a style name can cause it; across jobs, the content names
                where = "data.styles" if other_job == index else spec.where
                raise UserError("two outputs would have the same file name", where,
                                f"{file} would be both {other_label} and {label}; rename one")
            taken[file.casefold()] = (index, label)
        jobs.append((spec, files))
    return jobs
