"""The stylization loop (`stylize.denoise_jobs`, one job at a time) against independent computations: the
authors' per-style reference scheme written out by hand, several styles against their one-style
runs with guidance, and non-finite values."""

import pytest
import torch
from diffusers import DDIMScheduler

from diffstyler.errors import UserError
from diffstyler.backbones import backbone_for
from diffstyler.backbones.unet import decoder_layers
from diffstyler.injection import InjectionConfig
from diffstyler.inversion import invert
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, set_adapter_scales
from diffstyler.models import encode_images, encode_prompts
from diffstyler.sampling import ddim_schedule
from diffstyler.stylize import SamplingConfig, StyleRows
from tests.helpers import denoise_with_injection, randomize_adapter, two_style_setup

STEPS = 8
GUIDANCE = 10.5
# The paper's public code (configs/presets/paper_code.yaml), windows scaled from 50 to 8 steps.
PAPER_CODE = dict(feature_layers=[4], feature_site="residual", attention_layers=list(range(4, 12)),
                  self_attention=True, cross_attention=False, qk_mix="timestep_rate", reference_model="style",
                  feature_steps=5, attention_steps=4)


@pytest.fixture(scope="module")
def setup():
    return two_style_setup(STEPS)


def _rows(setup, styles):
    prompts = setup[2]
    return [StyleRows(adapter, prompts[p : p + 1], prompts[3:4], mask, name=adapter) for adapter, p, mask in styles]


