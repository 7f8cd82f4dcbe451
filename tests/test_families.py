"""Model families (SD 1.x, SD 2.x, SDXL) read from the loaded components, the decoder layer map derived
from the UNet, and the tiny model of each family."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from diffstyler.backbones import backbone_for
from diffstyler.backbones.unet import SD1, SDXL, decoder_layers
from diffstyler.injection import INJECTION_PRESETS, InjectionConfig, ineffective_sites
from diffstyler.models import ModelSpec, build_tiny_pipeline, load_pipeline


@pytest.fixture(scope="module")
def tiny_pipes() -> dict:
    return {name: build_tiny_pipeline(name=name) for name in ("tiny", "tiny-sd15", "tiny-sdxl")}


# --- the decoder layer map --------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["tiny", "tiny-sd15"])
def test_the_derived_map_gives_the_papers_numbers_on_sd_1_and_2(tiny_pipes, name):
    """The numbers the code had hard-coded for SD 2.x (12 layers, `up_blocks[i // 3].resnets[i % 3]`,
    attention from layer 3, features 4-11, PnP's layer 4). Caught: a rule off by one block or one
    resnet (e.g. anchored at 1/8 of the latent's side, or at the first resnet of the 1/4 level)."""
    unet = tiny_pipes[name].unet
    decoder = decoder_layers(unet)
    assert len(decoder) == 12
    for layer in range(12):
        assert decoder.resnet(unet, layer) is unet.up_blocks[layer // 3].resnets[layer % 3]
    assert decoder.attention_layers == list(range(3, 12))
    assert decoder.pnp_layer == 4
    assert decoder.rule("paper") == list(range(4, 12)) and decoder.rule("all") == list(range(3, 12))
    assert decoder.rule("pnp") == [4] and decoder.rule("from_pnp") == list(range(4, 12))
    resolved = InjectionConfig().resolved(decoder)
    assert resolved.feature_layers == list(range(4, 12)) and resolved.attention_layers == list(range(3, 12))
    paper_code = INJECTION_PRESETS["paper_code"].resolved(decoder)
    assert paper_code.feature_layers == [4] and paper_code.attention_layers == list(range(4, 12))


def test_the_derived_map_of_sdxl(tiny_pipes):
    """SDXL: 3 up blocks of 3 resnets, transformers after the first two blocks' resnets (depth 2, then
    1 in tiny-sdxl). The rules' SDXL choice: PnP's layer is up_blocks[0].resnets[1] (the second
    resnet at 1/4 of the latent's side, as on SD), features 1-8, attention 0-5."""
    unet = tiny_pipes["tiny-sdxl"].unet
    decoder = decoder_layers(unet)
    assert len(decoder) == 9 and decoder.attention_layers == list(range(6))
    assert [layer.downscale for layer in decoder.layers] == [4] * 3 + [2] * 3 + [1] * 3
    assert decoder.pnp_layer == 1 and decoder.resnet(unet, 1) is unet.up_blocks[0].resnets[1]
    assert InjectionConfig().resolved(decoder).feature_layers == list(range(1, 9))
    assert INJECTION_PRESETS["paper_code"].resolved(decoder).attention_layers == list(range(1, 6))
    # every transformer block of a layer is injected: depth 2 in the first up block, 1 in the second
    assert decoder.attentions(unet, 2, "self") == [block.attn1 for block in unet.up_blocks[0].attentions[2].transformer_blocks]
    assert len(decoder.attentions(unet, 2, "cross")) == 2 and len(decoder.attentions(unet, 3, "cross")) == 1
    with pytest.raises(ValueError, match="no attention"):
        decoder.attentions(unet, 6, "self")


def test_the_sdxl_map_is_the_order_of_a_real_forward_pass(tiny_pipes):
    """Hooks on every decoder resnet and transformer of tiny-sdxl record a forward pass. Caught: a map
    that assumes SD's layout (attention from layer 3), or the wrong order inside a block."""
    pipe = tiny_pipes["tiny-sdxl"]
    unet = pipe.unet
    seen = []
    handles = []
    for block_index, block in enumerate(unet.up_blocks):
        for resnet_index, resnet in enumerate(block.resnets):
            handles.append(resnet.register_forward_hook(
                lambda *a, place=(block_index, resnet_index): seen.append((place, "feature"))))
        for attention_index, attention in enumerate(getattr(block, "attentions", None) or []):
            handles.append(attention.register_forward_hook(
                lambda *a, place=(block_index, attention_index): seen.append((place, "attention"))))
    added = {"text_embeds": torch.zeros(1, 32), "time_ids": torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0]])}
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 4, 8, 6), 10, encoder_hidden_states=torch.zeros(1, 77, 2048), added_cond_kwargs=added)
    finally:
        for handle in handles:
            handle.remove()
    decoder = decoder_layers(unet)
    expected = [((decoder.layers[layer].block, decoder.layers[layer].resnet), kind) for layer, kind in decoder.execution_order()]
    assert seen == expected
    assert len(seen) == 9 + 6


