"""LoRA export/reload in diffusers format, alpha metadata, and per-row adapter routing."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from diffstyler.lora import (
    BASE_ROW,
    LORA_WEIGHTS_NAME,
    StyleLoRAConfig,
    add_style_adapter,
    load_style_adapter,
    route_adapters,
    save_lora,
)


def randomize(parameters: list[torch.nn.Parameter], seed: int) -> None:
    """Stand-in for training: a fresh adapter has lora_B = 0, i.e. no effect at all."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)


@pytest.mark.slow
def test_exported_lora_reloads_into_a_fresh_pipeline_with_the_same_output(tiny_pipe, unet_probe, tmp_path):
    trained = tiny_pipe()
    parameters = add_style_adapter(trained.unet, StyleLoRAConfig(rank=4, alpha=8), name="style")
    randomize(parameters, seed=0)
    save_lora(trained.unet, "style", tmp_path)

    fresh = tiny_pipe()
    base_output = unet_probe(fresh.unet)
    fresh.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS_NAME, adapter_name="style")

    expected = unet_probe(trained.unet)
    assert (expected - base_output).abs().max() > 1e-2  # the LoRA does change the output
    assert (unet_probe(fresh.unet) - expected).abs().max() < 1e-5


@pytest.mark.slow
def test_alpha_survives_export(tiny_pipe, unet_probe, tmp_path):
    trained = tiny_pipe()
    randomize(add_style_adapter(trained.unet, StyleLoRAConfig(rank=4, alpha=8), name="style"), seed=1)
    save_lora(trained.unet, "style", tmp_path)
    assert all(value.dtype == torch.float32 for value in load_file(tmp_path / LORA_WEIGHTS_NAME).values())

    fresh = tiny_pipe()
    load_style_adapter(fresh, tmp_path, name="reloaded")
    config = fresh.unet.peft_config["reloaded"]
    assert (config.r, config.lora_alpha) == (4, 8)
    assert (unet_probe(fresh.unet) - unet_probe(trained.unet)).abs().max() < 1e-5


@pytest.mark.slow
def test_routed_batch_equals_separate_forwards(tiny_pipe):
    unet = tiny_pipe().unet
    randomize(add_style_adapter(unet, StyleLoRAConfig(rank=4), name="a"), seed=2)
    randomize(add_style_adapter(unet, StyleLoRAConfig(rank=8, alpha=4), name="b"), seed=3)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator).repeat(3, 1, 1, 1)
    text = torch.randn(1, 77, 32, generator=generator).repeat(3, 1, 1)
    timesteps = torch.tensor([500, 500, 500])

    def run_alone(adapter: str) -> torch.Tensor:
        if adapter == BASE_ROW:
            unet.disable_adapters()
        else:
            unet.set_adapters([adapter])
        output = unet(latents[:1], timesteps[:1], encoder_hidden_states=text[:1]).sample
        unet.enable_adapters()
        return output[0]

    with torch.no_grad():
        separate = [run_alone(adapter) for adapter in (BASE_ROW, "a", "b")]
        unet.set_adapters(["a", "b"])
        with route_adapters(unet, [BASE_ROW, "a", "b"]):
            mixed = unet(latents, timesteps, encoder_hidden_states=text).sample
        after_routing = unet(latents[:1], timesteps[:1], encoder_hidden_states=text[:1]).sample

    assert (separate[0] - separate[1]).abs().max() > 1e-3 and (separate[1] - separate[2]).abs().max() > 1e-3
    for row, expected in enumerate(separate):
        assert (mixed[row] - expected).abs().max() < 1e-5, f"row {row}"
    # The routing hooks are gone after the block: a plain call works on any batch size again.
    assert after_routing.shape == (1, 4, 8, 8)


def test_a_kohya_format_community_lora_loads_as_a_named_adapter(tmp_path, tiny_pipe, unet_probe):
    """Community LoRAs (kohya/A1111 key names, per-module alpha) go through diffusers' converters."""
    from safetensors.torch import save_file

    from diffstyler.lora import load_style_adapter, set_adapter_scales

    rank, alpha = 4, 2.0
    generator = torch.Generator().manual_seed(7)
    reference = tiny_pipe()
    tensors = {}
    with torch.no_grad():
        for name, module in reference.unet.named_modules():
            if name.endswith(("attn1.to_q", "attn2.to_v")):
                down = torch.randn(rank, module.in_features, generator=generator) * 0.1
                up = torch.randn(module.out_features, rank, generator=generator) * 0.1
                key = "lora_unet_" + name.replace(".", "_")
                tensors.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up,
                                f"{key}.alpha": torch.tensor(alpha)})
                module.weight += (alpha / rank) * up @ down  # what the LoRA means, merged by hand
    file = tmp_path / "community_style.safetensors"
    save_file(tensors, str(file))

    pipe = tiny_pipe()
    load_style_adapter(pipe, file, "community")
    set_adapter_scales(pipe.unet, {"community": 1.0})
    assert (unet_probe(pipe.unet) - unet_probe(reference.unet)).abs().max().item() < 1e-5


def write_lora_for_width(path, width: int) -> None:
    """A diffusers-format LoRA whose cross-attention to_k reads `width`-wide text embeddings."""
    from safetensors.torch import save_file

    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{key}.lora.down.weight": torch.zeros(4, width), f"{key}.lora.up.weight": torch.zeros(32, 4)}, str(path))


