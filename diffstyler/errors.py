"""`UserError`: the base of every exception for what the user can fix.

A `UserError` says what failed, where (a file or a config key) and why. The `diffstyler` command
prints it as one line,

    diffstyler <subcommand>: error: <what> (<where>): <why>

exits with status 2, and shows the traceback only with `--debug` (or DIFFSTYLER_DEBUG=1). Raise
it (or a subclass: `MissingFileError`, `images.ImageLoadError`, `masks.MaskError`,
`models.ModelLoadError`) for every error caused by the user's input or environment; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Optional


class UserError(ValueError):
    """An error in the user's input or environment: `what` failed at `where` (file or key) because `why`.

    A ValueError, so that code which already catches ValueError for bad values keeps working.
    """

    def __init__(self, what: str, where: Optional[str] = None, why: str = ""):
        self.what, self.where, self.why = what, where, why
        super().__init__(self.line())

    def line(self) -> str:
        place = f" ({self.where})" if self.where else ""
        reason = f": {self.why}" if self.why else ""
        return f"{self.what}{place}{reason}"

    def __str__(self) -> str:
        return self.line()


class UserErrors(UserError):
    """Several user errors found together (e.g. the reasons every job of a run would fail): the
    `diffstyler` command prints one line per entry of `lines`; `str` is the first."""

    def __init__(self, lines: list[str]):
        self.lines = list(lines)
        super().__init__(self.lines[0])


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist. Also a FileNotFoundError, so that code which
    catches FileNotFoundError keeps working."""


def config_error(key: str, why: str) -> UserError:
    """A bad config value, named by its key (e.g. `model.injection.feature_steps`)."""
    return UserError("invalid config value", key, why)


def first_line(text: object) -> str:
    """The first non-empty line of a message (of an exception: its type's name if it is empty);
    the rest of a multi-line message is detail for --debug."""
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(text).__name__ if isinstance(text, BaseException) else ""
