"""Mask-wise fusion (paper eq. 6 and 7) and several LoRAs on one UNet."""

import pytest
import torch

from diffstyler.injection import InjectionConfig
from diffstyler.lora import StyleLoRAConfig, add_style_adapter
from diffstyler.stylize import SamplingConfig, StyleRows, exclusive_masks, fuse_styles
from tests.helpers import denoise_with_injection, tiny_pipe_with_adapter, two_style_setup

STEPS = 6


@pytest.fixture(scope="module")
def setup():
    return two_style_setup(STEPS)


def _mask(rows: slice, cols: slice) -> torch.Tensor:
    mask = torch.zeros(1, 1, 8, 6)
    mask[..., rows, cols] = 1
    return mask


def _run(setup, styles, record=None, guidance_scale=10.5):
    pipe, schedule, prompts, trajectory = setup
    rows = [StyleRows(adapter, prompts[p : p + 1], prompts[3:4], mask) for adapter, p, mask in styles]
    return denoise_with_injection(
        pipe, trajectory, prompts[:1], rows, schedule, InjectionConfig(feature_steps=4, attention_steps=3),
        SamplingConfig(steps=STEPS, guidance_scale=guidance_scale), callback=record.append if record is not None else None, progress=False,
    )


def test_outside_the_mask_the_latent_is_the_content_trajectory_at_every_step(setup):
    trajectory = setup[3]
    mask = _mask(slice(2, 6), slice(1, 4))
    steps = []
    _run(setup, [("a", 1, mask)], record=steps)
    outside = ~mask.bool().expand(1, 4, 8, 6)
    for state in steps:
        expected = trajectory[state.step + 1 : state.step + 2]
        assert torch.equal(state.latents[0][outside], expected[outside])
        assert not torch.equal(state.latents[0], expected)  # inside, the style acted


@pytest.mark.slow
def test_two_styles_on_disjoint_masks_equal_their_one_style_runs(setup):
    trajectory = setup[3]
    top, bottom = _mask(slice(0, 4), slice(0, 6)), _mask(slice(4, 8), slice(0, 6))
    # guidance 1: a 10.5x guidance would amplify the float32 rounding of different batch sizes
    together = _run(setup, [("a", 1, top), ("b", 2, bottom)], guidance_scale=1.0)
    alone_a = _run(setup, [("a", 1, top)], guidance_scale=1.0)[0]
    alone_b = _run(setup, [("b", 2, bottom)], guidance_scale=1.0)[0]
    fused = fuse_styles(together, [top, bottom], trajectory[-1:])
    inside_a, inside_b = top.bool().expand_as(fused), bottom.bool().expand_as(fused)
    assert (fused[inside_a] - alone_a[inside_a]).abs().max().item() < 1e-5
    assert (fused[inside_b] - alone_b[inside_b]).abs().max().item() < 1e-5
    assert (alone_a[inside_a] - alone_b[inside_a]).abs().max().item() > 1e-3  # the styles differ


def test_overlapping_masks_later_style_wins(setup):
    trajectory = setup[3]
    first, second = _mask(slice(0, 6), slice(0, 6)), _mask(slice(3, 8), slice(0, 6))
    together = _run(setup, [("a", 1, first), ("b", 2, second)])
    fused = fuse_styles(together, [first, second], trajectory[-1:])
    assert torch.equal(fused[..., 3:8, :], together[1][..., 3:8, :])
    assert torch.equal(fused[..., 0:3, :], together[0][..., 0:3, :])
    exclusive = exclusive_masks([first.bool(), second.bool()])
    assert not (exclusive[0] & exclusive[1]).any()
    assert torch.equal(exclusive[0] | exclusive[1], first.bool() | second.bool())


def test_fused_latent_outside_all_masks_is_the_content_latent(setup):
    trajectory = setup[3]
    mask = _mask(slice(1, 3), slice(1, 3))
    fused = fuse_styles(_run(setup, [("a", 1, mask)]), [mask], trajectory[-1:])
    outside = ~mask.bool().expand_as(fused)
    assert torch.equal(fused[outside], trajectory[-1:][outside])


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _adapter_bytes(module: torch.nn.Module, name: str) -> int:
    return sum(p.numel() * p.element_size() for n, p in module.named_parameters() if f".{name}." in n)


@pytest.mark.slow
def test_unet_memory_grows_only_by_the_adapters_own_size():
    pipe = tiny_pipe_with_adapter("s0", seed=1)
    one = _parameter_bytes(pipe.unet)
    for k in (1, 2, 3):
        add_style_adapter(pipe.unet, StyleLoRAConfig(rank=4), f"s{k}")
    four = _parameter_bytes(pipe.unet)
    assert four - one == sum(_adapter_bytes(pipe.unet, f"s{k}") for k in (1, 2, 3))
    assert _adapter_bytes(pipe.unet, "s1") < 0.05 * one  # never a UNet copy per style
