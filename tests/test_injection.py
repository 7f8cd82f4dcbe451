import pytest
import torch

from diffstyler.injection import (
    ATTENTION_DECODER_LAYERS,
    InjectionConfig,
    Injector,
    decoder_attentions,
    decoder_resnet,
)
from diffstyler.inversion import invert
from diffstyler.lora import set_adapter_scales
from diffstyler.models import encode_images, encode_prompts
from diffstyler.sampling import ddim_schedule, ddim_step
from diffstyler.stylize import SamplingConfig, StyleRows, denoise_with_injection
from tests.helpers import tiny_pipe_with_adapter

STEPS = 8
EVERYWHERE = dict(feature_layers=list(range(12)), attention_layers=ATTENTION_DECODER_LAYERS, feature_steps=STEPS, attention_steps=STEPS)
NOTHING = dict(features=False, self_attention=False, cross_attention=False)
NOTHING_BUT_FEATURES = dict(self_attention=False, cross_attention=False)


@pytest.fixture(scope="module")
def setup():
    pipe = tiny_pipe_with_adapter("style", seed=3)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    schedule = ddim_schedule(pipe.scheduler, STEPS)
    prompts = encode_prompts(pipe, ["", "painting of sss", "ugly"])
    pipe.unet.disable_adapters()
    trajectory = invert(pipe.unet, encode_images(pipe, pixels), prompts[:1], schedule, progress=False)
    pipe.unet.enable_adapters()
    return pipe, schedule, prompts, trajectory


def _run(setup, injection, sampling=None, scale=1.0, reference_prompt=0, style_prompt=1, record=None):
    pipe, schedule, prompts, trajectory = setup
    set_adapter_scales(pipe.unet, {"style": scale})
    rows = [StyleRows("style", prompts[style_prompt : style_prompt + 1], prompts[2:3])]
    sampling = sampling or SamplingConfig(steps=STEPS)
    callback = record.append if record is not None else None
    return denoise_with_injection(
        pipe.unet, trajectory, prompts[reference_prompt : reference_prompt + 1], rows, schedule,
        injection, sampling, callback=callback, progress=False,
    )[0]


