"""The transformer backbone (SD 3.5, FLUX.1) on the tiny models of each: the sampler against the
families' own diffusers pipelines, the block map against a real forward pass, where the injection
writes (image tokens only; the residual branch), flow-matching inversion against closed forms, the
training objective, and every default layer changing the result."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
from diffusers import FluxPipeline

from diffstyler.backbones import backbone_for
from diffstyler.backbones.mmdit import transformer_layer_map
from diffstyler.callbacks.preview import sample_text_to_image
from diffstyler.injection import InjectionConfig, Injector, ReferenceMode
from diffstyler.inversion import invert
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, set_adapter_scales
from diffstyler.methods import DiffStylerMethod
from diffstyler.models import ModelSpec, load_pipeline
from diffstyler.rows import JobRows, RowLayout
from diffstyler.sampling import FlowSchedule, Move, flow_inversion_step, sample
from diffstyler.sampling import invert as invert_latents
from diffstyler.stylize import SamplingConfig, StyleRows
from diffstyler.torch_utils import base_model
from tests.helpers import denoise_with_injection, randomize_adapter

FAMILIES = ["tiny-flux", "tiny-flux-schnell", "tiny-sd3"]
STEPS = 6


@pytest.fixture(scope="module")
def pipes() -> dict:
    return {name: load_pipeline(ModelSpec(name)) for name in FAMILIES}


# --- the sampler is the family's own ------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("name, guidance", [("tiny-flux", 3.5), ("tiny-flux-schnell", 0.0), ("tiny-sd3", 4.5)])
def test_plain_sampling_equals_the_familys_own_pipeline(pipes, name, guidance):
    """Our schedule, packing, guidance and text encoding against `FluxPipeline` / `StableDiffusion3Pipeline`
    on the same components and noise. Caught: sigmas without FLUX's size shift (or with it on SD 3.5),
    the timestep not divided by 1000 for FLUX, tokens packed in another order, guidance embedded on
    schnell or negative rows run on FLUX."""
    pipe = pipes[name]
    ours = sample_text_to_image(pipe, "painting", "ugly", 64, 48, 4, guidance, torch.Generator().manual_seed(3))
    noise = torch.randn((1, 16, 8, 6), generator=torch.Generator().manual_seed(3))
    length = backbone_for(pipe).max_sequence_length
    if isinstance(pipe, FluxPipeline):
        theirs = pipe("painting", height=64, width=48, num_inference_steps=4, guidance_scale=guidance, output_type="pt",
                      latents=FluxPipeline._pack_latents(noise, 1, 16, 8, 6), max_sequence_length=length).images
    else:
        theirs = pipe("painting", negative_prompt="ugly", height=64, width=48, num_inference_steps=4, guidance_scale=guidance,
                      latents=noise, output_type="pt", max_sequence_length=length).images
    assert (ours - theirs).abs().max().item() < 1e-5


def test_families_and_variants_are_read_from_the_components(pipes):
    """Caught: a family told by name; dev and schnell, Large and Medium told apart by their layout."""
    described = {name: (str(backbone_for(pipe).family), backbone_for(pipe).variant) for name, pipe in pipes.items()}
    assert described == {"tiny-flux": ("FLUX.1, flow", "FLUX.1-dev"), "tiny-flux-schnell": ("FLUX.1, flow", "FLUX.1-schnell"),
                         "tiny-sd3": ("SD 3.5, flow", "SD 3.5 Medium")}
    assert [backbone_for(pipe).negative_rows(3.5) for pipe in pipes.values()] == [False, False, True]
    assert [backbone_for(pipe).pixel_multiple for pipe in pipes.values()] == [16, 16, 16]


# --- the block map -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_the_block_map_is_the_order_of_a_real_forward_pass(pipes, name):
    """Hooks on every block and on its attention record one call. Caught: FLUX's single-stream blocks
    mapped before its double-stream ones, a block missing from the map, or attention placed after the
    block's output (the order the dominated-site rule reads)."""
    pipe = pipes[name]
    backbone = backbone_for(pipe)
    layers = backbone.layer_map()
    seen, handles = [], []
    for index, block in enumerate(backbone.blocks):
        handles.append(block.register_forward_hook(lambda *a, index=index: seen.append((index, "feature"))))
        handles.append(block.attn.register_forward_hook(lambda *a, index=index: seen.append((index, "attention"))))
    try:
        with torch.no_grad():
            backbone.predict(torch.zeros(1, 16, 8, 6), torch.tensor(500.0), backbone.encode_prompts([""]), 3.5)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == layers.execution_order()
    assert [layer.module for layer in layers.layers] == [name for name, module in pipe.transformer.named_modules()
                                                         if module in backbone.blocks]