def test_layers_given_by_hand_are_checked_against_the_loaded_unet(tiny_pipes):
    """Caught: SD 2.x's ranges checked on SDXL (layer 9 accepted, layer 1's attention refused)."""
    decoder = decoder_layers(tiny_pipes["tiny-sdxl"].unet)
    with pytest.raises(ValueError, match=r"decoder layer 9 does not exist \(this UNet's decoder layers: 0-8\)"):
        InjectionConfig(feature_layers=[4, 9]).resolved(decoder)
    with pytest.raises(ValueError, match=r"decoder layer 7 has no attention \(this UNet's layers with attention: 0-5\)"):
        InjectionConfig(attention_layers=[7]).resolved(decoder)
    assert InjectionConfig(feature_layers=[0, 8], attention_layers=[0, 1]).resolved(decoder).attention_layers == [0, 1]
    assert InjectionConfig(feature_layers="pnp").feature_layers == ["pnp"]


def test_dominated_sites_on_sdxl_follow_its_map(tiny_pipes):
    """Output-site features 1-8 erase features 1-7 and every attention layer (all of them run before
    layer 8 on SDXL). Caught: SD's map used for the warning (attention 3-10)."""
    decoder = decoder_layers(tiny_pipes["tiny-sdxl"].unet)
    assert ineffective_sites(InjectionConfig(feature_site="output"), decoder, 50) == {"features": list(range(1, 8)),
                                                                               "attention": list(range(6))}


# --- families and the tiny models -------------------------------------------------------------------

def test_families_are_read_from_the_components(tiny_pipes):
    """Caught: a family taken from the model's name, or SDXL told by width alone."""
    assert backbone_for(tiny_pipes["tiny-sd15"]).family.name == SD1
    assert backbone_for(tiny_pipes["tiny-sdxl"]).family.name == SDXL
    assert backbone_for(tiny_pipes["tiny"]).family.name is None  # SD 2.x's layout, 32-wide text: no known family
    v_model = load_pipeline(ModelSpec("tiny-sd15", prediction_type="v_prediction"))
    assert str(backbone_for(v_model).family) == "SD 1.x, v_prediction"


def test_tiny_sd15_has_sd15s_head_layout(tiny_pipes):
    pipe = tiny_pipes["tiny-sd15"]
    unet = pipe.unet
    assert type(pipe) is StableDiffusionPipeline
    assert unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 768
    assert unet.config.attention_head_dim == 8 and not unet.config.use_linear_projection
    attention = unet.up_blocks[3].attentions[0].transformer_blocks[0].attn1
    assert attention.heads == 8
    assert isinstance(unet.up_blocks[3].attentions[0].proj_in, torch.nn.Conv2d)
    assert len(unet.attn_processors) == 32


def test_tiny_sdxl_has_sdxls_block_layout(tiny_pipes):
    pipe = tiny_pipes["tiny-sdxl"]
    unet = pipe.unet
    assert type(pipe) is StableDiffusionXLPipeline
    assert [type(b).__name__ for b in unet.down_blocks] == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert [type(b).__name__ for b in unet.up_blocks] == ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    assert [len(b.resnets) for b in unet.up_blocks] == [3, 3, 3]
    depths = [len(t.transformer_blocks) for b in unet.up_blocks[:2] for t in b.attentions]
    assert depths == [2, 2, 2, 1, 1, 1]  # transformer depths differ between blocks, as SDXL's 10 and 2
    assert unet.config.addition_embed_type == "text_time"
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert widths == unet.config.cross_attention_dim == 2048
    assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-sd15", "tiny-sdxl"])
def test_tiny_models_are_seeded_and_leave_the_global_rng_alone(name):
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    first, second = build_tiny_pipeline(name=name), build_tiny_pipeline(name=name)
    assert torch.equal(torch.rand(3), expected)
    for component in ("unet", "vae", "text_encoder"):
        for (key, a), b in zip(getattr(first, component).state_dict().items(), getattr(second, component).state_dict().values()):
            assert torch.equal(a, b), f"{component}.{key}"


@pytest.mark.slow
def test_a_saved_sdxl_folder_loads_as_sdxl_with_the_same_outputs(tiny_pipes, tmp_path):
    """Caught: a folder loaded through `StableDiffusionPipeline` (the second text encoder dropped)."""
    tiny_pipes["tiny-sdxl"].save_pretrained(str(tmp_path / "xl"))
    loaded = load_pipeline(ModelSpec(str(tmp_path / "xl")))
    assert type(loaded) is StableDiffusionXLPipeline and backbone_for(loaded).family.name == SDXL
    for component in ("unet", "text_encoder_2"):
        for key, value in getattr(tiny_pipes["tiny-sdxl"], component).state_dict().items():
            assert torch.equal(getattr(loaded, component).state_dict()[key], value), f"{component}.{key}"
