"""What size each metric's network sees in `diffstyler test` (diffstyler.evaluation.data): StyleID's
preprocessing by default, the stretch to data.size x data.size when it is given, CSD's 224 x 224 crop
always; and that CSD compares each result with its own style image.

The triples go through Lightning's test loop with the evaluator, on random feature networks whose
forward pre-hooks record the shapes they are fed.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Resize, ToTensor

from diffstyler.evaluation import evaluator as evaluator_module
from diffstyler.evaluation.data import EvaluationDataModule, TripleDataset
from diffstyler.evaluation.evaluator import QualityEvaluator
from diffstyler.evaluation.metrics import MetricsConfig, OfflineLPIPS
from diffstyler.evaluation.random_networks import random_feature_networks

# (width, height) as PIL gives them; the tensors the networks see are [B, 3, height, width]
CONTENT, STYLE, RESULT = (96, 64), (64, 80), (96, 64)


def write_image(path: Path, size: tuple[int, int], seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


def write_pairs(folder: Path, triples: list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]) -> str:
    """A CSV content,style,result of random images of the given (width, height) sizes."""
    rows = ["content,style,result"]
    for number, sizes in enumerate(triples):
        paths = [write_image(folder / f"{role}{number}.png", size, seed=10 * number + k)
                 for k, (role, size) in enumerate(zip(("content", "style", "result"), sizes))]
        rows.append(",".join(paths))
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n")
    return str(folder / "pairs.csv")


def score(pairs: str, output: Path, monkeypatch, size=None) -> dict[str, list[tuple[int, ...]]]:
    """Run the evaluator on the CSV; the spatial sizes (height, width) each network was fed, in order
    (CFSD: content then result; LPIPS: content and result, one call; FID: style then result; CSD's
    backbone: style then result)."""
    seen: dict[str, list[tuple[int, ...]]] = defaultdict(list)

    def recording_networks(config):
        networks = random_feature_networks(config.seed)
        modules = {"cfsd": networks.cfsd, "lpips": networks.lpips, "fid": networks.fid, "csd": networks.csd.backbone}
        for name, module in modules.items():
            def record(module, inputs, name=name):
                seen[name].extend(tuple(image.shape[-2:]) for image in inputs if isinstance(image, torch.Tensor))
            module.register_forward_pre_hook(record)
        return networks

    monkeypatch.setattr(evaluator_module, "feature_networks", recording_networks)
    data = EvaluationDataModule(pairs=pairs, size=size)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False)
    trainer.test(QualityEvaluator(MetricsConfig(random=True), output=str(output)), datamodule=data, verbose=False)
    return seen


@pytest.mark.slow
def test_each_metric_sees_styleids_sizes_on_non_square_images(tmp_path, monkeypatch):
    """LPIPS and FID get the shorter side at 512 with the aspect kept, CFSD the result at its own size,
    CSD its 224 x 224 crop. Catches: a stretch to a square, CFSD fed the resized images, the aspect lost
    (or width and height swapped), the style left at its own size for FID."""
    seen = score(write_pairs(tmp_path, [(CONTENT, STYLE, RESULT)] * 2), tmp_path / "out", monkeypatch)  # FID needs 2

    assert seen["lpips"] == [(512, 768), (512, 768)]  # content 96x64 and result 96x64: 64 -> 512, 96 -> 768
    assert seen["fid"] == [(640, 512), (512, 768)]  # style 64x80: 64 -> 512, 80 -> 640; then the result
    assert seen["cfsd"] == [(64, 96), (64, 96)]  # content and result as they are
    assert seen["csd"] == [(224, 224), (224, 224)]


@pytest.mark.slow
def test_a_content_of_another_size_is_resized_to_the_results_size(tmp_path, monkeypatch):
    """DiffStyler's results have sides rounded to multiples of 8, so the content's size and aspect
    differ a little (100x67 for a 96x64 result). Catches: the content resized on its own (LPIPS would
    compare 764-px and 768-px wide images), CFSD fed the content at its own size."""
    seen = score(write_pairs(tmp_path, [((100, 67), STYLE, RESULT)] * 2), tmp_path / "out", monkeypatch)

    assert seen["lpips"] == [(512, 768), (512, 768)]
    assert seen["cfsd"] == [(64, 96), (64, 96)]


def test_lpips_and_fid_inputs_are_styleids_transform_pixel_for_pixel(tmp_path):
    """StyleID reads LPIPS and FID images with `Compose([Resize(512), ToTensor()])` (torchvision's
    default interpolation, bilinear) and CFSD images with `ToTensor()`. Catches: bicubic or another
    resampling, another rounding of the longer side, the content of CFSD resampled when it already has
    the result's size."""
    pairs = write_pairs(tmp_path, [(CONTENT, STYLE, RESULT)])
    data = EvaluationDataModule(pairs=pairs)
    item = TripleDataset(data.triples, data.runs, size=None)[0]
    triple = data.triples[0]
    styleid = Compose([Resize(512), ToTensor()])

    def read(path: str) -> Image.Image:
        return Image.open(path).convert("RGB")

    torch.testing.assert_close(item["content"], styleid(read(triple.content)), rtol=0, atol=0)
    torch.testing.assert_close(item["style"], styleid(read(triple.style)), rtol=0, atol=0)
    torch.testing.assert_close(item["result"], styleid(read(triple.result)), rtol=0, atol=0)
    torch.testing.assert_close(item["cfsd_content"], ToTensor()(read(triple.content)), rtol=0, atol=0)
    torch.testing.assert_close(item["cfsd_result"], ToTensor()(read(triple.result)), rtol=0, atol=0)
    # CSD's authors' `transforms_branch0` (its Normalize is in the network): the style image and the result.
    authors = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor()])
    torch.testing.assert_close(item["csd_style"], authors(read(triple.style)), rtol=0, atol=0)
    torch.testing.assert_close(item["csd_result"], authors(read(triple.result)), rtol=0, atol=0)


