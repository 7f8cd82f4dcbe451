"""The feature networks of the quality metrics, from local weight files only, never downloaded.

Weights are read weights-only (`torch.load(..., weights_only=True)` or `.safetensors`). A missing file
is a `MissingFileError` naming the file and the official URL; a pickle that needs code is refused (a
`UserError`). Defaults are the file names torchvision itself would use in the torch hub cache,
`<torch.hub.get_dir()>/checkpoints/<name>` (CSD's: `weights/CSD-ViT-L/pytorch_model.bin`):

* CFSD, `vgg_features`: VGG-19 `vgg19-dcbb9e9d.pth` (VGG-16 `vgg16-397923af.pth`), torchvision layout
  `features.<i>.weight/bias`; the trunk up to relu3_1 behind an ImageNet normalisation (`cfsd.py`).
* LPIPS, `lpips_network`: AlexNet `alexnet-owt-7be5be79.pth` (torchvision layout `features.<i>.*`,
  `classifier.*`), mapped onto torchmetrics' LPIPS slices `net.slice<k>.<i>.*`; the LPIPS linear layers
  come from the file torchmetrics ships inside its package, `torchmetrics/functional/image/lpips_models/alex.pth`
  (keys `lin0.model.1.weight` ... `lin4.model.1.weight`, [1, C, 1, 1], saved on CUDA, so loaded to the
  CPU). torchmetrics' own constructor cannot be used offline: it always builds an AlexNet with
  torchvision's `weights=DEFAULT`, which downloads (`metrics.OfflineLPIPS` skips it).
* FID, `inception_features(kind="art")`: ArtFID's `art_inception.pth` (huggingface.co/matthias-wright/art_inception).
  What ArtFID's code shows (github.com/matthias-wright/art-fid `art_fid/art_fid.py`, and the copy of its
  `inception.py` at the root of StyleID): a copy of torchvision's `Inception3` with two classifier heads
  (`fc1`, `fc2`, `AuxLogits1`, `AuxLogits2`), loaded with `load_state_dict(ckpt, strict=False)`;
  features = `model(x, return_features=True)`, the 2048-d average pool, on `ToTensor()` images in
  [0, 1] with NO normalisation (`transform_input=False`) and NO resize to 299 (ArtFID: native size;
  StyleID's `eval_artfid.py`: `Resize(512)` first, which `diffstyler test` does in `data.py`). So the
  trunk keys are torchvision's own names (`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`,
  ...), not torch-fidelity's or pytorch-fid's FID-Inception layout, and no key mapping is needed: the
  head keys (`fc*`, `AuxLogits*`) are dropped and every trunk key must be present (stricter than
  ArtFID's strict=False, which would silently keep random layers). Gap: this reading is from ArtFID's
  loading code; the real `art_inception.pth` could not be downloaded here, so its keys are unverified.
  If it does not match, loading fails loudly with the mismatching keys, never silently.
* CSD, `csd_network`: the authors' `pytorch_model.bin` (huggingface.co/tomg-group-umd/CSD-ViT-L), what
  their `CSD/train_csd.py` saves: `{"model_state_dict": DDP state dict, "opt_bb", "opt_proj", "iter",
  "args": argparse.Namespace, ...}`, read as their `main_sim.py` reads it (`model_state_dict`, the
  `module.` prefix removed) into `csd.CSDNetwork`, whose names are theirs (`backbone.<OpenAI CLIP visual
  names without proj>`, `last_layer_style`, `last_layer_content`), every key and shape required
  (their loader's strict=False would silently keep random layers). The pickle holds the training
  arguments and numpy numbers beside the tensors, which weights_only refuses by default; exactly those
  plain-data classes are allowed for this file (`csd_release_globals`), any other global is still
  refused. A flat state dict (`.pth` or `.safetensors`) with the same names, with or without the
  prefix, loads too. Gap: the release itself (2.4 GB) could not be downloaded here: its names are
  reconstructed from the authors' code (others' code loads the file into the authors' class with
  strict=True); a mismatch fails loudly with the keys.
* FID, `inception_features(kind="imagenet")`: torchvision's `inception_v3_google-0cc3c7bd.pth`, images
  resized to 299x299 (bilinear, antialiased) and scaled to [-1, 1] (what torchvision's `transform_input`
  does for these weights). These are NOT the TensorFlow FID-Inception weights of pytorch-fid /
  torch-fidelity (`pt_inception-2015-12-05-6726825d.pth`), so such FIDs are comparable only with each
  other, not with published FIDs.

`random_networks.py` has small seeded random networks with the same interfaces (smoke config, tests).
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchmetrics.functional.image import lpips as torchmetrics_lpips

from diffstyler.errors import MissingFileError, UserError, first_line
from diffstyler.evaluation.csd import VIT_L_14, CSDArchitecture, CSDNetwork

WeightsPath = Union[str, os.PathLike, None]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Official files: torchvision's names (what it would look for in the hub cache) and ArtFID's checkpoint.
VGG_FILES = {
    "vgg19": ("vgg19-dcbb9e9d.pth", "https://download.pytorch.org/models/vgg19-dcbb9e9d.pth"),
    "vgg16": ("vgg16-397923af.pth", "https://download.pytorch.org/models/vgg16-397923af.pth"),
}
ALEXNET_FILE = ("alexnet-owt-7be5be79.pth", "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth")
INCEPTION_FILES = {
    "art": ("art_inception.pth", "https://huggingface.co/matthias-wright/art_inception/resolve/main/art_inception.pth"),
    "imagenet": (
        "inception_v3_google-0cc3c7bd.pth",
        "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth",
    ),
}
LPIPS_LINEAR_FILE = Path(torchmetrics_lpips.__file__).parent / "lpips_models" / "alex.pth"

# Indices of the conv layers in torchvision's `features`: they tell VGG-16 and VGG-19 files apart,
# whose first layers have the same shapes.
VGG_CONV_INDICES = {
    "vgg16": (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    "vgg19": (0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34),
}
CFSD_VGG_LAYERS = 12  # features[:12] ends with relu3_1 (index 11), StyleID's layer "11"

INCEPTION_HEADS = ("fc", "fc1", "fc2", "AuxLogits", "AuxLogits1", "AuxLogits2")  # dropped: FID uses the pool
INCEPTION_FEATURES = 2048
IMAGENET_INCEPTION_SIZE = 299

# CSD: the authors' release, on the Hugging Face page of their lab (Tom Goldstein's, University of Maryland),
# 2,438,228,893 bytes, sha256 40e92fad63a361b8136100cd234c42d401ef9b34ff1748234318929ebcc7e7a1 (as recorded
# by two projects that downloaded it; not checked here). Its name says nothing, so the default is a folder
# named after the repository, where `hf download ... --local-dir` puts it.
CSD_FILE = ("pytorch_model.bin", "https://huggingface.co/tomg-group-umd/CSD-ViT-L/resolve/main/pytorch_model.bin")
CSD_DEFAULT_WEIGHTS = Path("weights") / "CSD-ViT-L" / "pytorch_model.bin"
DDP_PREFIX = "module."  # the authors trained under DistributedDataParallel and saved its state dict


@dataclass
class FeatureNetworks:
    """The networks the metrics need: CFSD features, the LPIPS network, the FID feature module and the
    CSD network (`csd.CSDNetwork`)."""

    cfsd: nn.Module
    lpips: nn.Module
    fid: nn.Module
    csd: nn.Module


# ---------------------------------------------------------------------------------------------------
# Loading weights: local files only, weights-only
# ---------------------------------------------------------------------------------------------------


def default_weights_path(file_name: str) -> Path:
    """Where torchvision itself caches `file_name`: `<torch.hub.get_dir()>/checkpoints/<file_name>`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def download_hint(url: str) -> str:
    """How to get a missing weights file: the official URL, by hand."""
    return f"download {url} to that path or name a local copy in the config (nothing is downloaded automatically)"


