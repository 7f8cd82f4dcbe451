"""CFSD (content feature structure distance, StyleID, Chung et al., CVPR 2024) as a torchmetrics `Metric`.

What is computed, exactly. For a content image c and its result r (same size, float RGB in [0, 1]):

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

Because the value grows with the image size, StyleID's numbers need the images at their own size:
`diffstyler test` feeds CFSD the result as it is (`data.py`), unless `data.size` says otherwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffstyler.evaluation.pair_metric import PairMeanMetric, check_image_pair


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


def _scaled_positions(features: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, C, h, w] -> [B, h*w, C]: one row per position, divided by C as StyleID does."""
    channels = features.shape[1]
    return features.to(dtype).flatten(2).transpose(1, 2) / channels


class CFSD(PairMeanMetric):
    """Mean CFSD over all (content, result) pairs, on a given feature network (see the module docstring).

    `features` maps images [B, 3, H, W] in [0, 1] to feature maps [B, C, h, w], including any input
    normalisation it needs (`networks.vgg_features()` for StyleID's CFSD). The mean over pairs, its DDP
    sync and the per-pair values (`pair_values()`) are `PairMeanMetric`'s.
    """

    higher_is_better = False

    def __init__(self, features: nn.Module, row_chunk: int = 1024, dtype: torch.dtype = torch.float64, **kwargs):
        super().__init__(**kwargs)
        self.features = features
        self.row_chunk = row_chunk
        self.compute_dtype = dtype

    def update(self, content: Tensor, result: Tensor) -> None:
        check_image_pair(content, result, ("CFSD content", "CFSD result"))
        self.add_pairs(cfsd_from_features(self.features(content), self.features(result), self.row_chunk, self.compute_dtype))
