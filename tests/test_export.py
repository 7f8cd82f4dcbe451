"""Our LoRAs in the kohya / A1111 layout: read back by diffusers' own kohya readers (SD and SDXL),
converted back to ours, named as kohya names them, with sd-scripts' metadata and hashes."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffstyler.errors import UserError
from diffstyler.export import (
    diffusers_to_kohya,
    export_lora,
    exported_lora_hash,
    kohya_hashes,
    kohya_to_diffusers,
    lora_modules,
)
from diffstyler.lora import LORA_WEIGHTS_NAME, StyleLoRAConfig, add_style_adapter, save_lora
from diffstyler.outputs import a1111_lora_hash
from tests.helpers import randomize_adapter

REFERENCE_LORA = Path(__file__).resolve().parent / "reference" / "smoke" / "lora"

# Every kind of layer a LoRA can target in these UNets: attention, transformer projections and
# feed-forward, resnet convolutions and time projections, shortcuts, down/up samplers, conv in/out,
# time (and SDXL's added-condition) embeddings.
ALL_LAYER_KINDS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2",
                   "conv1", "conv2", "time_emb_proj", "conv_shortcut", "conv", "conv_in", "conv_out",
                   "linear_1", "linear_2"]


def trained_lora(unet: UNet2DConditionModel, targets: list[str] | None = None, rank: int = 4, alpha: float = 8) -> None:
    """An adapter "style" with random non-zero weights, alpha != rank (scale 2), the UNet frozen."""
    config = StyleLoRAConfig(rank=rank, alpha=alpha, **({"target_modules": targets} if targets else {}))
    add_style_adapter(unet, config, "style")
    randomize_adapter(unet, "style", seed=3, std=0.05)
    unet.requires_grad_(False)


def lora_layer_count(unet: UNet2DConditionModel) -> int:
    return sum(1 for name, _ in unet.named_parameters() if ".lora_A." in name)


# --- SD 1.x / 2.x ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_kohya_file_loaded_by_diffusers_gives_the_outputs_of_our_file(tiny_pipe, unet_probe, tmp_path):
    """Mistake caught: the `.alpha` tensors left out (or alpha taken for rank): diffusers then
    scales the update by 1 instead of alpha / rank = 2 and the outputs differ."""
    trained = tiny_pipe()
    trained_lora(trained.unet, rank=4, alpha=8)
    save_lora(trained.unet, "style", tmp_path / "lora")
    exported = export_lora(tmp_path / "lora", output=tmp_path / "a1111" / "ink.safetensors")

    ours, kohya = tiny_pipe(), tiny_pipe()
    base = unet_probe(ours.unet)
    ours.load_lora_weights(str(tmp_path / "lora"), weight_name=LORA_WEIGHTS_NAME, adapter_name="style")
    kohya.load_lora_weights(str(exported.parent), weight_name=exported.name, adapter_name="style")

    expected = unet_probe(ours.unet)
    assert (expected - base).abs().max() > 1e-2  # the LoRA does change the output
    assert all(key.startswith("lora_unet_") for key in load_file(exported))
    assert (unet_probe(kohya.unet) - expected).abs().max() < 1e-5


@pytest.mark.slow
def test_every_layer_kind_keeps_its_place_in_the_kohya_layout(tiny_pipe, unet_probe, tmp_path):
    """Mistake caught: a name diffusers' kohya reader does not map back (`to_out` for `to_out.0`, a
    resnet's time projection, a sampler): it drops that layer silently and the outputs change."""
    trained = tiny_pipe()
    trained_lora(trained.unet, ALL_LAYER_KINDS)
    save_lora(trained.unet, "style", tmp_path / "lora")
    exported = export_lora(tmp_path / "lora", output=tmp_path / "all.safetensors")

    kohya = tiny_pipe()
    kohya.load_lora_weights(str(tmp_path), weight_name=exported.name, adapter_name="style")
    assert lora_layer_count(kohya.unet) == lora_layer_count(trained.unet) > 250
    assert (unet_probe(kohya.unet) - unet_probe(trained.unet)).abs().max() < 1e-5


