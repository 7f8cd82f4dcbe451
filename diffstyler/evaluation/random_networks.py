"""Small seeded random feature networks with the interfaces of the real ones (`networks.py`), read from
no file: for the smoke config (`model.metrics.random: true`) and the tests. Their numbers mean nothing."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics.functional.image import lpips as torchmetrics_lpips

from diffstyler.evaluation.csd import CSDArchitecture, CSDNetwork
from diffstyler.evaluation.networks import FeatureNetworks, ImageNetNormalize, frozen, seeded

# CSD's layout and input (224 x 224, what `data.py` always gives CSD) at a tiny width and depth.
TINY_CSD = CSDArchitecture(input_resolution=224, patch_size=32, width=32, layers=2, heads=2, embedding_dim=16)


def random_feature_networks(seed: int = 0) -> FeatureNetworks:
    """Seeded random networks for CFSD, LPIPS, FID and CSD (each from its own seed, derived from `seed`)."""
    return FeatureNetworks(random_cfsd_network(seed), random_lpips_network(seed + 1), random_fid_network(seed + 2),
                           random_csd_network(seed + 3))


def random_cfsd_network(seed: int = 0) -> nn.Module:
    """A small seeded random [B, 3, H, W] -> [B, 16, H/2, W/2] network (normalisation included), for CFSD."""
    with seeded(seed):
        network = nn.Sequential(
            ImageNetNormalize(),
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        )
    return frozen(network)


def random_lpips_network(seed: int = 0) -> nn.Module:
    """torchmetrics' AlexNet LPIPS network with seeded random weights (linear weights made non-negative,
    as trained LPIPS weights are, so that distances are >= 0)."""
    with seeded(seed):
        network = torchmetrics_lpips._NoTrainLpips(pretrained=False, net="alex", pnet_rand=True)
        for layer in network.lins:
            conv = layer.model[-1]
            conv.weight.data = torch.rand_like(conv.weight) / conv.weight.shape[1]
    return frozen(network)


def random_fid_network(seed: int = 0, num_features: int = 16) -> RandomPoolFeatures:
    """A small seeded random FID feature module (`num_features`-d)."""
    with seeded(seed):
        network = RandomPoolFeatures(num_features)
    return frozen(network)


class RandomPoolFeatures(nn.Module):
    """A small random conv net with a pooled feature vector, the `networks.InceptionPoolFeatures` interface."""

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


def random_csd_network(seed: int = 0, architecture: CSDArchitecture = TINY_CSD) -> CSDNetwork:
    """The CSD network (the authors' architecture, `csd.CSDNetwork`) at tiny sizes with seeded random weights."""
    with seeded(seed):
        network = CSDNetwork(architecture)
    return frozen(network)
