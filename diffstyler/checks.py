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
from huggingface_hub import is_offline_mode, try_to_load_from_cache
from huggingface_hub.utils import HFValidationError, validate_repo_id
from safetensors import safe_open

from diffstyler.errors import MissingFileError, UserError, config_error, first_line
from diffstyler.models import ModelSpec, check_model_quantization, model_load_error, random_kind

LATENT_FACTOR = 8  # the VAE downsamples by 8 (same constant as diffstyler.images)


def check_writable_folder(path: str | os.PathLike, key: str, what: str = "output folder") -> None:
    """`path` is a folder that exists and is writable, or one that can be created.

    Nothing is created here: the check must not leave folders behind when a later check fails.
    """
    where = f"{key}={path}"
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{what} is a file", where, "give a folder path")
    existing = next((parent for parent in (folder, *folder.parents) if parent.exists()), Path.cwd())
    if not existing.is_dir():
        raise UserError(f"{what} cannot be created", where, f"{existing} is a file")
    if not folder_is_writable(existing):
        raise UserError(f"{what} not writable", where, f"no write permission in {existing}")


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



# --- what is the same for every job of a predict run (`StylizePredictor.check_run`) ---------------

def check_model_reference(spec: ModelSpec) -> None:
    """`model.model.name` names a model that can be loaded, without reading its weights: a model built here (`tiny`, ...), a
    local diffusers folder (with model_index.json), a `.safetensors` / `.ckpt` file, or a Hugging
    Face model id (in the local cache when HF_HUB_OFFLINE is set; otherwise it is downloaded when
    the model loads, and nothing is checked now). A quantized or GGUF transformer: the model is a
    transformer family and the package is installed (`models.check_model_quantization`)."""
    check_named_model(spec)
    check_model_quantization(spec)


def check_named_model(spec: ModelSpec) -> None:
    if random_kind(spec.name) is not None:
        return
    path = Path(spec.name).expanduser()
    if spec.is_single_file:
        if not path.is_file():
            raise model_load_error(spec.name, FileNotFoundError(f"no such checkpoint file: {spec.name}"))
        return
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise model_load_error(spec.name, FileNotFoundError(f"the folder {spec.name} has no model_index.json"))
        return
    if path.exists():
        raise model_load_error(spec.name, ValueError(f"{spec.name} is a file, but neither a .safetensors nor a .ckpt file"))
    try:
        validate_repo_id(spec.name)
    except HFValidationError:
        raise model_load_error(spec.name, FileNotFoundError(f"no such folder: {spec.name}")) from None
    if is_offline_mode() and not isinstance(try_to_load_from_cache(spec.name, "model_index.json", revision=spec.revision), str):
        raise model_load_error(spec.name, FileNotFoundError("not cached"))


def check_lora_finite(file: Path) -> None:
    """Every tensor of the LoRA is finite: NaN or inf weights would fail each job using it, after
    its inversion. LoRA files are small: every tensor is read."""
    try:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if not torch.isfinite(handle.get_tensor(key)).all():
                    raise UserError("LoRA has non-finite weights", str(file),
                                    f"{key} holds NaN or inf values; train the LoRA again or use another file")
    except UserError:
        raise
    except Exception as error:  # safetensors' own error types: a truncated or damaged file
        raise UserError("LoRA file unreadable", str(file), f"its tensors cannot be read ({first_line(error)})") from error