@pytest.mark.slow
def test_kohya_back_to_diffusers_gives_the_same_tensors_and_alpha(tiny_pipe, tmp_path):
    """Mistake caught: the reverse mapping splitting names at the wrong underscores (`to_out_0`,
    `transformer_blocks`, `time_emb_proj`) or dropping alpha."""
    trained = tiny_pipe()
    trained_lora(trained.unet, ALL_LAYER_KINDS, rank=4, alpha=8)
    file = save_lora(trained.unet, "style", tmp_path)
    ours = load_file(file)

    kohya = diffusers_to_kohya(ours, alpha=8.0)
    back, alphas = kohya_to_diffusers(kohya, [name for name, _ in trained.unet.named_modules()])

    assert lora_modules(back).keys() == lora_modules(ours).keys()
    for module, (down, up) in lora_modules(ours).items():
        assert torch.equal(lora_modules(back)[module][0], down) and torch.equal(lora_modules(back)[module][1], up)
    assert set(alphas.values()) == {8.0}


def sd15_layout_unet() -> UNet2DConditionModel:
    """SD 1.5's block layout and text width (768) at tiny channel counts."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(32, 32, 64, 64),
        layers_per_block=2, attention_head_dim=8, cross_attention_dim=768, norm_num_groups=8,
    )


def test_sd15_layout_gets_kohyas_sd15_key_names_and_version(tmp_path):
    """Mistake caught: SGM names (input_blocks...) for an SD 1.x LoRA, or a wrong ss_base_model_version
    (A1111 sorts LoRAs by it and by ss_v2)."""
    unet = sd15_layout_unet()
    trained_lora(unet)
    save_lora(unet, "style", tmp_path / "lora")
    exported = export_lora(tmp_path / "lora", output=tmp_path / "sd15.safetensors")

    # SD 1.5's 16 transformer blocks: 2 in each of down blocks 0-2, 1 in the middle, 3 in each of up blocks 1-3
    blocks = ([f"down_blocks_{b}_attentions_{a}" for b in range(3) for a in range(2)] + ["mid_block_attentions_0"]
              + [f"up_blocks_{b}_attentions_{a}" for b in range(1, 4) for a in range(3)])
    expected = {f"lora_unet_{block}_transformer_blocks_0_{attn}_{proj}{part}"
                for block in blocks for attn in ("attn1", "attn2") for proj in ("to_q", "to_k", "to_v")
                for part in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    with safe_open(str(exported), framework="pt") as file:
        assert set(file.keys()) == expected
        assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_v.alpha" in expected  # as in SD 1.5 LoRAs
        metadata = file.metadata()
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"


# --- SDXL -----------------------------------------------------------------------------------------

def sdxl_layout_unet() -> UNet2DConditionModel:
    """SDXL's block layout (NOTES.md, "SDXL") and text width (2048) at tiny channel counts: no
    attention in the first down / last up block, transformer depths differing between blocks."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(16, 32, 64),
        layers_per_block=2, transformer_layers_per_block=(1, 1, 2), attention_head_dim=(2, 4, 8),
        cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=8,
        addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=6 * 8 + 16,
    )


