import contextlib
import warnings
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler

from diffstyler.backbones import backbone_for
from diffstyler.backbones.unet import decoder_layers
from diffstyler.injection import (
    InjectionConfig,
    Injector,
    ReferenceMode,
    describe_ineffective_sites,
    ineffective_sites,
)
from diffstyler.models import ModelSpec
from diffstyler.inversion import invert
from diffstyler.sampling import invert as invert_latents
from diffstyler.lora import BASE_ROW, route_adapters, set_adapter_scales
from diffstyler.models import encode_images, encode_prompts
from diffstyler.sampling import ddim_schedule, ddim_step
from diffstyler.stylize import SamplingConfig, StyleRows
from diffstyler.rows import JobRows, RowLayout
from diffstyler.methods import DiffStylerMethod
from tests.helpers import denoise_with_injection, tiny_pipe_with_adapter

STEPS = 8
ATTENTION_DECODER_LAYERS = list(range(3, 12))  # SD 1.x / 2.x: up_blocks[0] has no attention
EVERYWHERE = dict(feature_site="output", feature_layers=list(range(12)), attention_layers=ATTENTION_DECODER_LAYERS, feature_steps=STEPS, attention_steps=STEPS)
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
    trajectory = invert(backbone_for(pipe), encode_images(pipe, pixels), prompts[:1], schedule, progress=False)
    pipe.unet.enable_adapters()
    return pipe, schedule, prompts, trajectory


def _run(setup, injection, sampling=None, scale=1.0, reference_prompt=0, style_prompt=1, record=None):
    pipe, schedule, prompts, trajectory = setup
    set_adapter_scales(pipe.unet, {"style": scale})
    rows = [StyleRows("style", prompts[style_prompt : style_prompt + 1], prompts[2:3])]
    sampling = sampling or SamplingConfig(steps=STEPS)
    callback = record.append if record is not None else None
    return denoise_with_injection(
        pipe, trajectory, prompts[reference_prompt : reference_prompt + 1], rows, schedule,
        injection, sampling, callback=callback, progress=False,
    )[0]


def test_decoder_layer_mapping_follows_sd_numbering(setup):
    unet = setup[0].unet
    for layer in range(12):
        assert decoder_layers(unet).resnet(unet, layer) is unet.up_blocks[layer // 3].resnets[layer % 3]
    # the paper's "layers 4-11" start at up_blocks[1].resnets[1]
    assert decoder_layers(unet).resnet(unet, 4) is unet.up_blocks[1].resnets[1]
    assert decoder_layers(unet).attentions(unet, 4, "self") == [unet.up_blocks[1].attentions[1].transformer_blocks[0].attn1]
    assert decoder_layers(unet).attentions(unet, 11, "cross") == [unet.up_blocks[3].attentions[2].transformer_blocks[0].attn2]
    with pytest.raises(ValueError, match="no attention"):
        decoder_layers(unet).attentions(unet, 2, "self")


def test_config_rejects_layers_that_do_not_exist(setup):
    """Checked against the loaded UNet, one line naming the valid range."""
    decoder = decoder_layers(setup[0].unet)
    with pytest.raises(ValueError, match=r"feature_layers.*layer 12 does not exist \(this UNet's decoder layers: 0-11\)"):
        InjectionConfig(feature_layers=[12]).resolved(decoder)
    with pytest.raises(ValueError, match=r"attention_layers.*layer 1 has no attention \(this UNet's layers with attention: 3-11\)"):
        InjectionConfig(attention_layers=[1, 4]).resolved(decoder)
    with pytest.raises(ValueError, match="does not exist"):
        InjectionConfig(feature_layers=[-1])
    with pytest.raises(ValueError, match="unknown layer rule 'every'"):
        InjectionConfig(attention_layers=["every"])
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


@pytest.mark.slow
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
                             encoder_hidden_states=torch.cat([prompts[2:3].hidden, prompts[1:2].hidden])).sample
            guided = both[:1] + 10.5 * (both[1:] - both[:1])
            latent = ddim_step(latent, guided, schedule.alphas[i], schedule.alphas[i + 1])
    return latent


def test_all_switches_off_equals_plain_lora_sampling(setup):
    result = _run(setup, InjectionConfig(**NOTHING))
    assert (result - _plain_lora_sampling(setup)).abs().max().item() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("switch", ["features", "self_attention", "cross_attention"])
