"""CSD (Contrastive Style Descriptors, Somepalli et al. 2024, "Measuring Style Similarity in Diffusion
Models") as a network and a torchmetrics `Metric`: how close a result's style is to its style image's.

What is computed, exactly. For a style image s and a result r:

1. each image as the authors' evaluation transform `transforms_branch0` (github.com/learn2phoenix/CSD,
   `CSD/loss_utils.py`) reads it: the shorter side resized to 224 (bicubic, on the PIL image, the
   longer side scaled and truncated), a 224 x 224 center crop, [0, 1], then CLIP's normalisation
   (mean 0.48145466/0.4578275/0.40821073, std 0.26862954/0.26130258/0.27577711). `csd_input` does the
   PIL part (used by `data.py`), the network the normalisation;
2. f = the CLIP ViT-L/14 image encoder without its projection (`proj = None` in the authors'
   `CSD_CLIP`): `ln_post` of the class token, 1024-d;
3. the style embedding e = normalize(f @ last_layer_style), last_layer_style a [1024, 768] matrix
   applied by matrix product (a copy of CLIP's `proj` at the start of the authors' training),
   L2-normalised (`F.normalize(dim=1)`), as the authors' `CSD_CLIP.forward` returns `style_output`.
   `last_layer_content` is the content head of the same shape, trained adversarially to carry
   content; CSD of a stylization never uses it;
4. CSD(s, r) = e(s) . e(r), the cosine similarity of the two unit embeddings (the authors' retrieval
   ranks by the same product, `q_features @ db_features.T`); the reported CSD is its mean over all
   (style image, result) pairs, in [-1, 1], higher is closer in style.

The architecture is OpenAI's CLIP `VisionTransformer` (`clip/model.py`: conv1 without bias, class
embedding, positional embedding, `ln_pre`, pre-norm residual blocks of `nn.MultiheadAttention` and a
QuickGELU MLP `c_fc`/`c_proj`, `ln_post`), written here with the same parameter names, so the
authors' checkpoint loads without any key mapping (`networks.csd_network`). transformers'
`CLIPVisionModel` implements the same network, but its parameter names differ between versions (4.x
`vision_model.*`, 5.x flat) and its attention is split into q/k/v; the tests check this module
against it instead (same output with the weights mapped).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn
from torchvision.transforms.functional import InterpolationMode, center_crop, resize

from diffstyler.evaluation.pair_metric import PairMeanMetric, check_image_pair
from diffstyler.outputs import pil_to_unit

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CSD_INPUT_SIZE = 224


@dataclass(frozen=True)
class CSDArchitecture:
    """The sizes of a CSD network: a CLIP ViT image encoder (`width`, `layers`, `heads`, `patch_size`
    at `input_resolution`) and two heads of `embedding_dim`. Default: the authors' CSD (ViT-L/14)."""

    input_resolution: int = CSD_INPUT_SIZE
    patch_size: int = 14
    width: int = 1024
    layers: int = 24
    heads: int = 16
    embedding_dim: int = 768


VIT_L_14 = CSDArchitecture()


