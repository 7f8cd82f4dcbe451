"""Is a job already done? The resume rules of `diffstyler predict`, and its `results.jsonl`.

A job counts as done only when every one of its output files exists, decodes, and carries the hash
of the settings the job would be made with now (`settings_hash`, stored in each PNG's
`outputs.SETTINGS_HASH_KEY` text chunk). Otherwise it is redone:
- a file that does not decode (truncated by a crash or a full disk) is removed;
- temporary files left by interrupted writes of the job's files are removed (not those that
  another run writing into the same folder is writing now: `outputs.remove_abandoned_temporary_files`);
- a file made with other settings is replaced, and a log line says so, so that a changed config
  never silently keeps an old result.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from diffstyler.outputs import SETTINGS_HASH_KEY, atomic_write, remove_abandoned_temporary_files

log = logging.getLogger(__name__)

MISSING = "missing"
BROKEN = "does not decode"
OTHER_SETTINGS = "was made with other settings"


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of the settings as canonical JSON (sorted keys), so equal settings give equal hashes."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def output_problem(path: Path, expected_hash: str) -> Optional[str]:
    """Why `path` is not a finished output made with `expected_hash` (None: it is)."""
    if not path.is_file():
        return MISSING
    try:
        with Image.open(path) as image:
            image.load()  # decodes every pixel: a truncated file fails here, not at the header
            stored = image.text.get(SETTINGS_HASH_KEY)
    except Exception:  # PIL raises OSError, SyntaxError, ValueError, zlib.error... for broken files
        return BROKEN
    return None if stored == expected_hash else OTHER_SETTINGS


def remove_temporary_files(paths: list[Path]) -> None:
    """The temporary files of `paths` left by killed writes; those another run is writing stay."""
    for path in paths:
        remove_abandoned_temporary_files(path)


def job_is_done(paths: list[Path], expected_hash: str) -> bool:
    """True when every file in `paths` is a finished output made with `expected_hash`.

    Cleans up on the way (temporary files, files that do not decode) and logs why a job that had
    outputs is redone.
    """
    remove_temporary_files(paths)
    problems = {path: output_problem(path, expected_hash) for path in paths}
    for path, problem in problems.items():
        if problem == BROKEN:
            path.unlink(missing_ok=True)
    if all(problem is None for problem in problems.values()):
        return True
    found = [f"{path.name} {problem}" for path, problem in problems.items() if problem not in (None, MISSING)]
    if found:
        log.warning("redoing the job of %s: %s", paths[0].name, "; ".join(found))
    return False


# --- results.jsonl ------------------------------------------------------------------------------
#
# Every process appends its finished jobs to its own part file (no lock, so any shared filesystem
# will do; a line is flushed and fsynced as soon as its job ends, so a killed run loses none). At
# the end of the run, after all processes are done, rank zero merges the part files into
# `results.jsonl`: one line per job of the run, in job order, the latest line of each job winning,
# except that "skipped" (found finished) never hides the line of the run that made the job. Part
# files of a killed run are merged by the next one.

RESULTS_NAME = "results.jsonl"
PARTS_FOLDER = ".diffstyler-results"
DONE, SKIPPED, FAILED = "done", "skipped", "failed"


class ResultsLog:
    """This process's part file of `results.jsonl` in `folder`."""

    def __init__(self, folder: str | os.PathLike):
        self.path = Path(folder) / PARTS_FOLDER / f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}.jsonl"

    def record(self, entry: dict[str, Any]) -> None:
        """Append one job's line (keys: id, content, styles, loras, methods, images, outputs, status,
        seconds, error).

        All or nothing: a write that fails part way (a full disk) is cut off again before the error
        goes on, so that the next line does not land on the end of a torn one (both would be lost)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({**entry, "time": time.time()}, default=str) + "\n").encode("utf-8")
        with open(self.path, "ab", buffering=0) as handle:  # unbuffered: nothing left to flush after an error
            start = handle.seek(0, os.SEEK_END)
            try:
                written = 0
                while written < len(line):
                    written += handle.write(line[written:])
                os.fsync(handle.fileno())
            except OSError:
                handle.truncate(start)
                raise


def read_json_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a file, one per line; a torn last line (a killed writer) is left out."""
    entries = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "id" in entry:
            entries.append(entry)
    return entries


def merge_results(folder: str | os.PathLike, job_ids: list[str]) -> list[dict[str, Any]]:
    """Merge the part files and the previous `results.jsonl` into `results.jsonl` (atomically):
    one line per job of `job_ids` that has one, in that order. Returns the lines written."""
    folder = Path(folder)
    parts_folder = folder / PARTS_FOLDER
    parts = sorted(parts_folder.glob("*.jsonl")) if parts_folder.is_dir() else []
    previous = folder / RESULTS_NAME
    entries = read_json_lines(previous) if previous.is_file() else []
    for part in parts:
        entries += read_json_lines(part)
    latest: dict[str, dict[str, Any]] = {}
    for entry in sorted(entries, key=lambda e: e.get("time", 0.0)):
        earlier = latest.get(entry["id"])
        if entry.get("status") == SKIPPED and earlier is not None and earlier.get("status") == DONE:
            continue
        latest[entry["id"]] = entry
    lines = [latest[job_id] for job_id in job_ids if job_id in latest]
    text = "".join(json.dumps(line, default=str) + "\n" for line in lines)
    atomic_write(previous, lambda handle: handle.write(text.encode("utf-8")))
    for part in parts:
        part.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # another process may have started a part file meanwhile
        parts_folder.rmdir()
    return lines
