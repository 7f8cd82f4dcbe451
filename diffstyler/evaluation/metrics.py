"""Stylization quality metrics: LPIPS, FID, ArtFID and CFSD on torchmetrics, from local weights only.

What is measured (the protocol of StyleID, Chung et al., CVPR 2024, which follows ArtFID):

* LPIPS (content vs result): torchmetrics' `LearnedPerceptualImagePatchSimilarity` with the AlexNet
  backbone and the LPIPS v0.1 linear layers, on images in [0, 1] (`normalize=True`, i.e. 2x - 1, as
  StyleID's `LPIPS` wrapper of the `lpips` package does).
* FID (style images vs results): torchmetrics' `FrechetInceptionDistance` with a custom `feature`
  module, the 2048-d average-pool output of an Inception-v3 (`inception_features`).
* ArtFID = (1 + LPIPS) * (1 + FID) (Wright & Ommer, GCPR 2022; `artfid`).
* CFSD (content feature structure distance, StyleID), defined below.

CFSD, exactly. For a content image c and its result r (same size, float RGB in [0, 1]):

1. F = VGG-19 `features[:12]` (up to and including relu3_1, 256 channels, 1/4 resolution) of the
   ImageNet-normalised image (mean 0.485/0.456/0.406, std 0.229/0.224/0.225), no resizing;
2. each of the n = h*w positions is a row vector f_i of C channels, divided by C: x_i = f_i / C;
3. self-similarity S_ij = x_i . x_j (so f_i . f_j / C**2), an n x n matrix;
4. each ROW is turned into a distribution by a softmax over j: P = softmax(S_content), Q = softmax(S_result);
5. CFSD(c, r) = sum_i KL(P_i || Q_i) = sum_i sum_j P_ij (log P_ij - log Q_ij): the content's
   distribution is the reference, and the KL of every row is SUMMED over all n rows (not averaged),
   so the value grows with the number of feature positions, i.e. with the image size;
6. the reported CFSD is the mean of CFSD(c, r) over all pairs.

Source: StyleID's evaluation code, github.com/jiwoogit/StyleID, `evaluation/image_metrics.py` class
`PatchSimi` (layer {"11": "conv3"} of `models.vgg19(pretrained=True).features`; `patch_simi_*`:
transpose/reshape to [b, h*w, c], `.div(c)`, `bmm` with its transpose, (log_)softmax over dim=-1;
`F.kl_div(log_softmax(S_result), softmax(S_content), reduction="batchmean")` on [b, n*n] maps, which
is KL(content || result) summed over all n*n entries; its `forward(input, target)` is called as
`metric(stylized, content)`, so the log-probabilities are the result's even though that method is named
`patch_simi_cnt`), and `evaluation/eval_artfid.py` (`compute_patch_simi`: `ToTensor()` only, no resize,
batch size 1, mean over images). Deviations, all on purpose: (a) the rows are processed in chunks
(`row_chunk`), which gives the same sum without ever holding the n x n matrix (1 GB per 512x512 image);
(b) the similarities and the KL are computed in float64 (`dtype`): the per-row KL is tiny (the rows are
nearly uniform over 16384 positions at 512x512) and float32 log-softmax rounding is of the same order;
(c) position order (StyleID flattens width-major) does not matter, the sum is invariant under it.
Note: StyleID uses VGG-19, not VGG-16; both share the first 12 modules' shapes, so `vgg16_features`
exists (same layer) but gives different numbers and is not StyleID's CFSD.

Weights, all local and weights-only (`torch.load(..., weights_only=True)` or `.safetensors`); nothing is
ever downloaded. A missing file is a `MissingFileError` naming the file and the official URL; a pickle
that needs code is refused (a `UserError`). Defaults are the file names torchvision itself would use
in the torch hub cache, `<torch.hub.get_dir()>/checkpoints/<name>`:

* VGG-19 `vgg19-dcbb9e9d.pth` (VGG-16 `vgg16-397923af.pth`), torchvision layout `features.<i>.weight/bias`;
* AlexNet `alexnet-owt-7be5be79.pth` (torchvision layout `features.<i>.*`, `classifier.*`), mapped onto
  torchmetrics' LPIPS slices `net.slice<k>.<i>.*`; the LPIPS linear layers come from the file torchmetrics
  ships inside its package, `torchmetrics/functional/image/lpips_models/alex.pth` (keys
  `lin0.model.1.weight` ... `lin4.model.1.weight`, [1, C, 1, 1], saved on CUDA, so loaded to the CPU).
  torchmetrics' own constructor cannot be used offline: it always builds an AlexNet with
  torchvision's `weights=DEFAULT`, which downloads. `OfflineLPIPS` skips that constructor (see there).
* Inception, `kind="art"`: ArtFID's `art_inception.pth` (huggingface.co/matthias-wright/art_inception).
  What ArtFID's code shows (github.com/matthias-wright/art-fid `art_fid/art_fid.py`, and the copy of its
  `inception.py` at the root of StyleID): a copy of torchvision's `Inception3` with two classifier heads
  (`fc1`, `fc2`, `AuxLogits1`, `AuxLogits2`), loaded with `load_state_dict(ckpt, strict=False)`;
  features = `model(x, return_features=True)`, the 2048-d average pool, on `ToTensor()` images in
  [0, 1] with NO normalisation (`transform_input=False`) and NO resize to 299 (ArtFID: native size;
  StyleID's copy: `Resize(512)` first). So the trunk keys are torchvision's own names
  (`Conv2d_1a_3x3.conv.weight`, `Mixed_7c.branch_pool.bn.running_var`, ...), not torch-fidelity's or
  pytorch-fid's FID-Inception layout, and no key mapping is needed: the head keys (`fc*`, `AuxLogits*`)
  are dropped and every trunk key must be present (stricter than ArtFID's strict=False, which would
  silently keep random layers). Gap: this reading is from ArtFID's loading code; the real
  `art_inception.pth` could not be downloaded here, so its keys are unverified. If it does not match,
  loading fails loudly with the mismatching keys, never silently.
* Inception, `kind="imagenet"`: torchvision's `inception_v3_google-0cc3c7bd.pth`, images resized to
  299x299 (bilinear, antialiased) and scaled to [-1, 1] (what torchvision's `transform_input` does for
  these weights). These are NOT the TensorFlow FID-Inception weights of pytorch-fid / torch-fidelity
  (`pt_inception-2015-12-05-6726825d.pth`), so such FIDs are comparable only with each other, not with
  published FIDs.

Images everywhere are float tensors [B, 3, H, W] in [0, 1]; resizing (StyleID: 512) is the caller's job.
StyleID also reports LPIPS on greyscale images and ArtFID_infinity; neither is computed here.
`random_feature_networks` gives small seeded random networks with the same interfaces, for the smoke
config and tests: their numbers mean nothing.
"""

