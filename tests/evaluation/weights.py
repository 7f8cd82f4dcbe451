"""Weight files for the loading tests."""

from __future__ import annotations

from pathlib import Path


class CreatesMarker:
    """Unpickled by full pickle, this runs open(marker, "w"): a file appears. Saved into a weights file,
    it shows whether loading that file ran code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))