def test_decoder_layer_mapping_follows_sd_numbering(setup):
    unet = setup[0].unet
    for layer in range(12):
        assert decoder_resnet(unet, layer) is unet.up_blocks[layer // 3].resnets[layer % 3]
    # the paper's "layers 4-11" start at up_blocks[1].resnets[1]
    assert decoder_resnet(unet, 4) is unet.up_blocks[1].resnets[1]
    assert decoder_attentions(unet, 4, "self") == [unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1]
    assert decoder_attentions(unet, 11, "cross") == [unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2]
    with pytest.raises(ValueError, match="no attention"):
        decoder_attentions(unet, 2, "self")


def test_config_rejects_layers_that_do_not_exist():
    with pytest.raises(ValueError, match="layer 12 does not exist"):
        InjectionConfig(feature_layers=[12])
    with pytest.raises(ValueError, match="layer 1 has no attention"):
        InjectionConfig(attention_layers=[1, 4])
    with pytest.raises(ValueError, match="qk_mix"):
        InjectionConfig(qk_mix="blend")


def test_injection_everywhere_with_lora_off_reproduces_the_reference(setup):
    steps = []
    sampling = SamplingConfig(steps=STEPS, guidance_scale=1.0)
    _run(setup, InjectionConfig(**EVERYWHERE), sampling, scale=0.0, reference_prompt=1, style_prompt=1, record=steps)
    assert len(steps) == STEPS
    for state in steps:
        assert state.reference_output is not None
        assert (state.style_outputs[0] - state.reference_output).abs().max().item() < 1e-5


def test_one_mixed_batch_equals_separate_forwards(setup):
    injection = InjectionConfig(feature_steps=6, attention_steps=5)
    batch, separate = [], []
    _run(setup, injection, SamplingConfig(steps=STEPS, reference="batch"), record=batch)
    _run(setup, injection, SamplingConfig(steps=STEPS, reference="separate"), record=separate)
    for one, two in zip(batch, separate):
        assert (one.reference_output is None) == (two.reference_output is None)
        if one.reference_output is not None:
            assert (one.reference_output - two.reference_output).abs().max().item() < 1e-5
        # guided outputs: 10.5 x (cond - uncond) amplifies float noise; compare relative to scale
        difference = (one.style_outputs[0] - two.style_outputs[0]).abs().max().item()
        assert difference < 1e-5 * max(1.0, one.style_outputs[0].abs().max().item())


def test_reference_row_is_dropped_after_both_windows(setup):
    steps = []
    _run(setup, InjectionConfig(feature_steps=3, attention_steps=2), record=steps)
    assert [s.reference_output is not None for s in steps] == [True] * 3 + [False] * (STEPS - 3)


def _plain_lora_sampling(setup):
    pipe, schedule, prompts, trajectory = setup
    set_adapter_scales(pipe.unet, {"style": 1.0})
    latent = trajectory[:1]
    with torch.no_grad():
        for i in range(schedule.num_steps):
            both = pipe.unet(torch.cat([latent, latent]), schedule.timesteps[i],
                             encoder_hidden_states=torch.cat([prompts[2:3], prompts[1:2]])).sample
            guided = both[:1] + 10.5 * (both[1:] - both[:1])
            latent = ddim_step(latent, guided, schedule.alphas[i], schedule.alphas[i + 1])
    return latent


def test_all_switches_off_equals_plain_lora_sampling(setup):
    result = _run(setup, InjectionConfig(**NOTHING))
    assert (result - _plain_lora_sampling(setup)).abs().max().item() < 1e-4


@pytest.mark.parametrize("switch", ["features", "self_attention", "cross_attention"])
def test_each_switch_changes_the_output(setup, switch):
    baseline = _run(setup, InjectionConfig(**NOTHING))
    switched = _run(setup, InjectionConfig(**{**NOTHING, switch: True}))
    assert (switched - baseline).abs().max().item() > 1e-3


def test_paper_code_mode_is_a_config_value(setup):
    paper = _run(setup, InjectionConfig())
    paper_code = _run(setup, InjectionConfig(feature_layers=[4], attention_layers=list(range(4, 12)),
                                             cross_attention=False, qk_mix="timestep_rate", feature_site="residual"))
    assert torch.isfinite(paper_code).all()
    assert (paper - paper_code).abs().max().item() > 1e-3


def test_hooks_and_processors_are_restored(setup):
    unet = setup[0].unet
    processors = dict(unet.attn_processors)
    hooks = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in unet.named_modules()}
    _run(setup, InjectionConfig(**EVERYWHERE))
    assert unet.attn_processors == processors
    after = {name: (dict(m._forward_hooks), dict(m._forward_pre_hooks)) for name, m in unet.named_modules()}
    assert after == hooks


def test_hooks_are_removed_when_the_loop_fails(setup):
    unet = setup[0].unet
    injector = Injector(unet, InjectionConfig(**EVERYWHERE))
    with pytest.raises(RuntimeError):
        with injector.installed():
            assert len(decoder_resnet(unet, 4)._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(decoder_resnet(unet, 4)._forward_hooks) == 0


def test_residual_site_injects_the_resnet_branch_before_the_skip_connection(setup):
    unet = setup[0].unet
    injector = Injector(unet, InjectionConfig(feature_layers=[4], feature_site="residual", **NOTHING_BUT_FEATURES))
    with injector.installed():
        assert len(decoder_resnet(unet, 4).conv2._forward_hooks) == 1
        assert len(decoder_resnet(unet, 4)._forward_hooks) == 0
    output_site = _run(setup, InjectionConfig(feature_layers=[4], **NOTHING_BUT_FEATURES))
    residual_site = _run(setup, InjectionConfig(feature_layers=[4], feature_site="residual", **NOTHING_BUT_FEATURES))
    assert (output_site - residual_site).abs().max().item() > 1e-3