from __future__ import annotations

import contextlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Union

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.functional.image import lpips as torchmetrics_lpips
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchmetrics.utilities import dim_zero_cat

from diffstyler.errors import MissingFileError, UserError, config_error, first_line

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


# ---------------------------------------------------------------------------------------------------
# CFSD
# ---------------------------------------------------------------------------------------------------


def _scaled_positions(features: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, C, h, w] -> [B, h*w, C]: one row per position, divided by C as StyleID does."""
    channels = features.shape[1]
    return features.to(dtype).flatten(2).transpose(1, 2) / channels


def cfsd_from_features(
    content_features: Tensor,
    result_features: Tensor,
    row_chunk: int = 1024,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """CFSD of each pair, [B], from feature maps [B, C, h, w] (see the module docstring).

    sum over rows i of KL(softmax_j(S_content[i]) || softmax_j(S_result[i])), S = X X^T, X = F / C.
    """
    if content_features.ndim != 4 or content_features.shape != result_features.shape:
        raise ValueError(
            "CFSD needs content and result feature maps of one shape [B, C, h, w], got "
            f"{tuple(content_features.shape)} and {tuple(result_features.shape)}"
        )
    content_rows = _scaled_positions(content_features, dtype)
    result_rows = _scaled_positions(result_features, dtype)
    positions = content_rows.shape[1]
    total = torch.zeros(content_rows.shape[0], dtype=dtype, device=content_rows.device)
    # Rows are independent distributions, so a block of rows at a time gives the same sum without
    # holding the n x n similarity matrix.
    for start in range(0, positions, row_chunk):
        rows = slice(start, min(start + row_chunk, positions))
        log_p = F.log_softmax(content_rows[:, rows] @ content_rows.transpose(1, 2), dim=-1)
        log_q = F.log_softmax(result_rows[:, rows] @ result_rows.transpose(1, 2), dim=-1)
        total += (log_p.exp() * (log_p - log_q)).sum(dim=(1, 2))
    return total


def _check_unit_images(images: Tensor, name: str) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(f"{name}: expected float images [B, 3, H, W], got {images.dtype} {tuple(images.shape)}")
    if images.numel() and (images.min() < 0 or images.max() > 1):
        raise ValueError(f"{name}: expected values in [0, 1], got [{images.min():.3g}, {images.max():.3g}]")


class CFSD(Metric):
    """Mean CFSD over all (content, result) pairs, on a given feature network (see the module docstring).

    `features` maps images [B, 3, H, W] in [0, 1] to feature maps [B, C, h, w], including any input
    normalisation it needs (`vgg_features()` for StyleID's CFSD). The states are a sum and a count
    (`dist_reduce_fx="sum"`), so DDP sync and `merge_state` give the mean over all pairs.

    Per-pair values: `pair_values()`, in update order on one process (a "cat" list state: after a DDP
    sync it holds all processes' values, process by process; `merge_state(other)` puts `other`'s first).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, features: nn.Module, row_chunk: int = 1024, dtype: torch.dtype = torch.float64, **kwargs):
        super().__init__(**kwargs)
        self.features = features
        self.row_chunk = row_chunk
        self.compute_dtype = dtype
        self.add_state("total", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("values", [], dist_reduce_fx="cat")

    def update(self, content: Tensor, result: Tensor) -> None:
        _check_unit_images(content, "CFSD content")
        _check_unit_images(result, "CFSD result")
        if content.shape != result.shape:
            raise ValueError(f"CFSD: content {tuple(content.shape)} and result {tuple(result.shape)} differ in shape")
        values = cfsd_from_features(self.features(content), self.features(result), self.row_chunk, self.compute_dtype)
        self.total += values.sum().to(self.total.dtype)
        self.count += values.numel()
        self.values.append(values)

    def compute(self) -> Tensor:
        if int(self.count) == 0:
            raise RuntimeError("CFSD.compute() before any update: no pairs")
        return self.total / self.count

    def pair_values(self) -> Tensor:
        """The CFSD of every pair so far, [N] (see the class docstring for the order)."""
        if isinstance(self.values, Tensor):
            return self.values
        if not self.values:
            return torch.zeros(0, dtype=self.total.dtype, device=self.total.device)
        return dim_zero_cat(self.values)


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

    `.safetensors` files are read with safetensors; anything else with `torch.load(weights_only=True)`,
    so a pickle that would run code is refused instead of executed.
    """
    path = Path(weights) if weights is not None else default_weights_path(default_name)
    if not path.is_file():
        raise MissingFileError("weights file not found", str(path), how_to_get)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
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
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        raise UserError("not a state dict", str(path), "expected a flat mapping of names to tensors")
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


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
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


def _frozen(module: nn.Module) -> nn.Module:
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

    with _seeded(0):
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
    return _frozen(nn.Sequential(ImageNetNormalize(), trunk))


def vgg16_features(weights: WeightsPath = None) -> nn.Module:
    """`vgg_features` on VGG-16 (same layer, relu3_1). Not StyleID's CFSD, which uses VGG-19."""
    return vgg_features(weights, arch="vgg16")


# ---------------------------------------------------------------------------------------------------
# LPIPS (AlexNet), offline
# ---------------------------------------------------------------------------------------------------


class OfflineLPIPS(LearnedPerceptualImagePatchSimilarity):
    """torchmetrics' LPIPS metric around a given LPIPS network (`torchmetrics...lpips._LPIPS`), on images
    in [0, 1] (`normalize=True`), mean over pairs.

    `LearnedPerceptualImagePatchSimilarity.__init__` always builds its own network, whose AlexNet
    torchvision downloads, so it is skipped: `Metric.__init__` plus the attributes its `update` and
    `compute` read (`net`, `reduction`, `normalize`, the list state `all_scores`), as in torchmetrics 1.x;
    the test suite checks that `update`/`compute` still work with them. Per-pair scores: `pair_values()`.
    """

    def __init__(self, net: nn.Module, **kwargs):
        Metric.__init__(self, **kwargs)
        self.net = net
        self.reduction = "mean"
        self.normalize = True
        self.add_state("all_scores", default=[], dist_reduce_fx=None)

    def pair_values(self) -> Tensor:
        """The LPIPS of every pair so far, [N], in update order."""
        if isinstance(self.all_scores, Tensor):
            return self.all_scores.flatten()
        return dim_zero_cat(self.all_scores).flatten() if self.all_scores else torch.zeros(0)


def _bare_lpips_alex() -> nn.Module:
    """torchmetrics' AlexNet LPIPS network, randomly initialised: nothing is read or downloaded."""
    with _seeded(0):
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
    return _frozen(network)


def lpips_metric(weights: WeightsPath = None, linear_weights: WeightsPath = None) -> OfflineLPIPS:
    """torchmetrics' LPIPS (AlexNet, v0.1 linear layers) built offline; see `lpips_network`."""
    return OfflineLPIPS(lpips_network(weights, linear_weights))


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
    with _seeded(0):
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
    return _frozen(InceptionPoolFeatures(trunk, kind))


def fid_metric(feature: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID on a custom feature module taking float images in [0, 1].

    With a custom module torchmetrics passes images through unchanged (`normalize` only picks the dummy
    input when the module has no `num_features`). Real = style images, fake = results.
    """
    return FrechetInceptionDistance(feature=feature, normalize=True)


# ---------------------------------------------------------------------------------------------------
# Random networks for the smoke config
# ---------------------------------------------------------------------------------------------------


class RandomPoolFeatures(nn.Module):
    """A small random conv net with a pooled feature vector, the `InceptionPoolFeatures` interface."""

    def __init__(self, num_features: int = 16):
        super().__init__()
        self.num_features = num_features
        self.layers = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv2d(8, num_features, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )

    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images
        return self.layers(x)


def random_cfsd_network(seed: int = 0) -> nn.Module:
    """A small seeded random [B, 3, H, W] -> [B, 16, H/2, W/2] network (normalisation included), for CFSD."""
    with _seeded(seed):
        network = nn.Sequential(
            ImageNetNormalize(),
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
    return _frozen(network)


def random_lpips_network(seed: int = 0) -> nn.Module:
    """torchmetrics' AlexNet LPIPS network with seeded random weights (linear weights made non-negative,
    as trained LPIPS weights are, so that distances are >= 0)."""
    with _seeded(seed):
        network = torchmetrics_lpips._NoTrainLpips(pretrained=False, net="alex", pnet_rand=True)
        for layer in network.lins:
            conv = layer.model[-1]
            conv.weight.data = torch.rand_like(conv.weight) / conv.weight.shape[1]
    return _frozen(network)


def random_fid_network(seed: int = 0, num_features: int = 16) -> RandomPoolFeatures:
    """A small seeded random FID feature module (`num_features`-d)."""
    with _seeded(seed):
        network = RandomPoolFeatures(num_features)
    return _frozen(network)


@dataclass
class FeatureNetworks:
    """The three networks the metrics need: CFSD features, the LPIPS network, the FID feature module."""

    cfsd: nn.Module
    lpips: nn.Module
    fid: nn.Module


def random_feature_networks(seed: int = 0) -> FeatureNetworks:
    """Seeded random networks with the real ones' interfaces, read from no file (smoke config, tests)."""
    return FeatureNetworks(random_cfsd_network(seed), random_lpips_network(seed + 1), random_fid_network(seed + 2))


# ---------------------------------------------------------------------------------------------------
# Gathering the metrics
# ---------------------------------------------------------------------------------------------------


def artfid(lpips: float, fid: float) -> float:
    """ArtFID = (1 + LPIPS) * (1 + FID) (Wright & Ommer 2022)."""
    return (1.0 + float(lpips)) * (1.0 + float(fid))


@dataclass(frozen=True)
class MetricsConfig:
    """Which networks the quality metrics use. Weights None: torchvision's hub-cache file names.

    `random`: seeded random networks from `seed`, no files (the smoke config; numbers mean nothing).
    """

    fid_kind: str = "art"  # "art" (ArtFID's Inception) or "imagenet" (torchvision's)
    inception_weights: Optional[str] = None
    alexnet_weights: Optional[str] = None
    lpips_linear_weights: Optional[str] = None  # default: the file inside the torchmetrics package
    vgg_weights: Optional[str] = None
    vgg_arch: str = "vgg19"  # StyleID's CFSD; "vgg16" is not comparable with published numbers
    random: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fid_kind not in INCEPTION_FILES:
            why = f"must be one of {sorted(INCEPTION_FILES)}, got {self.fid_kind!r}"
            raise config_error("model.metrics.fid_kind", why)
        if self.vgg_arch not in VGG_FILES:
            why = f"must be one of {sorted(VGG_FILES)}, got {self.vgg_arch!r}"
            raise config_error("model.metrics.vgg_arch", why)


@dataclass
class QualityMetrics:
    """LPIPS (content vs result), FID (style vs result) and CFSD (content vs result), fed together."""

    lpips: OfflineLPIPS
    fid: FrechetInceptionDistance
    cfsd: CFSD

    def to(self, device: Union[str, torch.device]) -> QualityMetrics:
        for metric in (self.lpips, self.fid, self.cfsd):
            metric.to(device)
        return self

    def update(self, content: Tensor, style: Tensor, result: Tensor) -> None:
        """One batch of pairs: result[i] was made from content[i] and style[i] (all [B, 3, H, W] in [0, 1]).

        As in StyleID, the style set of FID has one style image per result (repeated styles count again).
        """
        self.lpips.update(content, result)
        self.fid.update(style, real=True)
        self.fid.update(result, real=False)
        self.cfsd.update(content, result)

    def compute(self) -> dict[str, float]:
        lpips, fid = float(self.lpips.compute()), float(self.fid.compute())
        return {"lpips": lpips, "fid": fid, "artfid": artfid(lpips, fid), "cfsd": float(self.cfsd.compute())}

    def reset(self) -> None:
        for metric in (self.lpips, self.fid, self.cfsd):
            metric.reset()


def feature_networks(config: MetricsConfig) -> FeatureNetworks:
    """The networks `config` names: random ones, or loaded from local files (never downloaded)."""
    if config.random:
        return random_feature_networks(config.seed)
    return FeatureNetworks(
        cfsd=vgg_features(config.vgg_weights, config.vgg_arch),
        lpips=lpips_network(config.alexnet_weights, config.lpips_linear_weights),
        fid=inception_features(config.inception_weights, config.fid_kind),
    )


def build_metrics(config: MetricsConfig) -> QualityMetrics:
    """The torchmetrics objects of the evaluator, on the CPU (move them with `.to(device)`)."""
    networks = feature_networks(config)
    return QualityMetrics(lpips=OfflineLPIPS(networks.lpips), fid=fid_metric(networks.fid), cfsd=CFSD(networks.cfsd))