@pytest.mark.parametrize("blocks, rules", [
    (19 * ["double"] + 38 * ["single"], {"all": (29, 37), "paper": (38, 56), "pnp": (38, 38), "from_pnp": (39, 56)}),  # FLUX.1
    (38 * ["joint"], {"all": (19, 25), "paper": (26, 37), "pnp": (26, 26), "from_pnp": (27, 37)}),  # SD 3.5 Large
    (24 * ["joint"], {"all": (12, 15), "paper": (16, 23), "pnp": (16, 16), "from_pnp": (17, 23)}),  # SD 3.5 Medium
    (6 * ["block"], {"all": (3, 3), "paper": (4, 5), "pnp": (4, 4), "from_pnp": (5, 5)}),  # tiny-flux, tiny-sd3
])
def test_the_rules_on_the_real_block_counts(blocks, rules):
    """The documented numbers (docs: model families). Caught: a rule off by one block at either end,
    or attention rules overlapping the feature blocks (where a block's residual injection discards
    what its attention did)."""
    layers = transformer_layer_map([f"{kind}.{index}" for index, kind in enumerate(blocks)])
    for rule, (first, last) in rules.items():
        assert layers.rule(rule) == list(range(first, last + 1)), rule
    assert not set(layers.rule("all")) & set(layers.rule("paper"))
    assert InjectionConfig(feature_layers=[len(blocks)]).feature_layers == [len(blocks)]
    with pytest.raises(ValueError, match=rf"block {len(blocks)} does not exist \(this transformer's blocks: 0-{len(blocks) - 1}\)"):
        InjectionConfig(feature_layers=[len(blocks)]).resolved(layers)


# --- where the injection writes ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def adapted() -> dict:
    """tiny-flux and tiny-sd3 with a random style adapter "style" (their LoRA layers in place before
    a test takes a module)."""
    made = {}
    for name in ("tiny-flux", "tiny-sd3"):
        pipe = load_pipeline(ModelSpec(name))
        denoiser = backbone_for(pipe).denoiser
        add_style_adapter(denoiser, StyleLoRAConfig(rank=4), "style")
        randomize_adapter(denoiser, "style", seed=5)
        denoiser.requires_grad_(False)
        made[name] = pipe
    return made


def _one_call(pipe, injection: InjectionConfig, watched: dict, scale: float = 1.0):
    """One call at step 0 on [reference, style] (no negative rows), the injector installed, and the
    outputs of `watched` modules seen before and after its hooks: {key: (raw, injected)}."""
    backbone = backbone_for(pipe)
    set_adapter_scales(backbone.denoiser, {"style": scale})
    generator = torch.Generator().manual_seed(0)
    trajectory = torch.randn(STEPS + 1, 16, 8, 6, generator=generator)
    prompts = backbone.encode_prompts(["", "painting of sss"])
    method = DiffStylerMethod(injection.resolved(backbone.layer_map(), STEPS))
    styles = (StyleRows("style", prompts[1:2], prompts[0:1]),)
    layout = RowLayout.for_step([JobRows(trajectory, prompts[0:1], styles, (method,), (torch.randn(1, 16, 8, 6, generator=generator),))],
                                0, False)
    injector = Injector(backbone, [method])
    injector.image_tokens = backbone.image_tokens(8, 6)
    schedule = backbone.schedule(STEPS, injector.image_tokens)
    injector.set_step(0, schedule.timesteps[0], ReferenceMode.BATCH_ROW, layout)
    seen: dict = {}
    record = lambda key, slot: lambda module, args, output: seen.setdefault(key, [None, None]).__setitem__(slot, output)  # noqa: E731
    early = [module.register_forward_hook(record(key, 0)) for key, module in watched.items()]
    with injector.installed():
        late = [module.register_forward_hook(record(key, 1)) for key, module in watched.items()]
        try:
            with torch.no_grad():
                layout.run(backbone, schedule.timesteps[0], guidance=3.5)
        finally:
            for handle in early + late:
                handle.remove()
    return seen