def _run(setup, styles, injection: InjectionConfig, reference="batch"):
    pipe, schedule, prompts, trajectory = setup
    set_adapter_scales(pipe.unet, {"a": 1.0, "b": 1.0})
    return denoise_with_injection(
        pipe, trajectory, prompts[:1], _rows(setup, styles), schedule, injection,
        SamplingConfig(steps=STEPS, guidance_scale=GUIDANCE, reference=reference), progress=False,
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest difference relative to the values' scale (guidance amplifies float32 rounding)."""
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


def _authors_loop(setup, adapter: str, prompt: int) -> torch.Tensor:
    """The authors' scheme, one style at a time, written out with diffusers' own DDIM step.

    Each step: the style's LoRA UNet runs the reference row (inversion latent z_t, empty prompt)
    and records the residual branch of decoder layer 4 and the self-attention Q/K of layers 4-11;
    then it runs [uncond, cond] on the style's latent with those activations written in (Q/K
    blended with rate min(1, 2t/1000)); guidance; `DDIMScheduler.step`.
    """
    pipe, _, prompts, trajectory = setup
    unet = pipe.unet
    set_adapter_scales(unet, {adapter: 1.0})
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    conv = decoder_layers(unet).resnet(unet, 4).conv2
    projections = [getattr(decoder_layers(unet).attentions(unet, l, "self")[0], p) for l in range(4, 12) for p in ("to_q", "to_k")]
    recorded, state = {}, {"mode": "record", "rate": 1.0}

    def hook_for(module, feature_window: bool):
        def hook(_, args, output):
            if not state[feature_window]:
                return None
            if state["mode"] == "record":
                recorded[module] = output.clone()
                return None
            rate = 1.0 if module is conv else state["rate"]
            reference = recorded[module].expand_as(output)
            return (1 - rate) * output + rate * reference
        return hook

    handles = [conv.register_forward_hook(hook_for(conv, "features"))]
    handles += [m.register_forward_hook(hook_for(m, "attention")) for m in projections]
    latent = trajectory[:1].clone()
    try:
        with torch.no_grad():
            for i, t in enumerate(scheduler.timesteps):
                state.update(features=i < PAPER_CODE["feature_steps"], attention=i < PAPER_CODE["attention_steps"],
                             rate=min(1.0, 2 * int(t) / 1000))
                state["mode"] = "record"
                unet(trajectory[i : i + 1], t, encoder_hidden_states=prompts[:1].hidden)
                state["mode"] = "inject"
                both = unet(torch.cat([latent, latent]), t,
                            encoder_hidden_states=torch.cat([prompts[3:4].hidden, prompts[prompt : prompt + 1].hidden])).sample
                guided = both[:1] + GUIDANCE * (both[1:] - both[:1])
                latent = scheduler.step(guided, t, latent).prev_sample
    finally:
        for handle in handles:
            handle.remove()
        set_adapter_scales(unet, {"a": 1.0, "b": 1.0})
    return latent


@pytest.mark.slow
@pytest.mark.parametrize("reference", ["batch", "separate"])
def test_style_reference_model_reproduces_the_authors_loop_for_each_style(setup, reference):
    """Two styles in one batch, each with its own LoRA reference row. Catches style b injected from
    style a's reference row, a reference run with the base model, or a wrong Q/K blend rate."""
    together = _run(setup, [("a", 1, None), ("b", 2, None)], InjectionConfig(**PAPER_CODE), reference=reference)
    by_hand = [_authors_loop(setup, "a", 1), _authors_loop(setup, "b", 2)]
    for ours, theirs in zip(together, by_hand):
        assert _close(ours, theirs) < 1e-4
    assert _close(by_hand[0], by_hand[1]) > 1e-2  # the two styles really differ
    base_reference = _run(setup, [("a", 1, None)], InjectionConfig(**{**PAPER_CODE, "reference_model": "base"}))
    assert _close(base_reference[0], by_hand[0]) > 1e-3  # and the reference model matters


def _mask(rows: slice) -> torch.Tensor:
    mask = torch.zeros(1, 1, 8, 6)
    mask[..., rows, :] = 1
    return mask


@pytest.mark.slow
@pytest.mark.parametrize("reference_model", ["base", "style"])
def test_several_styles_with_guidance_equal_their_one_style_runs(setup, reference_model):
    """Guidance 10.5 (uncond rows in the batch): each style's latent in a two-style run equals its run
    alone, masked or not. Catches rows of one style reading the other's uncond row or reference."""
    injection = InjectionConfig(feature_steps=5, attention_steps=4, reference_model=reference_model)
    for masks in ([None, None], [_mask(slice(0, 4)), _mask(slice(4, 8))]):
        together = _run(setup, [("a", 1, masks[0]), ("b", 2, masks[1])], injection)
        alone = [_run(setup, [("a", 1, masks[0])], injection)[0], _run(setup, [("b", 2, masks[1])], injection)[0]]
        assert _close(together[0], alone[0]) < 1e-4 and _close(together[1], alone[1]) < 1e-4
        assert _close(alone[0], alone[1]) > 1e-2


def test_a_lora_with_nan_weights_fails_naming_its_style(setup):
    """No NaN latent reaches the decoder (which would write a black image)."""
    pipe = setup[0]
    add_style_adapter(pipe.unet, StyleLoRAConfig(rank=4), "broken")
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_B.broken." in name:
                parameter.fill_(float("nan"))
    try:
        set_adapter_scales(pipe.unet, {"a": 1.0, "broken": 1.0})
        rows = _rows(setup, [("a", 1, None), ("broken", 2, None)])
        with pytest.raises(UserError, match=r"non-finite.*style 'broken', denoising step 0"):
            denoise_with_injection(pipe, setup[3], setup[2][:1], rows, setup[1], InjectionConfig(),
                                   SamplingConfig(steps=STEPS), progress=False)
    finally:
        pipe.unet.delete_adapters("broken")


@pytest.mark.slow
def test_a_half_precision_step_that_overflows_is_run_again_in_float32():
    """A LoRA with huge weights overflows float16 (inf) but not float32: every such UNet call is
    redone in float32, the result is finite, and the UNet's dtypes are restored. Catches a missing
    retry (the job would fail) or a UNet left in float32."""
    from diffstyler.models import ModelSpec, load_pipeline

    pipe = load_pipeline(ModelSpec("tiny", dtype="float16"))
    torch.manual_seed(0)  # the adapter's A matrices come from the global generator
    add_style_adapter(pipe.unet, StyleLoRAConfig(rank=4), "huge")
    randomize_adapter(pipe.unet, "huge", seed=1, std=1e4)  # finite in float16, its products are not
    pipe.unet.half().requires_grad_(False)
    schedule = ddim_schedule(pipe.scheduler, 4)
    prompts = encode_prompts(pipe, ["", "painting", "ugly"])
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    pipe.unet.disable_adapters()
    trajectory = invert(backbone_for(pipe), encode_images(pipe, pixels), prompts[:1], schedule, progress=False)
    pipe.unet.enable_adapters()
    dtypes = {name: p.dtype for name, p in pipe.unet.named_parameters()}
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].dtype))
    try:
        result = denoise_with_injection(pipe, trajectory, prompts[:1], [StyleRows("huge", prompts[1:2], prompts[2:3])],
                                        schedule, InjectionConfig(feature_steps=3, attention_steps=2),
                                        SamplingConfig(steps=4), progress=False)[0]
    finally:
        handle.remove()
    # every step runs in half precision first; each float32 call is the retry of the call before it
    assert calls.count(torch.float16) == 4 and calls.count(torch.float32) >= 1
    assert all(calls[i - 1] == torch.float16 for i, dtype in enumerate(calls) if dtype == torch.float32)
    assert result.dtype == torch.float16 and torch.isfinite(result).all()
    assert {name: p.dtype for name, p in pipe.unet.named_parameters()} == dtypes