def load_state_dict_file(weights: WeightsPath, default_name: str, how_to_get: str) -> dict[str, Tensor]:
    """The tensors of a local weights file (`weights`, else the hub-cache default), never downloading.

    A missing file is a MissingFileError whose reason is `how_to_get` (e.g. `download_hint(url)`).
    How the file is read: `read_weights_file`.
    """
    path = Path(weights) if weights is not None else default_weights_path(default_name)
    return flat_state_dict(read_weights_file(path, how_to_get), str(path))


def read_weights_file(path: Path, how_to_get: str, allowed_globals: Sequence = ()) -> object:
    """What a local weights file holds, never downloading; a missing file is a MissingFileError whose
    reason is `how_to_get`.

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`,
    so a pickle that would run code is refused instead of executed. `allowed_globals` widens
    weights_only's allowlist for this one file by plain-data classes (`torch.serialization.safe_globals`
    entries: a class, or a (class, "pickled.name") pair), for a release that stores more than tensors.
    """
    if not path.is_file():
        raise MissingFileError("weights file not found", str(path), how_to_get)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals(list(allowed_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        detail = _weights_unpickler_detail(str(error))
        if "Unsupported global" in detail:  # the pickle names a class or function: it would run code
            raise UserError(
                "refused weights file",
                str(path),
                "it needs code to unpickle, which torch.load(weights_only=True) refuses; use a plain state dict "
                f"of tensors or .safetensors from a trusted source ({detail})",
            ) from error
        raise UserError("unreadable weights file", str(path), f"not a torch weights file ({detail})") from error
    except Exception as error:  # truncated, not a torch file, ...: the user's file, not our bug
        raise UserError("unreadable weights file", str(path), first_line(error)) from error


def flat_state_dict(state: object, shown: str) -> dict[str, Tensor]:
    """`state` if it is a flat mapping of names to tensors, else a UserError naming the file."""
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError("not a state dict", shown, "expected a flat mapping of names to tensors")
    return state


def _weights_unpickler_detail(message: str) -> str:
    """The one informative sentence of torch's long weights_only error (after "WeightsUnpickler error:")."""
    _, found, rest = message.partition("WeightsUnpickler error:")
    paragraph = (rest if found else message).strip().split("\n\n")[0]
    return " ".join(paragraph.split()).split(". ")[0].rstrip(".")


def _load_exactly(module: nn.Module, state: dict[str, Tensor], path: str, what: str) -> None:
    """Load `state` into `module` with every key and shape matching, as a UserError naming the file."""
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise UserError(f"weights do not fit {what}", path, " ".join(str(error).split())[:500]) from error


def _shown_path(weights: WeightsPath, default_name: str) -> str:
    return str(weights if weights is not None else default_weights_path(default_name))


# ---------------------------------------------------------------------------------------------------
# Building blocks shared with random_networks.py
# ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run with the global CPU RNG seeded, restoring it afterwards (callers' seeds stay untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class ImageNetNormalize(nn.Module):
    """[0, 1] RGB -> ImageNet-normalised input of torchvision classifiers."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


def frozen(module: nn.Module) -> nn.Module:
    """`module` in eval mode with no gradients: a fixed feature extractor."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


# ---------------------------------------------------------------------------------------------------
# VGG for CFSD
# ---------------------------------------------------------------------------------------------------


def _vgg_trunk() -> nn.Sequential:
    """torchvision's VGG `features[:12]` (conv1_1 ... relu3_1), randomly initialised; the same modules,
    at the same indices, in VGG-16 and VGG-19. Built here rather than as a whole VGG, whose classifier
    alone has 120M parameters."""

    def conv(in_channels: int, out_channels: int) -> list[nn.Module]:
        return [nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1), nn.ReLU(inplace=True)]

    with seeded(0):
        layers = [*conv(3, 64), *conv(64, 64), nn.MaxPool2d(2, 2), *conv(64, 128), *conv(128, 128)]
        layers += [nn.MaxPool2d(2, 2), *conv(128, 256)]
    assert len(layers) == CFSD_VGG_LAYERS
    return nn.Sequential(*layers)


def _vgg_feature_keys(arch: str) -> set[str]:
    return {f"features.{index}.{param}" for index in VGG_CONV_INDICES[arch] for param in ("weight", "bias")}


def vgg_features(weights: WeightsPath = None, arch: str = "vgg19") -> nn.Module:
    """The CFSD feature network: ImageNet normalisation + VGG `features[:12]` (relu3_1) from a local file.

    `weights`: a torchvision VGG state dict (`features.<i>.weight/bias`; `classifier.*` is ignored);
    default the hub-cache file torchvision uses (`vgg19-dcbb9e9d.pth`, or `vgg16-397923af.pth`).
    StyleID's CFSD is `arch="vgg19"`.
    """
    if arch not in VGG_FILES:
        raise UserError("unknown VGG architecture", arch, f"choose one of {sorted(VGG_FILES)}")
    file_name, url = VGG_FILES[arch]
    state = load_state_dict_file(weights, file_name, download_hint(url))
    shown = _shown_path(weights, file_name)
    # The set of conv indices identifies the architecture: VGG-16 and VGG-19 files would both fit the
    # 12-module trunk, and silently computing CFSD on the wrong network must not happen.
    found = {key for key in state if key.startswith("features.")}
    if found != _vgg_feature_keys(arch):
        other = [name for name in VGG_CONV_INDICES if found == _vgg_feature_keys(name)]
        why = f"it is a {other[0]} state dict" if other else "expected torchvision's features.<i>.weight/bias keys"
        raise UserError(f"weights are not torchvision {arch}", shown, why)
    trunk_state = {}
    for key in found:
        index, param = key[len("features."):].split(".")
        if int(index) < CFSD_VGG_LAYERS:
            trunk_state[f"{index}.{param}"] = state[key]
    trunk = _vgg_trunk()
    _load_exactly(trunk, trunk_state, shown, f"{arch} features[:{CFSD_VGG_LAYERS}]")
    return frozen(nn.Sequential(ImageNetNormalize(), trunk))


def vgg16_features(weights: WeightsPath = None) -> nn.Module:
    """`vgg_features` on VGG-16 (same layer, relu3_1). Not StyleID's CFSD, which uses VGG-19."""
    return vgg_features(weights, arch="vgg16")


# ---------------------------------------------------------------------------------------------------
# LPIPS (AlexNet), offline
# ---------------------------------------------------------------------------------------------------


def _bare_lpips_alex() -> nn.Module:
    """torchmetrics' AlexNet LPIPS network, randomly initialised: nothing is read or downloaded."""
    with seeded(0):
        return torchmetrics_lpips._NoTrainLpips(pretrained=False, net="alex", pnet_rand=True)


def lpips_network(weights: WeightsPath = None, linear_weights: WeightsPath = None) -> nn.Module:
    """The AlexNet LPIPS network from local files: torchvision's AlexNet (`weights`, default the hub-cache
    `alexnet-owt-7be5be79.pth`) and the LPIPS linear layers (`linear_weights`, default the `alex.pth`
    torchmetrics ships in its package)."""
    file_name, url = ALEXNET_FILE
    shown = _shown_path(weights, file_name)
    alexnet = load_state_dict_file(weights, file_name, download_hint(url))
    network = _bare_lpips_alex()
    # LPIPS cuts torchvision's `features` into slices that keep the layer indices as names:
    # features.<i>.<p> -> net.slice<k>.<i>.<p>.
    mapped = {}
    for slice_name, block in network.net.named_children():
        for index, layer in block.named_children():
            for param_name in layer.state_dict():
                source = f"features.{index}.{param_name}"
                if source not in alexnet:
                    raise UserError("weights are not torchvision AlexNet", shown, f"no key {source}")
                mapped[f"{slice_name}.{index}.{param_name}"] = alexnet[source]
    _load_exactly(network.net, mapped, shown, "AlexNet features")
    linear_path = Path(linear_weights) if linear_weights is not None else LPIPS_LINEAR_FILE
    linear = load_state_dict_file(linear_path, LPIPS_LINEAR_FILE.name, "torchmetrics ships this file; reinstall it")
    # The file's keys are lin<k>.model.1.weight; the same layers are lins.<k> of the ModuleList.
    by_index = {key.replace("lin", "", 1): value for key, value in linear.items()}
    _load_exactly(network.lins, by_index, str(linear_path), "LPIPS linear layers")
    return frozen(network)


# ---------------------------------------------------------------------------------------------------
# Inception for FID
# ---------------------------------------------------------------------------------------------------


class InceptionPoolFeatures(nn.Module):
    """The 2048-d average-pool features of an Inception-v3, for `FrechetInceptionDistance(feature=...)`.

    Takes float images [B, 3, H, W] in [0, 1] (uint8 is scaled by 1/255). `kind="art"`: fed as they are
    (ArtFID); `kind="imagenet"`: resized to 299x299 and scaled to [-1, 1]. Never leaves eval mode.
    """

    num_features = INCEPTION_FEATURES  # read by FrechetInceptionDistance instead of a dummy forward

    def __init__(self, trunk: nn.Module, kind: str):
        super().__init__()
        self.trunk = trunk
        self.kind = kind

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        if self.kind == "imagenet":
            size = (IMAGENET_INCEPTION_SIZE, IMAGENET_INCEPTION_SIZE)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
            x = 2 * x - 1
        return self.trunk(x)

    def train(self, mode: bool = True) -> InceptionPoolFeatures:
        return super().train(False)  # batch norm statistics must stay the loaded ones


def _inception_trunk() -> nn.Module:
    """torchvision's Inception3 without heads: its forward returns the 2048-d pool (fc is the identity)."""
    with seeded(0):
        model = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    model.fc = nn.Identity()
    return model


def inception_features(weights: WeightsPath = None, kind: str = "art") -> InceptionPoolFeatures:
    """The FID feature module from a local torchvision-layout Inception-v3 state dict.

    `kind="art"`: ArtFID's `art_inception.pth` (default `<hub>/checkpoints/art_inception.pth`);
    `kind="imagenet"`: torchvision's `inception_v3_google-0cc3c7bd.pth`. Head keys (`fc*`, `AuxLogits*`)
    are ignored; every trunk key must be present with its shape (see the module docstring).
    """
    if kind not in INCEPTION_FILES:
        raise UserError("unknown Inception kind", kind, f"choose one of {sorted(INCEPTION_FILES)}")
    file_name, url = INCEPTION_FILES[kind]
    shown = _shown_path(weights, file_name)
    state = load_state_dict_file(weights, file_name, download_hint(url))
    trunk = _inception_trunk()
    trunk_state = {key: value for key, value in state.items() if key.split(".")[0] not in INCEPTION_HEADS}
    # Batch-norm step counters are unused in eval mode; older checkpoints lack them.
    for key, value in trunk.state_dict().items():
        if key.endswith("num_batches_tracked"):
            trunk_state.setdefault(key, value)
    _load_exactly(trunk, trunk_state, shown, "the Inception-v3 trunk (torchvision layout)")
    return frozen(InceptionPoolFeatures(trunk, kind))


# ---------------------------------------------------------------------------------------------------
# CSD (the authors' CSD_CLIP, ViT-L/14)
# ---------------------------------------------------------------------------------------------------


def csd_release_globals() -> list:
    """The plain-data classes the authors' checkpoint pickles beside its tensors, for weights_only's
    allowlist: Hugging Face's pickle scan of the file lists `argparse.Namespace` (their training
    arguments), `numpy.core.multiarray.scalar` and `numpy.dtype` (numpy numbers), besides what torch
    allows anyway. They make values and call nothing else. The file was written under numpy 1.x
    (`numpy.core`), which numpy 2 calls `numpy._core`: both names are allowed, for the same function;
    numpy 2 rebuilds a dtype as an instance of its `numpy.dtypes` class, so those classes are allowed."""
    import argparse

    import numpy

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x before `_core` existed
        from numpy.core import multiarray
    dtype_classes = [getattr(numpy.dtypes, name) for name in numpy.dtypes.__all__]
    return [argparse.Namespace, numpy.dtype, *dtype_classes,
            (multiarray.scalar, "numpy.core.multiarray.scalar"), (multiarray.scalar, "numpy._core.multiarray.scalar")]


def csd_network(weights: WeightsPath = None, architecture: CSDArchitecture = VIT_L_14) -> CSDNetwork:
    """The CSD network from a local file: the authors' checkpoint (`pytorch_model.bin`, default
    `weights/CSD-ViT-L/pytorch_model.bin`; see the module docstring) or a flat state dict with its names.
    `architecture`: the sizes to expect (the tests load small files of the same layout)."""
    path = Path(weights) if weights is not None else CSD_DEFAULT_WEIGHTS
    content = read_weights_file(path, download_hint(CSD_FILE[1]), csd_release_globals())
    if isinstance(content, dict) and "model_state_dict" in content:
        content = content["model_state_dict"]
    state = {key.removeprefix(DDP_PREFIX): value for key, value in flat_state_dict(content, str(path)).items()}
    network = CSDNetwork(architecture)
    _load_exactly(network, state, str(path), "the authors' CSD_CLIP")
    return frozen(network)