def test_a_single_stream_block_gets_the_references_image_queries_and_keys_and_keeps_its_text_tokens(adapted):
    """In FLUX's single-stream blocks the projections read [text; image]: only the image tokens of
    the style row become the reference's. Caught: text tokens injected, or the image tokens taken
    from the front of the sequence."""
    pipe = adapted["tiny-flux"]
    backbone = backbone_for(pipe)
    block = backbone.blocks[5]  # a single-stream block
    seen = _one_call(pipe, InjectionConfig(features=False, attention_layers=[5], attention_steps=STEPS),
                     {"q": block.attn.to_q, "k": block.attn.to_k, "v": block.attn.to_v})
    image = backbone.image_tokens(8, 6)
    for key in ("q", "k"):
        raw, injected = seen[key]
        assert raw.shape[1] > image  # text tokens lead the sequence
        assert torch.equal(injected[1, -image:], raw[0, -image:])  # the style row's image tokens: the reference's
        assert torch.equal(injected[1, :-image], raw[1, :-image])  # its text tokens: its own
        assert not torch.equal(raw[1, -image:], raw[0, -image:])  # (which differed)
        assert torch.equal(injected[0], raw[0])  # the reference row untouched
    raw_v, injected_v = seen["v"]
    assert torch.equal(raw_v, injected_v)  # V is never injected


def test_a_double_stream_block_injects_the_image_stream_only(adapted):
    """FLUX's double-stream and SD 3.5's joint blocks: the image stream's to_q / to_k are rewritten
    whole, the text stream's add_q_proj / add_k_proj never. Caught: the text stream injected."""
    for name, layer in (("tiny-flux", 1), ("tiny-sd3", 3)):
        pipe = adapted[name]
        attention = backbone_for(pipe).blocks[layer].attn
        seen = _one_call(pipe, InjectionConfig(features=False, attention_layers=[layer], attention_steps=STEPS),
                         {"q": attention.to_q, "add_q": attention.add_q_proj, "add_k": attention.add_k_proj})
        raw, injected = seen["q"]
        assert torch.equal(injected[1], raw[0]) and not torch.equal(raw[1], raw[0]), name
        for key in ("add_q", "add_k"):
            assert torch.equal(seen[key][0], seen[key][1]), (name, key)


def test_sd35_mediums_extra_self_attention_is_injected_where_the_block_has_it(adapted):
    """Caught: attn2 (SD 3.5 Medium's self-attention over image tokens) left out of its blocks."""
    pipe = adapted["tiny-sd3"]
    block = backbone_for(pipe).blocks[3]
    assert block.use_dual_attention
    seen = _one_call(pipe, InjectionConfig(features=False, attention_layers=[3], attention_steps=STEPS),
                     {"q2": block.attn2.to_q, "k2": block.attn2.to_k})
    for key in ("q2", "k2"):
        raw, injected = seen[key]
        assert torch.equal(injected[1], raw[0]) and not torch.equal(raw[1], raw[0])


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_the_residual_site_gives_the_style_row_the_references_change_of_its_image_tokens(adapted, name):
    """out_style = in_style + (out_ref - in_ref) for the image tokens; the text stream is the block's
    own. Caught: the whole output replaced (site "output" semantics), or the text tokens touched."""
    pipe = adapted[name]
    backbone = backbone_for(pipe)
    block = backbone.blocks[4]
    inputs = []
    handle = block.register_forward_pre_hook(lambda module, args, kwargs: inputs.append(kwargs["hidden_states"].clone()), with_kwargs=True)
    try:
        seen = _one_call(pipe, InjectionConfig(self_attention=False, cross_attention=False, feature_layers=[4], feature_steps=STEPS),
                         {"block": block})
    finally:
        handle.remove()
    (text_raw, image_raw), (text_injected, image_injected) = seen["block"]
    (before,) = inputs
    expected = before[1] + (image_raw[0] - before[0])
    assert (image_injected[1] - expected).abs().max().item() < 1e-5
    assert torch.equal(image_injected[0], image_raw[0])
    assert torch.equal(text_injected, text_raw)