@torch.no_grad()
def sdxl_probe(unet: UNet2DConditionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    text = torch.randn(2, 7, 2048, generator=generator)
    added = {"text_embeds": torch.randn(2, 16, generator=generator), "time_ids": torch.randn(2, 6, generator=generator)}
    return unet(latents, torch.tensor([10, 700]), encoder_hidden_states=text, added_cond_kwargs=added).sample


@pytest.mark.slow
def test_sdxl_lora_gets_sgm_names_that_diffusers_sdxl_loader_reads_back(tmp_path):
    """Mistake caught: SDXL LoRAs named like SD 1.x ones (kohya trains SDXL on SGM's UNet, so A1111
    and ComfyUI expect input_blocks / middle_block / output_blocks), or SGM block numbers off by
    one: diffusers' SDXL loader (`_maybe_map_sgm_blocks_to_diffusers`) then puts layers elsewhere."""
    trained = sdxl_layout_unet()
    trained_lora(trained, ALL_LAYER_KINDS)
    save_lora(trained, "style", tmp_path / "lora")
    exported = export_lora(tmp_path / "lora", output=tmp_path / "xl.safetensors")

    keys = set(load_file(exported))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_1_attn2_to_k.alpha" in keys
    assert "lora_unet_output_blocks_2_2_conv.lora_up.weight" in keys  # up_blocks.0's upsampler
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in keys  # down_blocks.0's downsampler
    with safe_open(str(exported), framework="pt") as file:
        assert file.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"

    loaded = sdxl_layout_unet()
    state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(str(tmp_path), weight_name=exported.name,
                                                                   unet_config=loaded.config)
    StableDiffusionXLPipeline.load_lora_into_unet(state_dict, alphas, unet=loaded, adapter_name="style")
    assert lora_layer_count(loaded) == lora_layer_count(trained) > 250
    expected = sdxl_probe(trained)
    assert (expected - sdxl_probe(sdxl_layout_unet())).abs().max() > 1e-2
    assert (sdxl_probe(loaded) - expected).abs().max() < 1e-5

    back, _ = kohya_to_diffusers(load_file(exported), [n for n, _ in trained.named_modules()], sdxl=True)
    assert lora_modules(back).keys() == lora_modules(load_file(tmp_path / "lora" / LORA_WEIGHTS_NAME)).keys()


# --- metadata and hashes --------------------------------------------------------------------------

def test_metadata_holds_what_the_lora_records_and_no_guesses(tmp_path):
    """Mistake caught: ss_* fields filled with guesses (a base model version for a UNet of no known
    family) or in another spelling than sd-scripts' (`str(value)`)."""
    exported = export_lora(REFERENCE_LORA, output=tmp_path / "stripes.safetensors")
    with safe_open(str(exported), framework="pt") as file:
        metadata = file.metadata()
    info = json.loads((REFERENCE_LORA / "diffstyler_lora.json").read_text())
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "4.0"
    assert metadata["ss_output_name"] == "stripes"
    assert metadata["ss_steps"] == str(info["steps"]) and metadata["ss_seed"] == str(info["seed"])
    assert metadata["ss_resolution"] == "(64, 64)" and metadata["ss_num_train_images"] == "1"
    assert metadata["ss_sd_model_name"] == "tiny"
    assert info["prompt"] in metadata["ss_training_comment"]
    assert "ss_base_model_version" not in metadata and "ss_v2" not in metadata  # tiny: width 32, no family


def test_sshs_model_hash_is_the_hash_a1111_computes_for_the_file(tmp_path):
    """Mistake caught: sshs_model_hash over the whole file (header included) instead of the bytes
    after the header: A1111 shows the recorded hash, tools recomputing it get another."""
    exported = export_lora(REFERENCE_LORA, output=tmp_path / "a.safetensors", name="first")
    data = exported.read_bytes()
    after_header = data[8 + int.from_bytes(data[:8], "little"):]
    with safe_open(str(exported), framework="pt") as file:
        recorded = file.metadata()["sshs_model_hash"]
    assert recorded == hashlib.sha256(after_header).hexdigest() != hashlib.sha256(data).hexdigest()
    assert a1111_lora_hash(exported) == recorded[:12]
    # The name and the other metadata do not change it, so it is known before exporting.
    other = export_lora(REFERENCE_LORA, output=tmp_path / "b.safetensors", name="another name")
    assert a1111_lora_hash(other) == exported_lora_hash(REFERENCE_LORA) == recorded[:12]


def test_legacy_hash_reads_the_64_kib_at_1_mib_of_the_file_with_ss_metadata_only(tmp_path):
    """Mistake caught: the legacy hash taken with all the metadata (or none): the header's length
    moves the bytes at 1 MiB. sd-scripts hashes the file as saved with its ss_* fields only."""
    generator = torch.Generator().manual_seed(0)
    tensors = {"lora_unet_x.lora_down.weight": torch.randn(4, 100_000, generator=generator)}  # 1.6 MB
    ss_only = {"ss_output_name": "x", "ss_network_dim": "4"}
    save_file(tensors, str(tmp_path / "ss_only.safetensors"), ss_only)
    with open(tmp_path / "ss_only.safetensors", "rb") as handle:
        handle.seek(0x100000)
        expected_legacy = hashlib.sha256(handle.read(0x10000)).hexdigest()[:8]

    model_hash, legacy_hash = kohya_hashes(tensors, {**ss_only, "modelspec.title": "x" * 500})
    assert legacy_hash == expected_legacy
    assert len(model_hash) == 64 and model_hash[:12] == a1111_lora_hash(tmp_path / "ss_only.safetensors")


# --- refusals -------------------------------------------------------------------------------------

def test_a_pickled_lora_is_refused_by_name(tmp_path):
    """Mistake caught: torch.load on a user's file (it runs code)."""
    pickled = tmp_path / "style.bin"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(UserError, match=r"\(--lora\): .*not a \.safetensors file") as error:
        export_lora(pickled, output=tmp_path / "out.safetensors")
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "output, message",
    [("out.ckpt", r"\(--output\): .*must end in \.safetensors"),
     ("", r"\(--output\): name the \.safetensors file"),
     ("a_file/out.safetensors", r"\(--output\): cannot write into"),
     ("lora/pytorch_lora_weights.safetensors", r"\(--output\): .*is the LoRA being exported")],
)
def test_an_output_that_cannot_be_written_is_refused_by_name(tmp_path, output, message):
    shutil.copytree(REFERENCE_LORA, tmp_path / "lora")
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(UserError, match=message):
        export_lora(tmp_path / "lora", output=tmp_path / output if output else "")
    assert (tmp_path / "lora" / LORA_WEIGHTS_NAME).read_bytes() == (REFERENCE_LORA / LORA_WEIGHTS_NAME).read_bytes()


