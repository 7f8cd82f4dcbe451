"""Stylization quality metrics: LPIPS, FID, ArtFID, CFSD and CSD on torchmetrics, from local weights only.

What is measured (the protocol of StyleID, Chung et al., CVPR 2024, which follows ArtFID):

* LPIPS (content vs result): torchmetrics' `LearnedPerceptualImagePatchSimilarity` with the AlexNet
  backbone and the LPIPS v0.1 linear layers, on images in [0, 1] (`normalize=True`, i.e. 2x - 1, as
  StyleID's `LPIPS` wrapper of the `lpips` package does); `OfflineLPIPS`.
* FID (style images vs results): torchmetrics' `FrechetInceptionDistance` with a custom `feature`
  module, the 2048-d average-pool output of an Inception-v3 (`networks.inception_features`); `fid_metric`.
* ArtFID = (1 + LPIPS) * (1 + FID) (Wright & Ommer, GCPR 2022; `artfid`).
* CFSD (content feature structure distance, StyleID): `cfsd.py` says exactly what is computed.
* CSD (style similarity, Somepalli et al. 2024: the cosine similarity of the style embeddings of the
  result and its style image, higher is closer): `csd.py` says exactly what is computed.

`build_metrics` gives one run its metrics on a set of feature networks (`networks.py` loads the real
ones from local files, `random_networks.py` makes small random ones); `feature_networks` picks them
from a `MetricsConfig`. Images everywhere are float tensors [B, 3, H, W] in [0, 1]; what size each
metric sees (StyleID's: LPIPS and FID at shorter side 512, CFSD at the result's own size; CSD its
authors' 224 x 224 center crop) is the caller's job (`data.py`). StyleID also reports LPIPS on
greyscale images and ArtFID_infinity; neither is computed here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from torchmetrics.utilities import dim_zero_cat

from diffstyler.errors import config_error
from diffstyler.evaluation.cfsd import CFSD
from diffstyler.evaluation.csd import CSD
from diffstyler.evaluation.networks import (
    INCEPTION_FILES,
    VGG_FILES,
    FeatureNetworks,
    csd_network,
    inception_features,
    lpips_network,
    vgg_features,
)
from diffstyler.evaluation.random_networks import random_feature_networks


@dataclass(frozen=True)
class MetricsConfig:
    """Which networks the quality metrics use, from local files only (read weights-only; nothing is
    downloaded). Weights None: the file torchvision itself would use in the torch hub cache
    (`~/.cache/torch/hub/checkpoints/`).

    Args:
        fid_kind: "art" (ArtFID's art Inception, `art_inception.pth`) or "imagenet" (torchvision's
            Inception-v3) for FID.
        inception_weights: the Inception's weight file for FID.
        alexnet_weights: AlexNet's weight file for LPIPS (`alexnet-owt-7be5be79.pth`).
        lpips_linear_weights: LPIPS v0.1's linear layers (None: `alex.pth` inside the torchmetrics
            package).
        vgg_weights: VGG's weight file for CFSD (`vgg19-dcbb9e9d.pth`).
        vgg_arch: "vgg19" (StyleID's CFSD) or "vgg16" (not comparable with published numbers).
        csd_weights: the CSD checkpoint, the authors' `pytorch_model.bin` (None:
            `weights/CSD-ViT-L/pytorch_model.bin`, relative to where the command runs).
        random: seeded random networks from `seed`, no files (the smoke config; numbers mean nothing).
        seed: the seed of the random networks.
    """

    fid_kind: str = "art"
    inception_weights: Optional[str] = None
    alexnet_weights: Optional[str] = None
    lpips_linear_weights: Optional[str] = None
    vgg_weights: Optional[str] = None
    vgg_arch: str = "vgg19"
    csd_weights: Optional[str] = None
    random: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.fid_kind not in INCEPTION_FILES:
            why = f"must be one of {sorted(INCEPTION_FILES)}, got {self.fid_kind!r}"
            raise config_error("model.metrics.fid_kind", why)
        if self.vgg_arch not in VGG_FILES:
            why = f"must be one of {sorted(VGG_FILES)}, got {self.vgg_arch!r}"
            raise config_error("model.metrics.vgg_arch", why)


def feature_networks(config: MetricsConfig) -> FeatureNetworks:
    """The networks `config` names: random ones, or loaded from local files (never downloaded)."""
    if config.random:
        return random_feature_networks(config.seed)
    return FeatureNetworks(
        cfsd=vgg_features(config.vgg_weights, config.vgg_arch),
        lpips=lpips_network(config.alexnet_weights, config.lpips_linear_weights),
        fid=inception_features(config.inception_weights, config.fid_kind),
        csd=csd_network(config.csd_weights),
    )


def build_metrics(networks: FeatureNetworks) -> QualityMetrics:
    """One run's metrics on `networks` (shared, not copied: several runs can use the same networks).
    On the device of the networks; move them with `.to(device)`."""
    return QualityMetrics(lpips=OfflineLPIPS(networks.lpips), fid=fid_metric(networks.fid), cfsd=CFSD(networks.cfsd),
                          csd=CSD(networks.csd))


class QualityMetrics(nn.Module):
    """LPIPS (content vs result), FID (style vs result), CFSD (content vs result) and CSD (style vs
    result) of one run, fed together.

    A module, so that a LightningModule holding it moves it to its device and torchmetrics syncs its
    states over DDP processes.
    """

    def __init__(self, lpips: OfflineLPIPS, fid: FrechetInceptionDistance, cfsd: CFSD, csd: CSD):
        super().__init__()
        self.lpips = lpips
        self.fid = fid
        self.cfsd = cfsd
        self.csd = csd

    def update(self, content: Tensor, style: Tensor, result: Tensor, *, cfsd_content: Tensor,
               cfsd_result: Tensor, csd_style: Tensor, csd_result: Tensor) -> dict[str, Tensor]:
        """One batch of triples: result[i] was made from content[i] and style[i].

        LPIPS compares `content` with `result`, FID `style` with `result`, CFSD `cfsd_content` with
        `cfsd_result` and CSD `csd_style` with `csd_result` (the same triples as each of those needs
        them); all [B, 3, H, W] in [0, 1], one size per tensor. As in StyleID, the style set of FID has
        one style image per result (repeated styles count again). Returns this batch's per-pair LPIPS,
        CFSD and CSD, [B] each.
        """
        self.lpips.update(content, result)
        self.fid.update(style, real=True)
        self.fid.update(result, real=False)
        self.cfsd.update(cfsd_content, cfsd_result)
        self.csd.update(csd_style, csd_result)
        # the metrics' list states end with this batch's values
        return {"lpips": self.lpips.all_scores[-1].flatten(), "cfsd": self.cfsd.values[-1].flatten(),
                "csd": self.csd.values[-1].flatten()}

    def compute(self) -> dict[str, float]:
        lpips, fid = float(self.lpips.compute()), float(self.fid.compute())
        return {"lpips": lpips, "fid": fid, "artfid": artfid(lpips, fid), "cfsd": float(self.cfsd.compute()),
                "csd": float(self.csd.compute())}

    def reset(self) -> None:
        for metric in (self.lpips, self.fid, self.cfsd, self.csd):
            metric.reset()


def artfid(lpips: float, fid: float) -> float:
    """ArtFID = (1 + LPIPS) * (1 + FID) (Wright & Ommer 2022)."""
    return (1.0 + float(lpips)) * (1.0 + float(fid))


class OfflineLPIPS(LearnedPerceptualImagePatchSimilarity):
    """torchmetrics' LPIPS metric around a given LPIPS network (`torchmetrics...lpips._LPIPS`, e.g.
    `networks.lpips_network()`), on images in [0, 1] (`normalize=True`), mean over pairs.

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


def fid_metric(feature: nn.Module) -> FrechetInceptionDistance:
    """torchmetrics' FID on a custom feature module taking float images in [0, 1].

    With a custom module torchmetrics passes images through unchanged (`normalize` only picks the dummy
    input when the module has no `num_features`). Real = style images, fake = results.
    """
    return FrechetInceptionDistance(feature=feature, normalize=True)