# --- the method on the transformers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def setups(pipes) -> dict:
    """Per family: its pipeline with a random style adapter, the schedule, prompts and the inversion
    trajectory of a seeded 64x48 image."""
    made = {}
    for name in ("tiny-flux", "tiny-sd3"):
        pipe = load_pipeline(ModelSpec(name))
        backbone = backbone_for(pipe)
        add_style_adapter(backbone.denoiser, StyleLoRAConfig(rank=4), "style")
        randomize_adapter(backbone.denoiser, "style", seed=3)
        backbone.denoiser.requires_grad_(False)
        pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
        schedule = backbone.schedule(STEPS, backbone.image_tokens(8, 6))
        prompts = backbone.encode_prompts(["", "painting of sss", "ugly"])
        with base_model(backbone.denoiser):
            trajectory = invert(backbone, backbone.encode_images(pixels), prompts[:1], schedule, progress=False, guidance=3.5)
        made[name] = (pipe, schedule, prompts, trajectory)
    return made


def _stylize(setup, injection: InjectionConfig, guidance: float = 3.5, scale: float = 1.0, style_prompt: int = 1, record=None):
    pipe, schedule, prompts, trajectory = setup
    set_adapter_scales(backbone_for(pipe).denoiser, {"style": scale})
    rows = [StyleRows("style", prompts[style_prompt : style_prompt + 1], prompts[2:3])]
    return denoise_with_injection(pipe, trajectory, prompts[:1], rows, schedule, injection,
                                  SamplingConfig(steps=STEPS, guidance_scale=guidance),
                                  callback=None if record is None else record.append)[0]


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_injection_everywhere_with_the_lora_off_reproduces_the_reference(setups, name):
    """Output-site features in every block, attention everywhere, no LoRA, the inversion prompt, no
    guidance rows: every step's style output is the reference row's. Caught: a style row fed another
    row's values, or the reference row not run on trajectory[i]."""
    everywhere = dict(feature_site="output", feature_layers=list(range(6)), attention_layers=list(range(6)),
                      feature_steps=STEPS, attention_steps=STEPS)
    steps = []
    _stylize(setups[name], InjectionConfig(**everywhere), guidance=1.0, scale=0.0, style_prompt=0, record=steps)
    assert len(steps) == STEPS
    for state in steps:
        assert (state.style_outputs[0] - state.reference_output).abs().max().item() < 1e-5


@pytest.fixture(scope="module")
def defaults(setups) -> dict:
    return {name: _stylize(setup, InjectionConfig()) for name, setup in setups.items()}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_every_default_layer_changes_the_result(setups, defaults, name):
    """Non-degeneracy of the defaults on each transformer: removing any one default feature block, or
    any one default attention block, changes the result. Caught: a block whose injection has no
    effect (e.g. a residual written back to a tensor the block does not use, an output-site feature
    later overwritten)."""
    setup = setups[name]
    layers = backbone_for(setup[0]).layer_map()
    for layer in layers.rule("paper"):
        kept = [l for l in layers.rule("paper") if l != layer]
        assert (_stylize(setup, InjectionConfig(feature_layers=kept)) - defaults[name]).abs().max().item() > 1e-5, layer
    for layer in layers.rule("all"):
        kept = [l for l in layers.rule("all") if l != layer]
        assert (_stylize(setup, InjectionConfig(attention_layers=kept)) - defaults[name]).abs().max().item() > 1e-5, layer


