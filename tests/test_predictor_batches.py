"""Several jobs per UNet call (`data.batch_size`, `model.max_unet_rows`), bounded adapters and failures
inside a batch: a job's result must not depend on the jobs it shares a call with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler.data.jobs import Job, StyleEntry, StylizeDataModule, chunked
from diffstyler.predictor import StylizePredictor
from tests.helpers import write_random_lora
from tests.helpers import CONTENT, MASK, make_predictor as _predictor, stylize_one

# float32 matrix products give slightly different sums for different batch sizes (the CPU kernels
# block them differently): a few 1e-5 on the tiny model's latents, whose values reach about 12.
# So the bound is 1e-5 of the largest latent value; a row read from another job is off by whole units.
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Three contents of two sizes (64x48, 48x64) and two LoRAs."""
    folder = tmp_path_factory.mktemp("batch_inputs")
    Image.open(CONTENT).save(folder / "a.png")
    Image.open(CONTENT).transpose(Image.Transpose.ROTATE_90).save(folder / "b_tall.png")
    Image.open(CONTENT).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(folder / "c.png")
    loras = [write_random_lora(folder / name, seed) for name, seed in (("ink", 1), ("oil", 2))]
    return folder, loras


def product_jobs(inputs) -> list[Job]:
    folder, loras = inputs
    styles = [StyleEntry(lora=str(path)) for path in loras]
    return StylizeDataModule(content=[str(folder / n) for n in ("a.png", "b_tall.png", "c.png")], styles=styles,
                             pairing="product", resolution=64, seed=3).jobs()


class FinalLatents:
    """Step callback: each job's latents after the last step."""

    def __init__(self):
        self.latents: dict[str, list[torch.Tensor]] = {}

    def __call__(self, state) -> None:
        self.latents[state.job] = [latent.clone() for latent in state.latents]


def unet_batch_sizes(predictor: StylizePredictor) -> list[int]:
    sizes: list[int] = []
    predictor.pipeline.denoiser.register_forward_pre_hook(lambda module, args: sizes.append(args[0].shape[0]))
    return sizes


def run(predictor: StylizePredictor, chunks: list[list[Job]]) -> FinalLatents:
    final = FinalLatents()
    predictor.step_callback = final
    for chunk in chunks:
        predictor.writer.write(predictor.stylize_jobs(chunk))
    return final


def assert_same_results(one: FinalLatents, other: FinalLatents, folders: tuple[Path, Path]) -> None:
    assert sorted(one.latents) == sorted(other.latents) and len(one.latents) == 6
    for job_id, latents in one.latents.items():
        for mine, theirs in zip(latents, other.latents[job_id]):
            assert (mine - theirs).abs().max().item() < RELATIVE_TOLERANCE * theirs.abs().max().item(), job_id
    for path in sorted(folders[0].rglob("*.png")):
        other_file = folders[1] / path.relative_to(folders[0])
        difference = np.abs(np.asarray(Image.open(path), int) - np.asarray(Image.open(other_file), int))
        assert difference.max() <= 1, path.name


@pytest.mark.slow
def test_jobs_batched_four_at_a_time_equal_jobs_run_one_by_one(inputs, tmp_path):
    """Mixed styles and content sizes in one chunk. Catches style rows injected from another job's
    reference row (the row offset of each job), fused with another job's trajectory, or guided
    with another job's rows; and checks that the jobs really shared UNet calls."""
    jobs = product_jobs(inputs)
    alone = _predictor(tmp_path / "alone")
    one_by_one = run(alone, [[job] for job in jobs])

    batched = _predictor(tmp_path / "batched")
    sizes = unet_batch_sizes(batched)
    together = run(batched, chunked(jobs, 6))
    # a_ink, a_oil, c_ink, c_oil (64x48; a and c inverted in one call) and b_ink, b_oil (48x64):
    # one call holds the reference rows of a and c (each shared by its two jobs) and 4 x (uncond, cond)
    assert max(sizes) == 2 + 4 * 2
    assert_same_results(one_by_one, together, (tmp_path / "alone" / "out", tmp_path / "batched" / "out"))


@pytest.mark.slow
def test_masked_jobs_batched_are_fused_with_their_own_contents(inputs, tmp_path):
    """Catches eq. 6 taking the content outside the mask from another job of the call."""
    from diffstyler.masks import MaskSpec

    folder, loras = inputs
    styles = [StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(MASK)))]
    jobs = StylizeDataModule(content=[str(folder / "a.png"), str(folder / "c.png")], styles=styles, resolution=64).jobs()
    alone = run(_predictor(tmp_path / "alone"), [[job] for job in jobs])
    together = run(_predictor(tmp_path / "batched"), [jobs])
    for job_id, latents in alone.latents.items():
        assert (latents[0] - together.latents[job_id][0]).abs().max() < RELATIVE_TOLERANCE * latents[0].abs().max()


