"""Is a job already done? The resume rules of `diffstyler predict`.

A job counts as done only when every one of its output files exists, decodes, and carries the hash
of the settings the job would be made with now (`settings_hash`, stored in each PNG's
`outputs.SETTINGS_HASH_KEY` text chunk). Otherwise it is redone:
- a file that does not decode (truncated by a crash or a full disk) is removed;
- temporary files left by interrupted writes of the job's files are removed;
- a file made with other settings is replaced, and a log line says so, so that a changed config
  never silently keeps an old result.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Optional

from PIL import Image

from diffstyler.outputs import SETTINGS_HASH_KEY, temporary_files

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
    for path in paths:
        for temporary in temporary_files(path):
            temporary.unlink(missing_ok=True)


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