# --- flow-matching inversion ---------------------------------------------------------------------------

def test_inversion_follows_a_constant_velocity_exactly_with_every_solver():
    """x at sigma is x0 + sigma v for a constant velocity v, at every kept level and with sub-steps.
    Caught: a trajectory shifted by one level, a kept sub-step, the ODE integrated the wrong way."""
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=torch.float64)
    generator = torch.Generator().manual_seed(1)
    x0, velocity = torch.randn(1, 16, 4, 4, generator=generator), torch.randn(1, 16, 4, 4, generator=generator)
    for solver in ("euler", "midpoint", "fireflow"):
        for substeps in (1, 3):
            schedule = FlowSchedule(sigmas[:-1] * 1000, sigmas, solver)
            (trajectory,) = invert_latents(lambda x, t: velocity.expand_as(x), x0, schedule, substeps, progress=False)
            assert trajectory.shape[0] == 6 and torch.equal(trajectory[-1:], x0)
            for i, sigma in enumerate(sigmas.tolist()):
                assert (trajectory[i] - (x0[0] + sigma * velocity[0])).abs().max().item() < 1e-5, (solver, substeps, i)


def test_the_second_order_steps_are_second_order_and_fireflow_reuses_its_velocity():
    """On dx/dsigma = a x (exact: x0 exp(a sigma)), Euler's error is first order, the midpoint's and
    FireFlow's second order; FireFlow evaluates the model once per move (plus one). Caught: the
    midpoint step evaluated at the start (Euler again), or FireFlow re-evaluating every start."""
    a, x0 = 0.9, torch.ones(1, 1, 1, 1)
    errors, calls = {}, {}
    for solver in ("euler", "midpoint", "fireflow"):
        for moves in (8, 16):
            sigmas = torch.linspace(1, 0, moves + 1, dtype=torch.float64)
            counted = []
            model = lambda x, t: counted.append(1) or a * x  # noqa: E731
            (trajectory,) = invert_latents(model, x0, FlowSchedule(sigmas[:-1] * 1000, sigmas, solver), progress=False)
            errors[solver, moves] = abs(trajectory[0].item() - math.exp(a))
            calls[solver, moves] = len(counted)
    assert errors["euler", 8] / errors["euler", 16] < 2.5  # halving the step halves the error
    assert errors["midpoint", 8] / errors["midpoint", 16] > 3.5  # ... or quarters it
    assert errors["fireflow", 16] < errors["euler", 16] / 5
    assert calls == {("euler", 8): 8, ("euler", 16): 16, ("midpoint", 8): 16, ("midpoint", 16): 32,
                     ("fireflow", 8): 9, ("fireflow", 16): 17}


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_inversion_then_sampling_reconstructs_better_than_fresh_noise(pipes, name):
    """The base model's inversion, sampled back, is far closer to the content than sampling from new
    noise, for every solver. Caught: inversion climbing at the wrong sigmas or guidance."""
    backbone = backbone_for(pipes[name])
    pixels = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z0 = backbone.encode_images(pixels)
        conditioning = backbone.encode_prompts([""])
        model = lambda x, t: backbone.predict(x, t, conditioning, 3.5)  # noqa: E731
        for solver in ("euler", "midpoint", "fireflow"):
            schedule = backbone.schedule(10, backbone.image_tokens(8, 6), solver)
            (trajectory,) = invert_latents(model, z0, schedule, progress=False)
            from_inversion = sample(model, trajectory[:1], schedule)
            from_noise = sample(model, torch.randn(z0.shape, generator=torch.Generator().manual_seed(1)), schedule)
            assert (from_inversion - z0).pow(2).mean() < 0.1 * (from_noise - z0).pow(2).mean(), solver


def test_a_move_of_the_inversion_steps_by_the_sigma_difference():
    """One Euler move from sigma 0.2 to 0.5 is x + 0.3 v(x, 200). Caught: the velocity read at the
    target (DDIM's convention, which flow matching does not need) or a wrong timestep scale."""
    seen = []
    x = torch.ones(1, 1, 1, 1)
    out = flow_inversion_step(lambda y, t: seen.append(float(t)) or torch.full_like(y, 2.0), x, 0.2, 0.5, "euler", {})
    assert seen == [pytest.approx(200.0)] and out.item() == pytest.approx(1.6)
    assert Move(0.2, 0.5, True).keep