def test_each_switch_changes_the_output(setup, switch):
    baseline = _run(setup, InjectionConfig(**NOTHING))
    switched = _run(setup, InjectionConfig(**{**NOTHING, switch: True}))
    assert (switched - baseline).abs().max().item() > 1e-3


@pytest.mark.slow
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
    injector = Injector(backbone_for(setup[0]), [DiffStylerMethod(InjectionConfig(**EVERYWHERE).resolved(decoder_layers(unet), STEPS))])
    with pytest.raises(RuntimeError):
        with injector.installed():
            assert len(decoder_layers(unet).resnet(unet, 4)._forward_hooks) == 1
            raise RuntimeError("boom")
    assert len(decoder_layers(unet).resnet(unet, 4)._forward_hooks) == 0


@pytest.mark.slow
def test_residual_site_injects_the_resnet_branch_before_the_skip_connection(setup):
    unet = setup[0].unet
    injector = Injector(backbone_for(setup[0]), [DiffStylerMethod(InjectionConfig(feature_layers=[4], feature_site="residual",
                                                                                  **NOTHING_BUT_FEATURES).resolved(decoder_layers(unet), STEPS))])
    with injector.installed():
        assert len(decoder_layers(unet).resnet(unet, 4).conv2._forward_hooks) == 1
        assert len(decoder_layers(unet).resnet(unet, 4)._forward_hooks) == 0
    output_site = _run(setup, InjectionConfig(feature_layers=[4], feature_site="output", **NOTHING_BUT_FEATURES))
    residual_site = _run(setup, InjectionConfig(feature_layers=[4], feature_site="residual", **NOTHING_BUT_FEATURES))
    assert (output_site - residual_site).abs().max().item() > 1e-3


# --- the decoder's execution order and dominated settings -------------------------------------

def test_decoder_execution_order_is_the_order_of_a_real_forward_pass(setup):
    """Catches a wrong order rule (e.g. attention j before resnet j), on which the warning rests."""
    unet = setup[0].unet
    seen = []
    handles = [decoder_layers(unet).resnet(unet, layer).register_forward_hook(lambda *a, layer=layer: seen.append((layer, "feature")))
               for layer in range(12)]
    for layer in ATTENTION_DECODER_LAYERS:
        attention = unet.up_blocks[layer // 3].attentions[layer % 3]
        handles.append(attention.register_forward_hook(lambda *a, layer=layer: seen.append((layer, "attention"))))
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, 8, 6), 10, encoder_hidden_states=setup[2][:1].hidden)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == decoder_layers(unet).execution_order()


def test_default_configuration_has_no_dominated_layer(setup):
    decoder = decoder_layers(setup[0].unet)
    assert ineffective_sites(InjectionConfig(), decoder, 50) == {}
    assert describe_ineffective_sites(InjectionConfig(), decoder, 50) is None


def test_output_site_names_exactly_the_layers_its_last_layer_erases(setup):
    """The defect of the old default: output-site features 4-11 make features 4-10 and attention 3-10 idle."""
    decoder = decoder_layers(setup[0].unet)
    dominated = ineffective_sites(InjectionConfig(feature_site="output"), decoder, 50)
    assert dominated == {"features": list(range(4, 11)), "attention": list(range(3, 11))}
    # attention open longer than the features: it acts in the later steps, so it is not listed
    assert ineffective_sites(InjectionConfig(feature_site="output", feature_steps=3, attention_steps=5), decoder, 50) == {
        "features": list(range(4, 11))}
    # a single output-site layer dominates only what runs before it
    assert ineffective_sites(InjectionConfig(feature_site="output", feature_layers=[4]), decoder, 50) == {"attention": [3]}
    message = describe_ineffective_sites(InjectionConfig(feature_site="output"), decoder, 50)
    assert "feature layers [4, 5, 6, 7, 8, 9, 10] and attention layers [3, 4, 5, 6, 7, 8, 9, 10]" in message


def test_the_predictor_warns_once_at_load_time_about_dominated_layers():
    from diffstyler.predictor import StylizePredictor

    predictor = StylizePredictor(model=ModelSpec(name="tiny"), injection=InjectionConfig(feature_site="output"), inversion_cache=None)
    with pytest.warns(UserWarning, match=r"feature layers \[4, 5, 6, 7, 8, 9, 10\] and attention layers \[3, 4, 5, 6, 7, 8, 9, 10\] have no effect"):
        predictor.configure_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        StylizePredictor(model=ModelSpec(name="tiny"), inversion_cache=None).configure_model()


WINDOWS = dict(feature_steps=5, attention_steps=4)  # 30 and 25 of 50, scaled to 8 steps


