"""SD 3.5 and FLUX.1 LoRAs in the original models' layouts (`diffstyler.export_mmdit`): read back by
the readers that exist here, and compared with our diffusers file through the transformer's outputs.

- FLUX.1: `FluxPipeline.load_lora_weights` reads both layouts (diffusers' kohya / ComfyUI FLUX
  converter). Its reader splits `single_blocks.N.linear1` at FLUX.1's own widths (3072, 12288), so
  the tiny models' single-block Q/K/V go through it at FLUX.1's width, as state dicts.
- SD 3.5: diffusers 0.42 has no reader of SD 3.5 LoRAs in the original names. The file is merged
  into the original model's weights the way ComfyUI merges a LoRA (its key names, alpha / rank),
  and diffusers' own single-file converter (`convert_sd3_transformer_checkpoint_to_diffusers`)
  turns the merged weights back into a diffusers transformer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import FluxPipeline, SD3Transformer2DModel
from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from diffstyler.backbones.mmdit import build_flux, build_sd3
from diffstyler.errors import UserError
from diffstyler.export import export_lora, exported_lora_hash
from diffstyler.export_mmdit import FLUX, SD35, ModuleLoRA, fuse
from diffstyler.lora import LORA_WEIGHTS_NAME, StyleLoRAConfig, add_style_adapter, save_lora, write_lora_info
from diffstyler.outputs import a1111_lora_hash
from tests.helpers import randomize_adapter

LAYOUTS = ("kohya", "comfyui")
RANK, ALPHA = 4, 8.0  # alpha != rank: a file read without its alpha scales the update by 1, not 2

# Every layer kind the export names, per family (FLUX.1's single-block linear1 parts apart).
FLUX_DOUBLE_KINDS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
                     "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
SD35_KINDS = FLUX_DOUBLE_KINDS + ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def trained(pipe, targets=None, seed: int = 3):
    """The pipeline with a random adapter "style" (alpha != rank) on `targets` (default: the family's Q/K/V)."""
    add_style_adapter(pipe.transformer, StyleLoRAConfig(rank=RANK, alpha=ALPHA, target_modules=targets), "style")
    randomize_adapter(pipe.transformer, "style", seed=seed, std=0.05)
    pipe.transformer.requires_grad_(False)
    return pipe


def modules_of(transformer, kinds: list[str], blocks: str = "transformer_blocks") -> list[str]:
    """The full names of the layers of these kinds in the blocks (explicit names: PEFT matches suffixes)."""
    return [name for name, _ in transformer.named_modules() if name.startswith(f"{blocks}.")
            and any(name == f"{blocks}.{name.split('.')[1]}.{kind}" for kind in kinds)]


def save_ours(pipe, folder: Path, family: str) -> Path:
    """Our diffusers file and the info `diffstyler fit` writes next to it (the family of the tiny model)."""
    save_lora(pipe.transformer, "style", folder)
    write_lora_info(folder, {"prompt": "painting", "model_card": {"base_model": family}})
    return folder


@torch.no_grad()
def flux_probe(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    guided = transformer.config.guidance_embeds
    return transformer(hidden_states=torch.randn(2, 16, 64, generator=generator), timestep=torch.tensor([0.2, 0.9]),
                       guidance=torch.tensor([3.5, 3.5]) if guided else None, pooled_projections=torch.randn(2, 32, generator=generator),
                       encoder_hidden_states=torch.randn(2, 5, 32, generator=generator), txt_ids=torch.zeros(5, 3),
                       img_ids=torch.randn(16, 3, generator=generator), return_dict=False)[0]


@torch.no_grad()
def sd3_probe(transformer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return transformer(hidden_states=torch.randn(2, 16, 8, 8, generator=generator), timestep=torch.tensor([200.0, 900.0]),
                       encoder_hidden_states=torch.randn(2, 5, 64, generator=generator),
                       pooled_projections=torch.randn(2, 64, generator=generator), return_dict=False)[0]


def lora_layer_count(transformer) -> int:
    return sum(1 for name, _ in transformer.named_parameters() if ".lora_A." in name)


# --- FLUX.1 ---------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("guidance", [True, False], ids=["tiny-flux", "tiny-flux-schnell"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_flux_layouts_load_in_fluxpipeline_with_the_outputs_of_our_file(guidance, layout, tmp_path):
    """Every double-block layer kind and the single blocks' linear2, through diffusers' own FLUX
    reader. Mistakes caught: q/k/v rows of img_attn.qkv in another order, txt_attn taken for
    img_attn, block numbers shifted, the fused alpha left at the parts' alpha (the update then
    scaled by alpha / 3r), up and down swapped."""
    pipe = build_flux(0, guidance=guidance)
    trained(pipe, modules_of(pipe.transformer, FLUX_DOUBLE_KINDS) + modules_of(pipe.transformer, ["proj_out"], "single_transformer_blocks"))
    folder = save_ours(pipe, tmp_path / "lora", FLUX)
    exported = export_lora(folder, layout, tmp_path / "out.safetensors")

    ours, theirs = build_flux(0, guidance=guidance), build_flux(0, guidance=guidance)
    base = flux_probe(ours.transformer)
    ours.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_NAME, adapter_name="style")
    theirs.load_lora_weights(str(exported.parent), weight_name=exported.name, adapter_name="style")
    expected = flux_probe(ours.transformer)
    assert (expected - base).abs().max() > 1e-3  # the LoRA changes the output
    assert lora_layer_count(theirs.transformer) == lora_layer_count(ours.transformer) == 2 * 12 + 4
    assert (flux_probe(theirs.transformer) - expected).abs().max() < 1e-5


def flux_width_lora(folder: Path) -> dict[str, torch.Tensor]:
    """Our file for one single-stream block at FLUX.1's real width (3072), written without the model:
    LoRAs on to_q, to_v and proj_mlp (not to_k: its rows of linear1 stay zero)."""
    generator = torch.Generator().manual_seed(5)
    shapes = {"to_q": 3072, "to_v": 3072}
    layers = {}
    for part, rows in shapes.items():
        layers[f"single_transformer_blocks.0.attn.{part}.lora_A.weight"] = torch.randn(RANK, 3072, generator=generator) * 0.02
        layers[f"single_transformer_blocks.0.attn.{part}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 0.02
    layers["single_transformer_blocks.0.proj_mlp.lora_A.weight"] = torch.randn(RANK, 3072, generator=generator) * 0.02
    layers["single_transformer_blocks.0.proj_mlp.lora_B.weight"] = torch.randn(4 * 3072, RANK, generator=generator) * 0.02
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_v", "proj_mlp"]).to_dict()
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, transformer_lora_adapter_metadata=config, safe_serialization=True)
    return layers


@pytest.mark.parametrize("layout", LAYOUTS)
def test_flux_linear1_is_read_by_diffusers_as_our_q_k_v_and_mlp_at_flux_width(layout, tmp_path):
    """linear1 fuses q, k, v (3072 rows each) and the MLP's input (12288 rows). Mistakes caught: the
    parts in another order, the MLP rows before q, k, v, a missing part's rows left out (the rows
    after it shift), the alpha not scaled with the fused rank."""
    ours = flux_width_lora(tmp_path / "lora")
    exported = export_lora(tmp_path / "lora", layout, tmp_path / "out.safetensors")
    read = FluxPipeline.lora_state_dict(str(tmp_path), weight_name=exported.name)  # kohya's alpha baked into A and B

    def update(state, prefix, inputs):  # the LoRA's update of a module applied to inputs, B (A x)
        return state[f"{prefix}.lora_B.weight"] @ (state[f"{prefix}.lora_A.weight"] @ inputs)

    inputs = torch.randn(3072, 8, generator=torch.Generator().manual_seed(0))
    for module in ("attn.to_q", "attn.to_v", "proj_mlp"):
        prefix = f"single_transformer_blocks.0.{module}"
        expected = ALPHA / RANK * update(ours, prefix, inputs)
        assert (update(read, f"transformer.{prefix}", inputs) - expected).abs().max() < 1e-5 * expected.abs().max()
    assert update(read, "transformer.single_transformer_blocks.0.attn.to_k", inputs).abs().max() == 0


def test_the_default_flux_lora_fuses_each_blocks_projections_into_one_lora(tmp_path):
    """The tiny model's 2 double and 4 single blocks, with the default Q/K/V targets: exact tensors.
    Mistakes caught: a block missing or numbered from 1, the parts' downs in another order, the
    block-diagonal up with the parts' blocks elsewhere, alpha not 3x."""
    pipe = trained(build_flux(0))
    state = load_file(save_ours(pipe, tmp_path / "lora", FLUX) / LORA_WEIGHTS_NAME)
    exported = load_file(export_lora(tmp_path / "lora", "kohya", tmp_path / "out.safetensors"))

    fused = ([f"lora_unet_double_blocks_{i}_{stream}_attn_qkv" for i in range(2) for stream in ("img", "txt")]
             + [f"lora_unet_single_blocks_{i}_linear1" for i in range(4)])
    assert set(exported) == {name + suffix for name in fused for suffix in (".lora_down.weight", ".lora_up.weight", ".alpha")}
    parts = [f"single_transformer_blocks.2.attn.to_{p}" for p in "qkv"]
    down, up = exported["lora_unet_single_blocks_2_linear1.lora_down.weight"], exported["lora_unet_single_blocks_2_linear1.lora_up.weight"]
    assert torch.equal(down, torch.cat([state[f"transformer.{p}.lora_A.weight"] for p in parts]))
    assert up.shape == (3 * 32 + 4 * 32, 3 * RANK)
    for i, part in enumerate(parts):
        block = torch.zeros_like(up)
        block[32 * i:32 * (i + 1), RANK * i:RANK * (i + 1)] = state[f"transformer.{part}.lora_B.weight"]
        up = up - block
    assert up.abs().max() == 0  # nothing outside the parts' blocks: the MLP rows are zero
    assert exported["lora_unet_single_blocks_2_linear1.alpha"].item() == 3 * ALPHA


def test_parts_of_different_ranks_keep_their_own_update_in_the_fused_lora():
    """One alpha for the whole file, ranks 2 and 4 (scales 4 and 2): the fused LoRA has one scale.
    Mistake caught: the parts' ratio of scales not folded into their ups (the rank-2 part's update
    then halves)."""
    generator = torch.Generator().manual_seed(0)
    q = ModuleLoRA(torch.randn(2, 8, generator=generator), torch.randn(8, 2, generator=generator), ALPHA)
    v = ModuleLoRA(torch.randn(4, 8, generator=generator), torch.randn(8, 4, generator=generator), ALPHA)
    fused = fuse({0: q, 2: v}, (1, 1, 1), "qkv")
    update = fused.scale * fused.up @ fused.down
    assert torch.allclose(update[0:8], q.scale * q.up @ q.down, atol=1e-6)
    assert torch.allclose(update[16:24], v.scale * v.up @ v.down, atol=1e-6)
    assert update[8:16].abs().max() == 0


# --- SD 3.5 ---------------------------------------------------------------------------------------

def swap_halves(weight: torch.Tensor) -> torch.Tensor:
    first, second = weight.chunk(2, dim=0)
    return torch.cat([second, first])


def sd3_original_checkpoint(transformer) -> dict[str, torch.Tensor]:
    """The transformer's weights in the original MMDiT names (the inverse of diffusers' single-file
    converter; checked by `test_the_original_checkpoint_converts_back_exactly`)."""
    state, config = transformer.state_dict(), transformer.config
    renames = [("x_embedder.proj", "pos_embed.proj"), ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
               ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"), ("context_embedder", "context_embedder"),
               ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"), ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
               ("final_layer.linear", "proj_out")]
    fused = []
    for i in range(config.num_layers):
        o, d = f"joint_blocks.{i}", f"transformer_blocks.{i}"
        fused += [(f"{o}.x_block.attn.qkv", [f"{d}.attn.to_{p}" for p in "qkv"]),
                  (f"{o}.context_block.attn.qkv", [f"{d}.attn.add_{p}_proj" for p in "qkv"]),
                  (f"{o}.x_block.attn2.qkv", [f"{d}.attn2.to_{p}" for p in "qkv"])]
        renames += [(f"{o}.x_block.attn.ln_q", f"{d}.attn.norm_q"), (f"{o}.x_block.attn.ln_k", f"{d}.attn.norm_k"),
                    (f"{o}.context_block.attn.ln_q", f"{d}.attn.norm_added_q"), (f"{o}.context_block.attn.ln_k", f"{d}.attn.norm_added_k"),
                    (f"{o}.x_block.attn.proj", f"{d}.attn.to_out.0"), (f"{o}.context_block.attn.proj", f"{d}.attn.to_add_out"),
                    (f"{o}.x_block.attn2.ln_q", f"{d}.attn2.norm_q"), (f"{o}.x_block.attn2.ln_k", f"{d}.attn2.norm_k"),
                    (f"{o}.x_block.attn2.proj", f"{d}.attn2.to_out.0"), (f"{o}.x_block.adaLN_modulation.1", f"{d}.norm1.linear"),
                    (f"{o}.x_block.mlp.fc1", f"{d}.ff.net.0.proj"), (f"{o}.x_block.mlp.fc2", f"{d}.ff.net.2"),
                    (f"{o}.context_block.mlp.fc1", f"{d}.ff_context.net.0.proj"), (f"{o}.context_block.mlp.fc2", f"{d}.ff_context.net.2")]
        if i < config.num_layers - 1:
            renames.append((f"{o}.context_block.adaLN_modulation.1", f"{d}.norm1_context.linear"))
    last = config.num_layers - 1
    swapped = [(f"joint_blocks.{last}.context_block.adaLN_modulation.1", f"transformer_blocks.{last}.norm1_context.linear"),
               ("final_layer.adaLN_modulation.1", "norm_out.linear")]
    original = {"pos_embed": state["pos_embed.pos_embed"]}
    for end in ("weight", "bias"):
        for ours, theirs in renames:
            if f"{theirs}.{end}" in state:
                original[f"{ours}.{end}"] = state[f"{theirs}.{end}"]
        for ours, theirs in swapped:
            original[f"{ours}.{end}"] = swap_halves(state[f"{theirs}.{end}"])
        for ours, parts in fused:
            if f"{parts[0]}.{end}" in state:
                original[f"{ours}.{end}"] = torch.cat([state[f"{part}.{end}"] for part in parts])
    return original


def merged_as_comfyui_merges(original: dict[str, torch.Tensor], lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original weights with a LoRA file merged as ComfyUI merges one (comfy/lora.py: a weight
    `diffusion_model.<key>` is found as `lora_unet_<key, "." -> "_">` or as `diffusion_model.<key>`;
    the update is alpha / rank(down) * up @ down). Every key of the file must be used."""
    merged, used = dict(original), set()
    for key in original:
        if not key.endswith(".weight"):
            continue
        module = key.removesuffix(".weight")
        for name in ("lora_unet_" + module.replace(".", "_"), "diffusion_model." + module):
            if name + ".lora_up.weight" in lora:
                up, down = lora[name + ".lora_up.weight"], lora[name + ".lora_down.weight"]
                alpha = lora.get(name + ".alpha")
                merged[key] = merged[key] + (float(alpha) / down.shape[0] if alpha is not None else 1.0) * (up @ down)
                used |= {name + ".lora_up.weight", name + ".lora_down.weight", name + ".alpha"}
    assert used == set(lora), f"keys ComfyUI would not load: {sorted(set(lora) - used)[:3]}"
    return merged


def from_original(original: dict[str, torch.Tensor], config) -> SD3Transformer2DModel:
    transformer = SD3Transformer2DModel.from_config(config)
    transformer.load_state_dict(convert_sd3_transformer_checkpoint_to_diffusers(dict(original)), strict=True)
    return transformer


def test_the_original_checkpoint_converts_back_exactly():
    """The test's own inverse is right: diffusers' converter gives back every tensor of the model."""
    transformer = build_sd3(0).transformer
    converted = convert_sd3_transformer_checkpoint_to_diffusers(sd3_original_checkpoint(transformer))
    state = transformer.state_dict()
    assert converted.keys() == state.keys()
    assert all(torch.equal(converted[key], state[key]) for key in state)


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sd35_layouts_merged_as_comfyui_merges_them_give_the_outputs_of_our_file(layout, tmp_path):
    """Every layer kind of the tiny SD 3.5 (joint attention, context stream, Medium's attn2 in
    blocks 0-3, output projections, feed-forwards) in all 6 blocks. Mistakes caught: x_block and
    context_block swapped, attn2 named attn, q/k/v rows in another order, block numbers shifted,
    the fused alpha left at the parts' alpha, up and down swapped."""
    pipe = build_sd3(0)
    trained(pipe, modules_of(pipe.transformer, SD35_KINDS))
    folder = save_ours(pipe, tmp_path / "lora", SD35)
    exported = export_lora(folder, layout, tmp_path / "out.safetensors")

    ours = build_sd3(0)
    base = sd3_probe(ours.transformer)
    ours.load_lora_weights(str(folder), weight_name=LORA_WEIGHTS_NAME, adapter_name="style")
    expected = sd3_probe(ours.transformer)
    assert (expected - base).abs().max() > 1e-3
    fresh = build_sd3(0).transformer
    theirs = from_original(merged_as_comfyui_merges(sd3_original_checkpoint(fresh), load_file(exported)), fresh.config)
    assert (sd3_probe(theirs) - expected).abs().max() < 1e-5


def test_sd35_default_lora_names_the_original_modules(tmp_path):
    """Mistake caught: Medium's second attention exported under the first's name (both LoRAs would
    then land on x_block.attn.qkv)."""
    exported = load_file(export_lora(save_ours(trained(build_sd3(0)), tmp_path / "lora", SD35), "kohya", tmp_path / "out.safetensors"))
    modules = {key.split(".")[0] for key in exported}
    expected = ({f"lora_unet_joint_blocks_{i}_{part}_attn_qkv" for i in range(6) for part in ("x_block", "context_block")}
                | {f"lora_unet_joint_blocks_{i}_x_block_attn2_qkv" for i in range(4)})
    assert modules == expected


# --- metadata, hashes, refusals ----------------------------------------------------------------------

def test_metadata_names_the_network_module_and_the_fused_rank(tmp_path):
    """Mistakes caught: sd-scripts' SD 1.x network module for a FLUX.1 file, the parts' rank as
    ss_network_dim (the file's modules have 3x), a base model version guessed for a tiny model."""
    exported = export_lora(save_ours(trained(build_flux(0)), tmp_path / "lora", FLUX), "kohya", tmp_path / "ink.safetensors")
    with safe_open(str(exported), framework="pt") as file:
        metadata = file.metadata()
    assert metadata["ss_network_module"] == "networks.lora_flux" and metadata["ss_output_name"] == "ink"
    assert metadata["ss_network_dim"] == str(3 * RANK) and metadata["ss_network_alpha"] == str(3 * ALPHA)
    assert "ss_base_model_version" not in metadata and "ss_v2" not in metadata
    assert a1111_lora_hash(exported) == exported_lora_hash(tmp_path / "lora") == metadata["sshs_model_hash"][:12]


def test_a_flux_width_lora_is_recorded_as_flux1(tmp_path):
    flux_width_lora(tmp_path / "lora")  # no info file: the family is told by the single-stream blocks
    with safe_open(str(export_lora(tmp_path / "lora", "kohya", tmp_path / "out.safetensors")), framework="pt") as file:
        assert file.metadata()["ss_base_model_version"] == "flux1"


def refusal(lora: Path, layout: str, tmp_path: Path) -> str:
    with pytest.raises(UserError) as error:
        export_lora(lora, layout, tmp_path / "refused.safetensors")
    assert not (tmp_path / "refused.safetensors").exists()
    message = str(error.value)
    assert "\n" not in message
    return message


def write_peft_file(folder: Path, modules: list[str], width: int = 32) -> Path:
    layers = {}
    for module in modules:
        layers[f"{module}.lora_A.weight"] = torch.ones(RANK, width)
        layers[f"{module}.lora_B.weight"] = torch.ones(width, RANK)
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=layers, safe_serialization=True)
    return folder


def test_loras_that_no_original_layout_names_are_refused_in_one_line(tmp_path, repo_root):
    """A UNet LoRA in ComfyUI's transformer layout; a transformer LoRA of another model (a layer
    FLUX.1 does not have); a LoRA whose layers belong to both families; a FLUX.1 / SD 3.5 LoRA
    whose layers exist in both and that nothing else tells apart."""
    unet_lora = repo_root / "tests" / "reference" / "smoke" / "lora"
    assert "--format kohya" in refusal(unet_lora, "comfyui", tmp_path)

    other = write_peft_file(tmp_path / "other", ["single_transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.img_mlp.net.0.proj"])
    assert "'single_transformer_blocks.0.img_mlp.net.0.proj' has no counterpart in FLUX.1" in refusal(other, "kohya", tmp_path)

    both = write_peft_file(tmp_path / "both", ["single_transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn2.to_q"])
    assert "both FLUX.1's single-stream blocks and SD 3.5's attn2" in refusal(both, "kohya", tmp_path)

    unknown = write_peft_file(tmp_path / "unknown", ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"])
    assert f"cannot tell whether it is for {FLUX} or {SD35}" in refusal(unknown, "comfyui", tmp_path)
    (unknown / "diffstyler_lora.json").write_text(json.dumps({"model_card": {"base_model": SD35}}))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.alpha" in load_file(export_lora(unknown, "kohya", tmp_path / "sd3.safetensors"))


def test_a_transformer_lora_with_text_encoder_layers_is_refused(tmp_path):
    folder = write_peft_file(tmp_path / "lora", ["single_transformer_blocks.0.attn.to_q"])
    state = load_file(folder / LORA_WEIGHTS_NAME)
    save_file({**state, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)},
              str(folder / LORA_WEIGHTS_NAME))
    assert "text-encoder layer" in refusal(folder, "kohya", tmp_path)