def test_unknown_format_and_text_encoder_layers_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"\(--format\): 'comfy'"):
        export_lora(REFERENCE_LORA, format="comfy", output=tmp_path / "out.safetensors")
    with_text_encoder = {**load_file(REFERENCE_LORA / LORA_WEIGHTS_NAME),
                         "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}
    save_file(with_text_encoder, str(tmp_path / "te.safetensors"))
    with pytest.raises(UserError, match=r"\(--lora\): .*text-encoder layer"):
        export_lora(tmp_path / "te.safetensors", output=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_each_kohya_matrix_holds_the_update_a1111_computes_from_it():
    """The update kohya's readers (A1111, ComfyUI, sd-scripts) rebuild: lora_up @ lora_down scaled by
    alpha / rank, the rank being lora_down's first dimension. Layers of other in and out widths,
    so that a swap of up and down cannot pass. Caught (fast): up and down swapped, the wrong
    alpha, a module under another module's name."""
    generator = torch.Generator().manual_seed(0)
    widths = {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (24, 32),
              "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": (128, 32),
              "down_blocks.1.resnets.0.time_emb_proj": (64, 48)}
    ours = {}
    for module, (width_in, width_out) in widths.items():
        ours[f"unet.{module}.lora.down.weight"] = torch.randn(4, width_in, generator=generator)
        ours[f"unet.{module}.lora.up.weight"] = torch.randn(width_out, 4, generator=generator)
    kohya = diffusers_to_kohya(ours, alpha=8.0)
    assert len(kohya) == 3 * len(widths)
    for module in widths:
        name = "lora_unet_" + module.replace(".", "_")
        down, up, alpha = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"], kohya[f"{name}.alpha"]
        rebuilt = up @ down * (float(alpha) / down.shape[0])
        expected = ours[f"unet.{module}.lora.up.weight"] @ ours[f"unet.{module}.lora.down.weight"] * (8.0 / 4)
        assert torch.equal(rebuilt, expected), module


def test_lora_hashes_name_the_kohya_export_beside_our_lora_when_it_holds_its_weights(tmp_path):
    """What `fit --model.export_kohya true` leaves: A1111 loads the kohya file, so `Lora hashes`
    must hold its hash. Caught: the diffusers file's hash with an export beside it, or a stale
    export's (of other weights) taken for this LoRA's."""
    from diffstyler.export import kohya_export_path
    from diffstyler.outputs import a1111_fields

    def write_lora(folder: Path, seed: int) -> Path:
        generator = torch.Generator().manual_seed(seed)
        module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
        folder.mkdir(exist_ok=True)
        save_file({f"{module}.lora.down.weight": torch.randn(4, 32, generator=generator),
                   f"{module}.lora.up.weight": torch.randn(32, 4, generator=generator)}, str(folder / LORA_WEIGHTS_NAME))
        return folder / LORA_WEIGHTS_NAME

    lora = write_lora(tmp_path / "stripes", seed=0)
    assert a1111_fields(None, [("stripes", lora)]) == {"Lora hashes": f"stripes: {a1111_lora_hash(lora)}"}
    kohya = export_lora(lora.parent, "kohya", kohya_export_path(lora.parent))
    assert kohya == tmp_path / "stripes" / "stripes.safetensors"
    assert a1111_fields(None, [("stripes", lora)]) == {"Lora hashes": f"stripes: {a1111_lora_hash(kohya)}"}
    assert a1111_lora_hash(kohya) != a1111_lora_hash(lora)
    export_lora(write_lora(tmp_path / "other", seed=1).parent, "kohya", kohya)  # a stale export: other weights
    assert a1111_fields(None, [("stripes", lora)]) == {"Lora hashes": f"stripes: {a1111_lora_hash(lora)}"}