@pytest.mark.slow
def test_the_layers_the_warning_names_really_have_no_effect(setup):
    """Checks the rule against the model: dominated layers removed, the result is the same to the bit."""
    full = InjectionConfig(feature_site="output", **WINDOWS).resolved(decoder_layers(setup[0].unet))
    dominated = ineffective_sites(full, decoder_layers(setup[0].unet), STEPS)
    kept_features = [l for l in full.feature_layers if l not in dominated["features"]]
    kept_attention = [l for l in full.attention_layers if l not in dominated["attention"]]
    assert kept_features == [11] and kept_attention == [11]
    reduced = InjectionConfig(feature_site="output", feature_layers=kept_features, attention_layers=kept_attention, **WINDOWS)
    assert torch.equal(_run(setup, full), _run(setup, reduced))


@pytest.fixture(scope="module")
def default_result(setup):
    return _run(setup, InjectionConfig(**WINDOWS))


@pytest.mark.slow
@pytest.mark.parametrize("layer", range(4, 12))
def test_default_every_feature_layer_changes_the_result(setup, default_result, layer):
    """Non-degeneracy: removing any one feature layer of the default changes the result."""
    layers = [l for l in range(4, 12) if l != layer]  # the default's layers on SD 1.x / 2.x
    assert (_run(setup, InjectionConfig(feature_layers=layers, **WINDOWS)) - default_result).abs().max().item() > 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("layer", ATTENTION_DECODER_LAYERS)
def test_default_every_attention_layer_changes_the_result(setup, default_result, layer):
    layers = [l for l in ATTENTION_DECODER_LAYERS if l != layer]
    assert (_run(setup, InjectionConfig(attention_layers=layers, **WINDOWS)) - default_result).abs().max().item() > 1e-5


# --- what reaches the UNet and the attention --------------------------------------------------

@pytest.mark.parametrize("substeps", [1, 4])
def test_inversion_trajectory_is_closed_form_ddim_at_every_sampler_timestep(setup, substeps):
    """With constant noise e, DDIM keeps x0 fixed: z_t = sqrt(a_t) c + sqrt(1 - a_t) e at each kept t.

    Catches a trajectory shifted by one step, a kept sub-step that is not a sampler timestep, or
    the wrong alpha for the clean end.
    """
    pipe, schedule, prompts, _ = setup
    generator = torch.Generator().manual_seed(5)
    z0, noise = torch.randn(1, 4, 8, 6, generator=generator), torch.randn(1, 4, 8, 6, generator=generator)
    (trajectory,) = invert_latents(lambda x, t: noise.expand_as(x), z0, schedule, substeps=substeps, progress=False)

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    alphas = scheduler.alphas_cumprod.double()
    start = float(scheduler.final_alpha_cumprod)  # z_0 sits at the schedule's clean end
    clean = (z0.double() - (1 - start) ** 0.5 * noise.double()) / start**0.5
    assert trajectory.shape[0] == STEPS + 1 and torch.equal(trajectory[-1:], z0)
    for i, t in enumerate(scheduler.timesteps.tolist()):
        expected = alphas[t].sqrt() * clean + (1 - alphas[t]).sqrt() * noise.double()
        assert (trajectory[i].double() - expected[0]).abs().max().item() < 1e-5, f"step {i}, t={t}"


def test_the_reference_row_gets_trajectory_i_at_timestep_i(setup):
    """Catches the reference reading trajectory[i + 1] (or starting from trajectory[1]) or a wrong timestep."""
    pipe, schedule, _, trajectory = setup
    calls = []

    def record(module, args, kwargs):
        calls.append((args[0].clone(), int(args[1])))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        _run(setup, InjectionConfig(**WINDOWS))
    finally:
        handle.remove()
    assert len(calls) == STEPS
    for i, (sample, timestep) in enumerate(calls):
        assert timestep == int(schedule.timesteps[i])
        if i < WINDOWS["feature_steps"]:
            assert sample.shape[0] == 3 and torch.equal(sample[0], trajectory[i])
        else:
            assert sample.shape[0] == 2  # reference row dropped
    assert torch.equal(calls[0][0][1], trajectory[0]) and torch.equal(calls[0][0][2], trajectory[0])


