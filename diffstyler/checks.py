"""Checks of the user's inputs that need no model, so that they run before any model loads.

Each raises a `UserError` naming the config key and saying why, e.g.

    output folder not writable (model.output.folder=/data/out): permission denied
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from diffstyler.errors import MissingFileError, UserError, config_error, first_line

LATENT_FACTOR = 8  # the VAE downsamples by 8 (same constant as diffstyler.images)


def check_writable_folder(path: str | os.PathLike, key: str) -> None:
    """`path` is a folder that exists and is writable, or one that can be created.

    Nothing is created here: the check must not leave folders behind when a later check fails.
    """
    where = f"{key}={path}"
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError("output folder is a file", where, "give a folder path")
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path.cwd())
    if not existing.is_dir():
        raise UserError("output folder cannot be created", where, f"{existing} is a file")
    if not folder_is_writable(existing):
        raise UserError("output folder not writable", where, f"no write permission in {existing}")


def folder_is_writable(folder: Path) -> bool:
    return os.access(folder, os.W_OK | os.X_OK)


def check_resolution(resolution: int, key: str) -> None:
    if resolution < LATENT_FACTOR or resolution % LATENT_FACTOR:
        raise config_error(key, f"must be a positive multiple of {LATENT_FACTOR}, got {resolution}")


def check_checkpoint_file(path: str | os.PathLike, key: str = "ckpt_path") -> dict[str, Any]:
    """Read a Lightning checkpoint the safe way (weights_only: plain tensors and containers only).

    A pickle that would need to import or run code is refused by torch's weights-only unpickler,
    so a crafted checkpoint cannot execute anything.
    """
    where = f"{key}={path}"
    if not Path(path).is_file():
        raise MissingFileError("checkpoint not found", where, "it is a folder" if Path(path).is_dir() else "no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        # torch's message is long; the name of the global it refused is what the user needs.
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise UserError("checkpoint refused", where, f"it needs code to load ({refused.group(1)}); only weights are loaded") from error
        raise UserError("not a checkpoint", where, "torch cannot unpickle it") from error
    except Exception as error:  # torch has no one error type for "not a checkpoint" (RuntimeError, EOFError, IndexError...)
        raise UserError("not a checkpoint", where, f"torch cannot read it ({first_line(error)})") from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError("not a checkpoint", where, "it has no state_dict (is it a Lightning checkpoint from `diffstyler fit`?)")
    return checkpoint

