"""A quantized transformer (SD 3.5, FLUX.1): its weights in fewer bits, loaded the way people get them.

Two config keys, one per mechanism (`ModelSpec.quantization`, `ModelSpec.transformer`):

- `model.model.quantization` quantizes the transformer as it loads from the model's own weights
  (diffusers' `quantization_config` of the transformer class's `from_pretrained`, or of its
  `from_single_file` for a single-file checkpoint):
    "int8": torchao's int8 weight-only (`TorchAoConfig(Int8WeightOnlyConfig())`): half of bf16's
            bytes; it computes in `model.model.dtype` and runs on any device (the CPU included);
    "nf4":  bitsandbytes' 4-bit NormalFloat with double quantization, computing in
            `model.model.dtype` (`BitsAndBytesConfig(load_in_4bit=True, ...)`): a quarter of
            bf16's bytes; bitsandbytes' kernels need a CUDA device.
- `model.model.transformer` names a GGUF file of the transformer (the Q8_0 / Q5_K / Q4_K files the
  community publishes for FLUX.1 and SD 3.5): `from_single_file` with
  `GGUFQuantizationConfig(compute_dtype=model.model.dtype)`; its weights stay quantized and each
  layer is dequantized when it runs. Its configs come from `model.model.name` (a hub id or diffusers
  folder of the same family, e.g. black-forest-labs/FLUX.1-dev), as does the rest of the pipeline.
  A GGUF file is quantized already: with it, `quantization` stays "none".

Only the transformer is quantized: the VAE and the text encoders stay in `model.model.dtype` (on
a small GPU, offload them: `model.offload`). The style LoRAs are PEFT adapters on the quantized
linears (PEFT's torchao, bitsandbytes and GGUF-aware layers), trained and applied in float32.

Each mechanism needs its package, none of which the default install brings (bitsandbytes is for
CUDA): `check_quantization` refuses in one line, before any weight loads, a model that is not a
transformer family or a package that is missing, with the command that installs it;
`check_quantization_device` refuses nf4 off CUDA.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from diffstyler.errors import MissingFileError, UserError, config_error

QUANTIZATIONS = ("none", "int8", "nf4")
GGUF_SUFFIX = ".gguf"
INSTALL = "pip install -c constraints.txt -e '.[quant]'"
# mechanism -> (the Python package it needs, what it is, in messages)
PACKAGES = {
    "int8": ("torchao", "torchao's int8 weight-only"),
    "nf4": ("bitsandbytes", "bitsandbytes' 4-bit"),
    "gguf": ("gguf", "a GGUF file"),
}
QUANTIZATION_KEY, TRANSFORMER_KEY = "model.model.quantization", "model.model.transformer"


def check_quantization_values(quantization: str, transformer: Optional[str]) -> None:
    """What can be told from the values alone (`ModelSpec.__post_init__`)."""
    if quantization not in QUANTIZATIONS:
        raise config_error(QUANTIZATION_KEY, f"must be one of {', '.join(QUANTIZATIONS)}, got {quantization!r}")
    if transformer is None:
        return
    if not str(transformer).endswith(GGUF_SUFFIX):
        raise config_error(TRANSFORMER_KEY, f"a GGUF file of the transformer ({GGUF_SUFFIX}), got {transformer!r}")
    if quantization != "none":
        raise config_error(QUANTIZATION_KEY, f"{quantization} with a GGUF transformer: the file is quantized already; leave it none")


def mechanism(quantization: str, transformer: Optional[str]) -> Optional[str]:
    """"int8", "nf4", "gguf", or None for a transformer loaded as it is."""
    if transformer is not None:
        return "gguf"
    return None if quantization == "none" else quantization


def check_quantization(quantization: str, transformer: Optional[str], denoiser: str, model: str) -> None:
    """Before any weight loads: the model is a transformer family (`denoiser`: its kind's denoiser
    subfolder, "unet" or "transformer"), nf4 has CUDA on this machine, the mechanism's package is
    installed, a GGUF file exists and is one."""
    method = mechanism(quantization, transformer)
    if method is None:
        return
    key = TRANSFORMER_KEY if method == "gguf" else QUANTIZATION_KEY
    package, what = PACKAGES[method]
    if denoiser != "transformer":
        raise config_error(key, f"{what} quantizes a diffusion transformer (SD 3.5, FLUX.1); {model} has a UNet "
                                "(SD 1.x, SD 2.x, SDXL): leave it " + ("null" if method == "gguf" else "none"))
    if method == "nf4" and not torch.cuda.is_available():
        # said before the package: on a machine without CUDA, installing bitsandbytes would not help
        raise config_error(key, f"nf4 ({what}) needs a CUDA device, this machine has none; use int8 (torchao, runs on the CPU too) or none")
    if importlib.util.find_spec(package) is None:
        raise config_error(key, f"{what} needs the {package} package, which is not installed: {INSTALL} (or pip install {package})")
    if method == "gguf":
        check_gguf_file(transformer)


def check_gguf_file(path: str) -> None:
    file = Path(path).expanduser()
    if not file.is_file():
        raise MissingFileError("GGUF file not found", f"{TRANSFORMER_KEY}={path}", "it is a folder" if file.is_dir() else "no such file")
    with open(file, "rb") as handle:
        if handle.read(4) != b"GGUF":
            raise UserError("not a GGUF file", f"{TRANSFORMER_KEY}={path}", "it does not start with the GGUF magic bytes")


def check_quantization_device(quantization: str, device: torch.device | str, where: str = QUANTIZATION_KEY) -> None:
    """nf4 needs CUDA (bitsandbytes' kernels); int8 and GGUF run anywhere."""
    if quantization == "nf4" and torch.device(device).type != "cuda":
        raise config_error(where, f"nf4 (bitsandbytes' 4-bit) needs a CUDA device, the run is on {torch.device(device).type}; "
                                  "use int8 (torchao, runs on the CPU too) or none")


def quantization_config(method: str, dtype: torch.dtype) -> Any:
    """The diffusers `quantization_config` of a transformer for `method` ("int8", "nf4", "gguf")."""
    if method == "int8":
        from diffusers import TorchAoConfig
        from torchao.quantization import Int8WeightOnlyConfig

        return TorchAoConfig(Int8WeightOnlyConfig())
    if method == "nf4":
        from diffusers import BitsAndBytesConfig

        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if method == "gguf":
        from diffusers import GGUFQuantizationConfig

        return GGUFQuantizationConfig(compute_dtype=dtype)
    raise ValueError(f"no quantization {method!r}")


def load_quantized_transformer(transformer_class: type, source: str, method: str, dtype: torch.dtype,
                               gguf_file: Optional[str] = None, single_file: Optional[str] = None, revision: Optional[str] = None,
                               local_files_only: bool = False) -> torch.nn.Module:
    """The transformer quantized by `method` as it loads:
    - "gguf": `gguf_file` through `from_single_file`, its configs from `source` (a hub id or
      diffusers folder with a `transformer` subfolder);
    - "int8" / "nf4" of a single-file checkpoint (`single_file`): through `from_single_file`, its
      configs from `source`;
    - otherwise from `source`'s `transformer` subfolder (`from_pretrained`)."""
    config = quantization_config(method, dtype)
    file = gguf_file if method == "gguf" else single_file
    if file is not None:
        return transformer_class.from_single_file(file, config=source, subfolder="transformer", quantization_config=config,
                                                  torch_dtype=dtype, local_files_only=local_files_only)
    return transformer_class.from_pretrained(source, subfolder="transformer", revision=revision, quantization_config=config,
                                             torch_dtype=dtype)


def quantize_random_transformer(transformer: torch.nn.Module, method: str, dtype: torch.dtype,
                                gguf_file: Optional[str] = None) -> torch.nn.Module:
    """A model built here with random weights, quantized as a downloaded one is: its weights (or,
    for GGUF, only its config) written to a scratch folder and loaded back through
    `load_quantized_transformer`, the same call a real model's loading makes."""
    with tempfile.TemporaryDirectory(prefix="diffstyler-transformer-") as folder:
        target = os.path.join(folder, "transformer")
        if method == "gguf":
            transformer.save_config(target)
        else:
            transformer.save_pretrained(target, safe_serialization=True)
        return load_quantized_transformer(type(transformer), folder, method, dtype, gguf_file=gguf_file, local_files_only=True)


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether a model was loaded quantized (diffusers sets `is_quantized` on such models)."""
    return bool(getattr(module, "is_quantized", False))