def csd_input(image: Image.Image, size: int = CSD_INPUT_SIZE) -> Tensor:
    """The image as the authors' `transforms_branch0` reads it, before the normalisation: shorter side to
    `size` (bicubic, on the PIL image), center crop `size` x `size`; [3, size, size] in [0, 1]."""
    return pil_to_unit(center_crop(resize(image, [size], interpolation=InterpolationMode.BICUBIC), [size]))


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x): the activation OpenAI's CLIP was trained with (not nn.GELU)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block with OpenAI CLIP's parameter names (`ln_1`, `attn`, `ln_2`, `mlp.c_fc`,
    `mlp.c_proj`); tokens batch-first [B, N, width]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, 4 * width)), ("gelu", QuickGELU()), ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x: Tensor) -> Tensor:
        normed = self.ln_1(x)
        x = x + self.attn(normed, normed, normed, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """The blocks, under the name OpenAI's checkpoints use (`transformer.resblocks.<i>`)."""

    def __init__(self, width: int, layers: int, heads: int):
        super().__init__()
        self.resblocks = nn.Sequential(*(ResidualAttentionBlock(width, heads) for _ in range(layers)))

    def forward(self, x: Tensor) -> Tensor:
        return self.resblocks(x)


class ClipVisionTransformer(nn.Module):
    """OpenAI CLIP's `VisionTransformer` without `proj` (as in the authors' `CSD_CLIP`): normalised
    images [B, 3, R, R] -> `ln_post` of the class token, [B, width]."""

    def __init__(self, architecture: CSDArchitecture):
        super().__init__()
        width, patch = architecture.width, architecture.patch_size
        grid = architecture.input_resolution // patch
        self.input_resolution = architecture.input_resolution
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(width**-0.5 * torch.randn(width))
        self.positional_embedding = nn.Parameter(width**-0.5 * torch.randn(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, architecture.layers, architecture.heads)
        self.ln_post = nn.LayerNorm(width)

    def forward(self, x: Tensor) -> Tensor:
        patches = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width], row-major as CLIP's reshape
        class_token = self.class_embedding.to(patches.dtype).expand(patches.shape[0], 1, -1)
        tokens = torch.cat([class_token, patches], dim=1) + self.positional_embedding.to(patches.dtype)
        tokens = self.transformer(self.ln_pre(tokens))
        return self.ln_post(tokens[:, 0, :])


class CSDNetwork(nn.Module):
    """The authors' `CSD_CLIP` (content head "default"): `backbone`, `last_layer_style` and
    `last_layer_content` ([width, embedding_dim] matrices), the state-dict names of their checkpoint
    without the `module.` prefix of DistributedDataParallel. Takes images [B, 3, R, R] in [0, 1] (R =
    `input_resolution`, 224; `csd_input` makes them) and applies CLIP's normalisation itself.
    Randomly initialised: `networks.csd_network` loads the authors' weights, `random_networks.random_csd_network`
    makes a small seeded one."""

    def __init__(self, architecture: CSDArchitecture = VIT_L_14):
        super().__init__()
        self.architecture = architecture
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.backbone = ClipVisionTransformer(architecture)
        scale = architecture.width**-0.5  # CLIP's initialisation of `proj`, of which both heads start as copies
        self.last_layer_style = nn.Parameter(scale * torch.randn(architecture.width, architecture.embedding_dim))
        self.last_layer_content = nn.Parameter(scale * torch.randn(architecture.width, architecture.embedding_dim))

    def features(self, images: Tensor) -> Tensor:
        """The backbone's feature [B, width] of images in [0, 1] at the network's resolution."""
        size = self.architecture.input_resolution
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise ValueError(f"CSD: expected images [B, 3, {size}, {size}] (csd_input), got {tuple(images.shape)}")
        return self.backbone((images - self.mean) / self.std)

    def style_embedding(self, images: Tensor) -> Tensor:
        """The unit style embedding [B, embedding_dim] (the authors' `style_output`)."""
        return F.normalize(self.features(images) @ self.last_layer_style, dim=1, p=2)

    def content_embedding(self, images: Tensor) -> Tensor:
        """The unit content embedding [B, embedding_dim] (the authors' `content_output`; not used by CSD)."""
        return F.normalize(self.features(images) @ self.last_layer_content, dim=1, p=2)

    def forward(self, images: Tensor) -> Tensor:
        return self.style_embedding(images)


class CSD(PairMeanMetric):
    """Mean CSD style similarity over (style image, result) pairs on a `CSDNetwork` (see the module
    docstring). The mean over pairs, its DDP sync and the per-pair values (`pair_values()`) are
    `PairMeanMetric`'s."""

    higher_is_better = True

    def __init__(self, network: CSDNetwork, **kwargs):
        super().__init__(**kwargs)
        self.network = network

    def update(self, style: Tensor, result: Tensor) -> None:
        """style[i] is the style image of result[i]: [B, 3, R, R] in [0, 1] each (`csd_input`)."""
        check_image_pair(style, result, ("CSD style", "CSD result"))
        self.add_pairs((self.network.style_embedding(style) * self.network.style_embedding(result)).sum(dim=1))