def _observe(monkeypatch, modules: dict[str, torch.nn.Module], before: bool = False):
    """Record (step, key, output) of `modules` after the injector's hooks ran (or before them).

    Wraps `Injector.installed` so that the recording hooks are registered after (or before) the
    injection hooks, without changing them.
    """
    records = []
    original = Injector.installed

    def hooks(injector):
        def make(key):
            return lambda module, args, output: records.append((injector.step, key, output.detach().clone()))
        return [module.register_forward_hook(make(key)) for key, module in modules.items()]

    @contextlib.contextmanager
    def installed(injector):
        early = hooks(injector) if before else []
        with original(injector):
            late = [] if before else hooks(injector)
            try:
                yield injector
            finally:
                for handle in early + late:
                    handle.remove()

    monkeypatch.setattr(Injector, "installed", installed)
    return records


def test_every_style_row_is_injected_the_uncond_rows_too(setup, monkeypatch):
    """Catches injecting only the conditional (last) row: rows 1 (uncond) and 2 (cond) get row 0's."""
    unet = setup[0].unet
    sites = {f"conv2.{l}": decoder_layers(unet).resnet(unet, l).conv2 for l in (4, 11)}
    sites.update({f"self.{l}.{p}": getattr(decoder_layers(unet).attentions(unet, l, "self")[0], p) for l in (3, 11) for p in ("to_q", "to_k")})
    records = _observe(monkeypatch, sites)
    _run(setup, InjectionConfig(**WINDOWS))
    inside = [(step, key, out) for step, key, out in records if step < WINDOWS["attention_steps"]]
    assert len(inside) == WINDOWS["attention_steps"] * len(sites)
    for step, key, output in inside:
        assert output.shape[0] == 3
        assert torch.equal(output[1], output[0]) and torch.equal(output[2], output[0]), (step, key)