# --- training -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny-flux", "tiny-sd3"])
def test_the_training_objective_is_rectified_flows_velocity(pipes, name):
    """x_t = (1 - sigma) x0 + sigma noise and the target noise - x0, with sigma = timestep / 1000
    drawn logit-normally and shifted as the family samples. Caught: the DDPM forward process on a flow
    model, an epsilon target, or sigmas without the shift."""
    backbone = backbone_for(pipes[name])
    generator = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(3, 16, 8, 6, generator=generator), torch.randn(3, 16, 8, 6, generator=generator)
    timesteps = backbone.draw_training_timesteps(3, torch.Generator().manual_seed(7), x0.shape)
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    assert torch.allclose(backbone.noised(x0, noise, timesteps), (1 - sigma) * x0 + sigma * noise)
    assert torch.equal(backbone.training_target(x0, noise, timesteps), noise - x0)
    u = torch.sigmoid(torch.randn(3, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    config = pipes[name].scheduler.config
    if config.use_dynamic_shifting:
        mu = backbone.shift_mu(backbone.image_tokens(8, 6))
        expected = math.e ** mu / (math.e ** mu + (1 / u - 1))
    else:
        expected = config.shift * u / (1 + (config.shift - 1) * u)
    assert torch.allclose(timesteps.double(), expected * 1000, atol=1e-3)


# --- windows that follow the schedule -------------------------------------------------------------------

@pytest.mark.parametrize("steps, windows", [(50, (30, 25)), (20, (12, 10)), (28, (17, 14)), (4, (2, 2)), (1, (1, 1))])
def test_the_papers_windows_are_fractions_of_the_steps(steps, windows):
    """The paper's 30 and 25 of 50 on any schedule. Caught: absolute windows (FLUX.1-schnell's 4 steps
    refused), or rounding down to no injection at all on a few steps."""
    from diffstyler.backbones.unet import decoder_layers

    layers = decoder_layers(load_pipeline(ModelSpec("tiny")).unet) if steps == 50 else transformer_layer_map(["b"] * 6)
    resolved = InjectionConfig().resolved(layers, steps)
    assert (resolved.feature_steps, resolved.attention_steps) == windows


def test_an_absolute_window_longer_than_the_sampling_is_refused():
    from diffstyler.injection import check_injection_window

    with pytest.raises(ValueError, match=r"feature_steps.*must be in 0..20 .*got 30"):
        check_injection_window(InjectionConfig(feature_steps=30), 20)
    check_injection_window(InjectionConfig(feature_steps=0.6, attention_steps=1.0), 20)
    with pytest.raises(ValueError, match=r"attention_steps.*fraction of the sampling steps must be in 0..1, got 1.5"):
        InjectionConfig(attention_steps=1.5)


def test_attention_in_blocks_whose_features_are_injected_to_the_end_is_named_ineffective(setups):
    """The warning's rule for transformers, checked against the model: attention layers 4 and 5 of
    tiny-flux (features injected in 4 and 5, the last blocks) are named, and removing them changes no
    bit. Caught: a rule that misses them (the old default injected attention there for nothing), or
    names a layer that acts (3)."""
    from diffstyler.injection import describe_ineffective_sites, ineffective_sites

    setup = setups["tiny-flux"]
    layers = backbone_for(setup[0]).layer_map()
    full = InjectionConfig(attention_layers=[3, 4, 5])
    assert ineffective_sites(full, layers, STEPS) == {"attention": [4, 5]}
    assert "attention layers [4, 5]" in describe_ineffective_sites(full, layers, STEPS)
    assert ineffective_sites(InjectionConfig(), layers, STEPS) == {}
    assert torch.equal(_stylize(setup, full), _stylize(setup, InjectionConfig(attention_layers=[3])))