@pytest.mark.slow
def test_reference_rows_per_style_batched_equal_one_by_one(inputs, tmp_path):
    """`reference_model: style`: each job has one reference row per style; catches their offsets."""
    from diffstyler.injection import InjectionConfig

    jobs = product_jobs(inputs)
    injection = InjectionConfig(feature_steps=4, attention_steps=3, reference_model="style")
    alone = _predictor(tmp_path / "alone")
    alone.injection = injection
    batched = _predictor(tmp_path / "batched")
    batched.injection = injection
    assert_same_results(run(alone, [[job] for job in jobs]), run(batched, chunked(jobs, 6)),
                        (tmp_path / "alone" / "out", tmp_path / "batched" / "out"))


@pytest.mark.slow
def test_a_cap_on_rows_per_call_splits_the_group_and_changes_nothing(inputs, tmp_path):
    jobs = product_jobs(inputs)
    uncapped = run(_predictor(tmp_path / "uncapped"), chunked(jobs, 6))
    capped_predictor = _predictor(tmp_path / "capped")
    capped_predictor.max_unet_rows = 5  # one job's rows (3) fit, two jobs' (6, or 5 with a shared reference) do not
    sizes = unet_batch_sizes(capped_predictor)
    capped = run(capped_predictor, chunked(jobs, 6))
    assert max(sizes) == 3
    assert_same_results(uncapped, capped, (tmp_path / "uncapped" / "out", tmp_path / "capped" / "out"))


@pytest.mark.slow
def test_at_most_max_loaded_adapters_stay_loaded_but_never_one_the_chunk_still_needs(inputs, tmp_path):
    """With room for one adapter: a chunk needing two loads the second beside the first (catches
    deleting an adapter a job of the chunk still needs); the next new style evicts the least
    recently used ones (catches no eviction); results equal those with every adapter kept."""
    folder, loras = inputs
    wax = write_random_lora(tmp_path / "wax", seed=4)
    jobs = product_jobs(inputs)
    by_id = {job.id: job for job in jobs}
    wax_job = StylizeDataModule(content=[str(folder / "b_tall.png")], styles=[StyleEntry(lora=str(wax))],
                                pairing="product", resolution=64, seed=3).jobs()[0]
    chunks = [[by_id["a_ink"], by_id["a_oil"]], [wax_job], [by_id["c_ink"]]]

    unbounded = _predictor(tmp_path / "unbounded")
    bounded = _predictor(tmp_path / "bounded")
    bounded.pipeline.adapters.max_loaded = 1
    final = {"unbounded": FinalLatents(), "bounded": FinalLatents()}
    loaded = []
    for name, predictor in (("unbounded", unbounded), ("bounded", bounded)):
        predictor.step_callback = final[name]
        for chunk in chunks:
            assert all(r.status == "done" for r in predictor.writer.write(predictor.stylize_jobs(chunk)))
            if predictor is bounded:
                loaded.append(sorted(predictor.pipeline.denoiser.peft_config))
    assert loaded == [["style0", "style1"], ["style2"], ["style3"]]  # ink is loaded again as style3
    assert len(unbounded.pipeline.denoiser.peft_config) == 3
    for job_id, latents in final["unbounded"].latents.items():
        assert torch.equal(latents[0], final["bounded"].latents[job_id][0]), job_id


@pytest.mark.slow
def test_a_failing_job_in_a_batch_fails_alone_and_the_others_are_done(inputs, tmp_path):
    """Non-finite latents of one job (a NaN LoRA) fail the shared call; each job is then run alone,
    so only that job is recorded as failed, and the good job equals its run by itself."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder, loras = inputs
    broken = write_random_lora(tmp_path / "broken", seed=3)
    with safe_open(str(broken), framework="pt") as file:
        metadata = file.metadata()
    weights = {k: torch.full_like(v, float("nan")) if "lora_B" in k or "lora.up" in k else v for k, v in load_file(str(broken)).items()}
    save_file(weights, str(broken), metadata=metadata)
    styles = [StyleEntry(lora=str(loras[0])), StyleEntry(lora=str(broken))]
    jobs = StylizeDataModule(content=[str(folder / "a.png")], styles=styles, pairing="product", resolution=64).jobs()

    predictor = _predictor(tmp_path / "batched")
    predictor.writer.on_error = "continue"
    records = predictor.writer.write(predictor.stylize_jobs(jobs))
    assert [(r.id, r.status) for r in records] == [("a_ink", "done"), ("a_broken", "failed")]
    assert "non-finite" in records[1].error and "'broken'" in records[1].error
    assert predictor.writer.counts == {"done": 1, "skipped": 0, "failed": 1}
    assert not (tmp_path / "batched" / "out" / "a_broken.png").exists()

    alone = _predictor(tmp_path / "alone")
    stylize_one(alone, jobs[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "alone" / "out" / "a_ink.png")),
                          np.asarray(Image.open(tmp_path / "batched" / "out" / "a_ink.png")))
