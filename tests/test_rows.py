"""The row layout of one UNet call (`rows.RowLayout`): which rows, in which order, which reference
each style row receives, how outputs are sliced back, and how many rows a job counts for the cap.
Rows are told apart by their latents' values (row k holds the number k), so a row in the wrong place
shows as a wrong number."""

from __future__ import annotations

import pytest
import torch

from diffstyler.backbones.mmdit import transformer_layer_map
from diffstyler.conditioning import Conditioning
from diffstyler.injection import InjectionConfig
from diffstyler.lora import BASE_ROW
from diffstyler.methods import DiffStylerMethod
from diffstyler.rows import JobRows, RowLayout, rows_per_job
from diffstyler.sampling import classifier_free_guidance
from diffstyler.stylize import StyleRows


def conditioning(value: float) -> Conditioning:
    return Conditioning(torch.full((1, 3, 2), value))


BLOCKS = transformer_layer_map(["block"] * 6)  # any layer map: rows do not depend on it
METHODS = {model: DiffStylerMethod(InjectionConfig(reference_model=model, feature_steps=3, attention_steps=3).resolved(BLOCKS))
           for model in ("base", "style")}
CLOSED = DiffStylerMethod(InjectionConfig(feature_steps=0, attention_steps=0).resolved(BLOCKS))  # no window open


def job(trajectory: torch.Tensor, adapters: tuple[str, ...], first_latent: float, reference_model: str = "base",
        method=None) -> JobRows:
    """A job whose style k has latent `first_latent + k` and cond / uncond conditionings 10k+1 / 10k+2,
    every style by DiffStyler with `reference_model` (windows open for steps 0-2)."""
    styles = tuple(StyleRows(adapter, conditioning(10 * k + 1), conditioning(10 * k + 2)) for k, adapter in enumerate(adapters))
    return JobRows(trajectory, conditioning(0.0), styles, (method or METHODS[reference_model],) * len(adapters),
                   tuple(torch.full((1, 1, 2, 2), first_latent + k) for k in range(len(adapters))))


def trajectory(value: float) -> torch.Tensor:
    return torch.full((4, 1, 2, 2), value)


def values(rows) -> list[float]:
    return [float(row.latent[0, 0, 0, 0]) for row in rows]


@pytest.mark.parametrize("reference_model", ["base", "style"])
@pytest.mark.parametrize("with_uncond", [True, False])
def test_the_row_count_the_cap_uses_is_the_rows_a_job_brings(reference_model, with_uncond):
    """Caught: `rows_per_job` (the predictor's `max_unet_rows` cap) off by one from the real layout."""
    for styles in (1, 2, 3):
        one = job(trajectory(-1), tuple(f"s{k}" for k in range(styles)), 0, reference_model)
        layout = RowLayout.for_step([one], 1, with_uncond)
        assert len(layout.references) + len(layout.styles) == rows_per_job(one, with_uncond)
        assert len(layout.references) == (1 if reference_model == "base" else styles)


def test_base_reference_one_row_per_content_feeding_every_style_row_of_its_jobs():
    """Two jobs of one content (product pairing) and one of another. Caught: one reference row per
    job instead of per content, or a style row injected from another content's reference."""
    shared, other = trajectory(-1), trajectory(-2)
    layout = RowLayout.for_step([job(shared, ("a",), 0), job(shared, ("b",), 1), job(other, ("a",), 2)], 2, True)
    assert values(layout.references) == [-1, -2] and [r.adapter for r in layout.references] == [BASE_ROW, BASE_ROW]
    assert layout.sources == (0, 0, 0, 0, 1, 1)  # uncond and cond rows of each job
    assert layout.job_references == ((0,), (0,), (1,))
    assert values(layout.styles) == [0, 0, 1, 1, 2, 2]
    assert [r.adapter for r in layout.styles] == ["a", "a", "b", "b", "a", "a"]
    assert [float(r.conditioning.hidden[0, 0, 0]) for r in layout.styles] == [2, 1, 2, 1, 2, 1]  # uncond first


def test_style_reference_one_row_per_style_adapter_shared_by_jobs_of_one_content():
    shared = trajectory(-1)
    layout = RowLayout.for_step([job(shared, ("a", "b"), 0, "style"), job(shared, ("b",), 5, "style")], 0, False)
    assert [r.adapter for r in layout.references] == ["a", "b"]
    assert layout.sources == (0, 1, 1)  # job 2's style b shares job 1's b reference
    assert layout.job_references == ((0, 1), (1,))


def test_the_reference_row_is_the_trajectory_at_the_step():
    """Caught: the reference taken at step i + 1 (or i - 1) of the inversion trajectory."""
    path = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    layout = RowLayout.for_step([job(path, ("a",), 9)], 2, True)
    assert values(layout.references) == [2.0]


def test_without_an_open_window_there_are_no_reference_rows():
    layout = RowLayout.for_step([job(trajectory(-1), ("a",), 0, method=CLOSED)], 0, True)
    assert layout.references == () and layout.sources == () and layout.split_references(torch.ones(2, 1))[0] is None


def test_outputs_are_split_and_guided_per_job_and_style():
    """Caught: guidance pairing one style's cond row with another's uncond row, or jobs' outputs shifted."""
    layout = RowLayout.for_step([job(trajectory(-1), ("a", "b"), 0), job(trajectory(-2), ("c",), 5)], 0, True)
    output = torch.arange(2 + 6, dtype=torch.float32).view(-1, 1, 1, 1)  # row k's output is k
    reference, styles = layout.split_references(output)
    assert reference.flatten().tolist() == [0, 1]
    guided = layout.guided(styles, 3.0)
    expected = [[classifier_free_guidance(torch.tensor(u), torch.tensor(c), 3.0) for u, c in pairs]
                for pairs in ([(2.0, 3.0), (4.0, 5.0)], [(6.0, 7.0)])]
    assert [[float(g) for g in job_guided] for job_guided in guided] == [[float(e) for e in job_expected] for job_expected in expected]
    assert layout.job_reference_output(reference, 1).flatten().tolist() == [1]