def test_a_lora_for_another_model_family_says_which_it_seems_made_for(tmp_path, tiny_pipe):
    import pytest

    from diffstyler.errors import UserError

    file = tmp_path / "sdxl_style.safetensors"
    write_lora_for_width(file, 2048)
    with pytest.raises(UserError, match=r"sdxl_style\.safetensors.*seems made for SDXL \(cross-attention width 2048\), not for this model \(width 32\)"):
        load_style_adapter(tiny_pipe(), file, "sdxl")


def test_model_families_by_cross_attention_width(tmp_path):
    from diffstyler.backbones.unet import family_for_width
    from diffstyler.lora import lora_cross_attention_width

    assert [family_for_width(width) for width in (768, 1024, 2048, 32)] == ["SD 1.x", "SD 2.x", "SDXL", None]
    write_lora_for_width(tmp_path / "sd2.safetensors", 1024)
    assert lora_cross_attention_width(tmp_path / "sd2.safetensors") == 1024


def test_a_safetensors_file_without_lora_weights_is_refused_by_name(tmp_path):
    import pytest
    from safetensors.torch import save_file

    from diffstyler.errors import UserError
    from diffstyler.lora import resolve_lora_file

    file = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(2, 2)}, str(file))
    with pytest.raises(UserError, match=r"not a LoRA \(.*model\.safetensors\)"):
        resolve_lora_file(file)


@pytest.mark.slow
def test_routing_sees_lora_layers_of_adapters_added_after_its_first_use():
    """`lora_layers` is found once per adapter set: an adapter on other modules, added later, must be
    routed too (a stale list would leave its new layers running the active adapters on base rows)."""
    from diffstyler.lora import BASE_ROW, route_adapters, set_adapter_scales
    from tests.helpers import randomize_adapter, tiny_pipe_with_adapter

    pipe = tiny_pipe_with_adapter("a", seed=1)
    unet = pipe.unet
    generator = torch.Generator().manual_seed(0)
    latents, text = torch.randn(1, 4, 8, 8, generator=generator), torch.randn(1, 77, 32, generator=generator)

    def forward():
        with torch.no_grad():
            return unet(latents, 500, encoder_hidden_states=text).sample

    with route_adapters(unet, ["a"]):
        forward()  # the layer list is now known for {"a"}
    add_style_adapter(unet, StyleLoRAConfig(rank=4, target_modules=["to_out.0"]), "b")
    randomize_adapter(unet, "b", seed=2)
    unet.requires_grad_(False)
    set_adapter_scales(unet, {"a": 1.0, "b": 1.0})
    with route_adapters(unet, [BASE_ROW]):
        routed = forward()
    unet.disable_adapters()
    base = forward()
    unet.enable_adapters()
    assert (routed - base).abs().max().item() < 1e-6


# Every kind of UNet layer a config's `target_modules` can name (PEFT adapts Linear and Conv2d
# layers): the attention projections, the transformers' feed-forward and in/out projections, the
# resnets' convolutions and time projections, the down/upsamplers' convolutions, and all at once.
TARGET_KINDS = {
    "attention": ["to_q", "to_k", "to_v", "to_out.0"],
    "feed-forward": ["ff.net.0.proj", "ff.net.2"],
    "transformer projections": ["proj_in", "proj_out"],
    "resnet convolutions": ["conv1", "conv2", "conv_shortcut"],
    "resnet time projections": ["time_emb_proj"],
    "down/upsamplers": ["downsamplers.0.conv", "upsamplers.0.conv"],
    "all at once": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2",
                    "conv_shortcut", "time_emb_proj", "downsamplers.0.conv", "upsamplers.0.conv"],
}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(TARGET_KINDS))
def test_save_lora_writes_one_key_spelling_for_any_target_and_diffusers_loads_the_same_weights(kind, tiny_pipe, tmp_path):
    """diffusers' `convert_state_dict_to_diffusers` renames PEFT's lora_A / lora_B to lora.down /
    lora.up for the attention projections only. Caught: mixed spellings in one file (the
    feed-forward and convolution layers kept as lora_A / lora_B), or a spelling diffusers' loader
    puts into other layers or other tensors than ours."""
    trained = tiny_pipe()
    randomize(add_style_adapter(trained.unet, StyleLoRAConfig(rank=4, alpha=8, target_modules=TARGET_KINDS[kind]), "style"), seed=3)
    file = save_lora(trained.unet, "style", tmp_path)
    keys = list(load_file(file))
    assert keys and all(key.startswith("unet.") and key.endswith((".lora.down.weight", ".lora.up.weight")) for key in keys), keys[:4]

    fresh = tiny_pipe()
    fresh.load_lora_weights(str(tmp_path), weight_name=LORA_WEIGHTS_NAME, adapter_name="loaded")
    ours = {name.replace(".style.", "."): value for name, value in trained.unet.named_parameters() if ".style." in name}
    loaded = {name.replace(".loaded.", "."): value for name, value in fresh.unet.named_parameters() if ".loaded." in name}
    assert sorted(loaded) == sorted(ours)
    assert all(torch.equal(loaded[name], ours[name]) for name in ours)
    assert fresh.unet.peft_config["loaded"].lora_alpha == 8