def _heads(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, width = tensor.shape
    return tensor.view(batch, tokens, heads, width // heads).transpose(1, 2)


def _probabilities(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    q, k = _heads(q, heads), _heads(k, heads)
    return torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)


@pytest.mark.parametrize("kind", ["self", "cross"])
def test_attention_injection_alone_gives_the_reference_probabilities_inside_the_window_only(setup, monkeypatch, kind):
    """Features off: in every injected layer and step the style rows' softmax(QK^T) is the reference's;
    after the window the rows use their own Q and K. Catches a window off by one or a skipped layer."""
    unet = setup[0].unet
    layers = ATTENTION_DECODER_LAYERS
    attentions = {l: decoder_layers(unet).attentions(unet, l, kind)[0] for l in layers}
    sites = {f"{l}.{p}": getattr(attentions[l], p) for l in layers for p in ("to_q", "to_k")}
    final = _observe(monkeypatch, sites)
    raw = _observe(monkeypatch, sites, before=True)  # wraps the wrapper: registered before the injector
    window = 3
    injection = InjectionConfig(features=False, self_attention=kind == "self", cross_attention=kind == "cross",
                                attention_steps=window)
    _run(setup, injection)
    by_step = {}
    for step, key, output in final:
        by_step.setdefault((step, key), output)
    own = {(step, key): output for step, key, output in raw}
    assert {step for step, _ in by_step} == set(range(STEPS))
    for step in range(STEPS):
        for l in layers:
            q, k = by_step[(step, f"{l}.to_q")], by_step[(step, f"{l}.to_k")]
            probabilities = _probabilities(q, k, attentions[l].heads)
            if step < window:
                assert (probabilities[1:] - probabilities[:1]).abs().max().item() < 1e-6, (step, l)
            else:
                assert q.shape[0] == 2  # reference row dropped: the rows' own Q and K
                assert torch.equal(q, own[(step, f"{l}.to_q")]) and torch.equal(k, own[(step, f"{l}.to_k")])


def test_attention_injection_keeps_the_style_rows_own_values(setup, monkeypatch):
    """Catches V injected with Q and K: the style rows' V is their own projection of their own input."""
    unet = setup[0].unet
    attention = decoder_layers(unet).attentions(unet, 7, "self")[0]
    records = _observe(monkeypatch, {"q": attention.to_q, "k": attention.to_k, "v": attention.to_v})
    inputs = []
    handle = attention.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(args[0].clone()), with_kwargs=True)
    try:
        _run(setup, InjectionConfig(features=False, **WINDOWS))
    finally:
        handle.remove()
    step0 = {key: output for step, key, output in records if step == 0}
    assert torch.equal(step0["q"][1:], step0["q"][:1].expand_as(step0["q"][1:]))
    assert torch.equal(step0["k"][1:], step0["k"][:1].expand_as(step0["k"][1:]))
    v = step0["v"]
    own_v = attention.to_v(inputs[0][1:])  # style adapter active: the style rows' own projection
    assert (v[1:] - own_v).abs().max().item() < 1e-6
    assert (v[1:] - v[:1]).abs().max().item() > 1e-3


def _all_sites(unet) -> dict[str, torch.nn.Module]:
    sites = {}
    for layer, kind in decoder_layers(unet).execution_order():
        if kind == "feature":
            sites[f"conv2.{layer}"] = decoder_layers(unet).resnet(unet, layer).conv2
            sites[f"resnet.{layer}"] = decoder_layers(unet).resnet(unet, layer)
        else:
            for attention_kind in ("self", "cross"):
                attention = decoder_layers(unet).attentions(unet, layer, attention_kind)[0]
                for projection in ("to_q", "to_k", "to_v"):
                    sites[f"{attention_kind}.{layer}.{projection}"] = getattr(attention, projection)
    return sites


def _one_call(setup, injection: InjectionConfig, sites: dict[str, torch.nn.Module]) -> list[tuple[str, torch.Tensor]]:
    """(site, output) in call order for one UNet call at step 0 on [reference, uncond, cond]."""
    pipe, schedule, prompts, trajectory = setup
    set_adapter_scales(pipe.unet, {"style": 1.0})
    method = DiffStylerMethod(injection.resolved(backbone_for(pipe).layer_map(), STEPS))
    injector = Injector(backbone_for(pipe), [method])
    # the layout of this call: one reference row feeding both style rows, also with every switch off
    # (then the method itself would leave the reference row out of the call)
    everywhere = DiffStylerMethod(InjectionConfig(**EVERYWHERE).resolved(backbone_for(pipe).layer_map(), STEPS))
    layout = RowLayout.for_step([JobRows(trajectory, prompts[0:1], (StyleRows("style", prompts[1:2], prompts[2:3]),), (everywhere,),
                                         (trajectory[:1],))], 0, True)
    layout = replace(layout, row_methods=(method,) * len(layout.styles))
    assert layout.sources == (0, 0)
    injector.set_step(0, schedule.timesteps[0], ReferenceMode.BATCH_ROW, layout)
    records = []
    with injector.installed():
        handles = [m.register_forward_hook(lambda module, args, output, key=key: records.append((key, output.clone())))
                   for key, m in sites.items()]
        try:
            with route_adapters(pipe.unet, [BASE_ROW, "style", "style"]), torch.no_grad():
                pipe.unet(trajectory[:1].expand(3, -1, -1, -1), schedule.timesteps[0],
                          encoder_hidden_states=torch.cat([prompts[0:1].hidden, prompts[2:3].hidden, prompts[1:2].hidden]))
        finally:
            for handle in handles:
                handle.remove()
    return records


@pytest.mark.parametrize("switch, first_site", [
    ("features", "conv2.4"), ("self_attention", "self.3.to_q"), ("cross_attention", "cross.3.to_q"),
])
def test_each_switch_changes_exactly_the_rows_and_layers_it_names(setup, switch, first_site):
    """One UNet call, against the same call with every switch off: the reference row never changes;
    the style rows are unchanged at every site that runs before the switch's first site and changed
    from there on; the cross-attention's text-only keys and values change only where named.
    Catches a switch that injects elsewhere (e.g. self-attention touching attn2), into row 0, or V."""
    sites = _all_sites(setup[0].unet)
    off = _one_call(setup, InjectionConfig(**NOTHING, **WINDOWS), sites)
    on = _one_call(setup, InjectionConfig(**{**NOTHING, switch: True}, **WINDOWS), sites)
    assert [key for key, _ in off] == [key for key, _ in on]
    start = [key for key, _ in on].index(first_site)
    for index, ((key, before), (_, after)) in enumerate(zip(off, on)):
        assert torch.equal(before[0], after[0]), f"reference row changed at {key}"
        if index < start:
            assert torch.equal(before[1:], after[1:]), f"style rows changed at {key}, before {first_site}"
        text_only = key.startswith("cross.") and key.endswith(("to_k", "to_v"))
        if text_only and not (switch == "cross_attention" and key.endswith("to_k")):
            assert torch.equal(before[1:], after[1:]), f"{key} reads the text only and is not injected"
    assert not torch.equal(off[start][1][1:], on[start][1][1:])
    later_resnets = [(b, a) for (key, b), (_, a) in zip(off[start:], on[start:]) if key.startswith("resnet.")]
    assert later_resnets and all(not torch.equal(b[1:], a[1:]) for b, a in later_resnets)