@pytest.mark.slow
def test_triples_of_different_sizes_in_one_batch_keep_their_own_scores(tmp_path, monkeypatch):
    """Three triples of different sizes in one batch of 8: each is scored at its own size and its
    per-image LPIPS is its own. Catches: images of different sizes forced into one tensor, the
    per-image values of one size group written against the triples of another."""
    triples = [(CONTENT, STYLE, RESULT), ((64, 64), STYLE, (64, 64)), (CONTENT, (80, 64), RESULT)]
    pairs = write_pairs(tmp_path, triples)
    seen = score(pairs, tmp_path / "out", monkeypatch)
    assert sorted(set(seen["lpips"])) == [(512, 512), (512, 768)]

    data = EvaluationDataModule(pairs=pairs)
    dataset = TripleDataset(data.triples, data.runs, size=None)
    lpips = OfflineLPIPS(random_feature_networks(MetricsConfig(random=True).seed).lpips)
    with open(tmp_path / "out" / "metrics_per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["result"] for row in rows] == [triple.result for triple in data.triples]
    for row, index in zip(rows, range(len(dataset))):
        item = dataset[index]
        lpips.update(item["content"][None], item["result"][None])
        assert float(row["lpips"]) == pytest.approx(float(lpips.pair_values()[-1]), rel=1e-5)
    assert len({row["lpips"] for row in rows}) == len(rows)  # distinct triples, distinct scores


@pytest.mark.slow
def test_an_explicit_size_stretches_every_image_to_a_square(tmp_path, monkeypatch):
    """`data.size: 32`, the documented deviation: LPIPS, FID and CFSD see 32x32; CSD, whose network takes
    224 x 224 only, its own crop. Catches: data.size ignored, or applied to LPIPS and FID only."""
    seen = score(write_pairs(tmp_path, [(CONTENT, STYLE, RESULT)] * 2), tmp_path / "out", monkeypatch, size=32)

    assert seen["lpips"] == [(32, 32), (32, 32)]
    assert seen["fid"] == [(32, 32), (32, 32)]
    assert seen["cfsd"] == [(32, 32), (32, 32)]
    assert seen["csd"] == [(224, 224), (224, 224)]


@pytest.mark.slow
def test_each_results_csd_is_with_its_own_style_image(tmp_path, monkeypatch):
    """Three triples, each with its own style image, through Lightning's test loop: each per-image CSD
    equals the cosine of the style embeddings of that triple's style image and result, computed here
    from the image files with the same network. Catches: CSD fed the content instead of the style
    image, the style images of other triples, the content head, the per-image values written against
    other triples, the mean over something else than the results."""
    pairs = write_pairs(tmp_path, [(CONTENT, STYLE, RESULT), ((64, 64), (80, 64), (64, 64)), (CONTENT, (64, 64), RESULT)])
    score(pairs, tmp_path / "out", monkeypatch)
    network = random_feature_networks(MetricsConfig(random=True).seed).csd
    data = EvaluationDataModule(pairs=pairs)
    authors = Compose([Resize(224, interpolation=InterpolationMode.BICUBIC), CenterCrop(224), ToTensor()])

    def embedding(path: str) -> torch.Tensor:
        with torch.no_grad():
            return network.style_embedding(authors(Image.open(path).convert("RGB"))[None])[0]

    expected = [float(embedding(triple.style) @ embedding(triple.result)) for triple in data.triples]
    with open(tmp_path / "out" / "metrics_per_image.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [float(row["csd"]) for row in rows] == pytest.approx(expected, abs=1e-6)
    swapped = [float(embedding(triple.content) @ embedding(triple.result)) for triple in data.triples]
    assert min(abs(a - b) for a, b in zip(expected, swapped)) > 1e-4  # the content would show
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["csd"] == pytest.approx(sum(expected) / 3, abs=1e-6)
    # data.size stretches the images of the other metrics only: CSD stays the authors' (documented).
    score(pairs, tmp_path / "stretched", monkeypatch, size=32)
    with open(tmp_path / "stretched" / "metrics_per_image.csv", newline="") as handle:
        assert [float(row["csd"]) for row in csv.DictReader(handle)] == pytest.approx(expected, abs=1e-6)
