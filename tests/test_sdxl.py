"""SDXL end to end on `tiny-sdxl`: its conditioning (both text encoders, the pooled embedding, the
size time ids) on every row, the paper's layer rules on its decoder, batched jobs, LoRAs made here
and by others, and its float16 VAE."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image

from diffstyler import DiffStylerPipeline, InjectionConfig
from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.errors import UserError
from diffstyler.backbones import backbone_for
from diffstyler.backbones.unet import decoder_layers, time_ids_for
from diffstyler.inversion import invert
from diffstyler.lora import load_style_adapter, set_adapter_scales
from diffstyler.models import ModelSpec, decode_latents, encode_images, encode_prompts, load_pipeline
from diffstyler.sampling import ddim_schedule
from diffstyler.stylize import SamplingConfig, StyleRows
from tests.helpers import CONTENT, denoise_with_injection, make_predictor, randomize_adapter, tiny_pipe_with_adapter, write_random_lora

XL = "tiny-sdxl"
STEPS = 6
WINDOWS = dict(feature_steps=4, attention_steps=3)
# float32 sums differ with the batch size (see tests/test_predictor_batches.py); SDXL's 2048-wide
# cross-attention adds a little: 1e-4 of the latents' scale (a job given another job's size is off by > 1e-2)
RELATIVE_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def xl_loras(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("xl_loras")
    return [write_random_lora(folder / name, seed, model=XL).parent for name, seed in (("ink", 1), ("oil", 2))]


@pytest.fixture(scope="module")
def xl_pipe(xl_loras) -> DiffStylerPipeline:
    pipeline = DiffStylerPipeline.from_pretrained(XL, progress=False)
    for lora in xl_loras:
        pipeline.load_style(lora)
    return pipeline


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


# --- conditioning -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_prompts_are_encoded_as_diffusers_sdxl_pipeline_encodes_them(xl_pipe):
    """Caught: the last hidden states instead of the penultimate, one encoder's states only, or the
    pooled embedding of the wrong encoder."""
    pipe = xl_pipe.pipe
    ours = encode_prompts(pipe, ["painting of sss", ""])
    for row, prompt in enumerate(["painting of sss", ""]):
        hidden, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        # one row against a batch of two: float sums may differ in the last bit
        assert (ours.hidden[row : row + 1] - hidden).abs().max() < 1e-5
        assert (ours.pooled[row : row + 1] - pooled).abs().max() < 1e-5
    assert ours.hidden.shape == (2, 77, 2048) and ours.pooled.shape == (2, 32)


def test_time_ids_are_diffusers_own_for_the_size(xl_pipe):
    pipe = xl_pipe.pipe
    expected = pipe._get_add_time_ids((48, 64), (0, 0), (48, 64), torch.float32, text_encoder_projection_dim=32)
    assert torch.equal(time_ids_for(pipe.unet, (48, 64)), expected)
    assert time_ids_for(load_pipeline(ModelSpec("tiny")).unet, (48, 64)) is None


@pytest.mark.slow
def test_the_reference_and_inversion_rows_carry_the_contents_time_ids_and_pooled_embedding(xl_pipe, tmp_path):
    """Every UNet call of a stylization, recorded: the inversion's rows and the reference row get the
    inversion prompt's pooled embedding and the content's size (48 x 64, height first) as a
    hand-written call of the UNet would. Caught: time ids missing from the reference or inversion
    rows, taken from the latent's size, or height and width swapped."""
    pipe = xl_pipe.pipe
    calls = []
    handle = pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs["added_cond_kwargs"])), with_kwargs=True)
    try:
        xl_pipe(CONTENT, styles=["ink"], num_inference_steps=STEPS, injection=InjectionConfig(**WINDOWS), resolution=64,
                inversion_cache=tmp_path / "fresh_cache")
    finally:
        handle.remove()
    _, _, pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    time_ids = pipe._get_add_time_ids((48, 64), (0, 0), (48, 64), torch.float32, text_encoder_projection_dim=32)
    inversion, denoising = calls[:STEPS], calls[STEPS:]
    assert [rows for rows, _ in inversion] == [1] * STEPS
    assert [rows for rows, _ in denoising] == [3] * 4 + [2] * 2  # reference, uncond, cond while a window is open
    for rows, added in inversion + denoising[:4]:
        assert (added["text_embeds"][:1] - pooled).abs().max() < 1e-5  # prompts encoded in a batch: float noise
        assert torch.equal(added["time_ids"], time_ids.expand(rows, -1))
    style_prompt = encode_prompts(pipe, [xl_pipe.styles["ink"].prompt]).pooled
    assert (style_prompt - pooled).abs().max() > 1e-2 and (denoising[0][1]["text_embeds"][2:] - style_prompt).abs().max() < 1e-5


@pytest.mark.slow
def test_batched_sdxl_jobs_equal_jobs_one_by_one(xl_pipe, xl_loras, tmp_path):
    """Three contents (two sizes) in one chunk: inverted together by size, denoised together where of
    one size, against `__call__` per job. Caught: time ids not expanded per row, or the first job's
    size given to every content (its inversion or its rows)."""
    tall, flipped = tmp_path / "tall.png", tmp_path / "flipped.png"
    Image.open(CONTENT).transpose(Image.Transpose.ROTATE_90).save(tall)
    Image.open(CONTENT).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(flipped)
    jobs = StylizeDataModule(content=[str(CONTENT), str(tall), str(flipped)], styles=[StyleEntry(lora=str(xl_loras[0]))],
                             resolution=64).jobs()
    predictor = make_predictor(tmp_path, model=XL)
    final: dict[str, torch.Tensor] = {}
    predictor.step_callback = lambda state: final.__setitem__(state.job, state.latents[0])
    assert [r.status for r in predictor.stylize_jobs(jobs)] == ["done"] * 3
    settings = dict(num_inference_steps=6, injection=predictor.injection, resolution=64, output_type="latent")
    for job in jobs:
        alone = xl_pipe(job.content, styles=["ink"], **settings).images[0]
        assert close(final[job.id], alone) < RELATIVE_TOLERANCE, job.id


# --- the paper's layers on SDXL's decoder -----------------------------------------------------------

@pytest.fixture(scope="module")
def xl_setup():
    pipe = tiny_pipe_with_adapter("style", seed=3, model=XL)
    generator = torch.Generator().manual_seed(0)
    pixels = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    schedule = ddim_schedule(pipe.scheduler, STEPS)
    time_ids = time_ids_for(pipe.unet, (64, 48))
    prompts = encode_prompts(pipe, ["", "painting of sss", "ugly"]).with_time_ids(time_ids)
    pipe.unet.disable_adapters()
    trajectory = invert(backbone_for(pipe), encode_images(pipe, pixels), prompts[:1], schedule, progress=False)
    pipe.unet.enable_adapters()
    set_adapter_scales(pipe.unet, {"style": 1.0})
    return pipe, schedule, prompts, trajectory


def run_xl(setup, injection: InjectionConfig) -> torch.Tensor:
    pipe, schedule, prompts, trajectory = setup
    rows = [StyleRows("style", prompts[1:2], prompts[2:3])]
    return denoise_with_injection(pipe, trajectory, prompts[0:1], rows, schedule, injection,
                                  SamplingConfig(steps=STEPS))[0]


@pytest.fixture(scope="module")
def xl_default(xl_setup):
    return run_xl(xl_setup, InjectionConfig(**WINDOWS))


@pytest.mark.slow
@pytest.mark.parametrize("kind, layer", [("features", layer) for layer in range(1, 9)] + [("attention", layer) for layer in range(6)])
def test_removing_any_default_sdxl_layer_changes_the_result(xl_setup, xl_default, kind, layer):
    """Non-degeneracy of the SDXL defaults (features 1-8, attention 0-5). Caught: a collapsed or idle
    layer (two layers mapped to one module, or a layer whose hooks never fire)."""
    decoder = decoder_layers(xl_setup[0].unet)
    defaults = InjectionConfig().resolved(decoder)
    field = "feature_layers" if kind == "features" else "attention_layers"
    kept = [other for other in getattr(defaults, field) if other != layer]
    reduced = InjectionConfig(**WINDOWS, **{field: kept})
    assert (run_xl(xl_setup, reduced) - xl_default).abs().max().item() > 1e-5


# --- LoRAs --------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_loras_of_another_family_give_the_one_line_family_error(xl_loras, tmp_path):
    """An SDXL LoRA on an SD 2.x-layout model, and an SD 2.x LoRA on SDXL. Caught: a shape error from
    deep inside diffusers instead of the family."""
    with pytest.raises(UserError, match=r"seems made for SDXL \(cross-attention width 2048\), not for this model \(width 32\)") as error:
        load_style_adapter(load_pipeline(ModelSpec("tiny")), xl_loras[0], "xl")
    assert "\n" not in str(error.value)
    sd2 = tmp_path / "sd2_style.safetensors"
    from safetensors.torch import save_file

    key = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    save_file({f"{key}.lora.down.weight": torch.zeros(4, 1024), f"{key}.lora.up.weight": torch.zeros(32, 4)}, str(sd2))
    with pytest.raises(UserError, match=r"seems made for SD 2\.x \(cross-attention width 1024\), not for this model \(SDXL, width 2048\)"):
        load_style_adapter(load_pipeline(ModelSpec(XL)), sd2, "sd2")


@pytest.mark.slow
def test_text_encoder_layers_of_an_sdxl_lora_apply_to_its_own_prompts_on_both_encoders(tmp_path):
    """A LoRA with layers on both text encoders (community SDXL LoRAs have them): its style's prompt
    goes through both; the inversion prompt through neither. Caught: routing on the first encoder only."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model

    from diffstyler.lora import adapter_state_dict

    source = tiny_pipe_with_adapter("style", seed=4, model=XL)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"], init_lora_weights="gaussian")
    layers = {}
    for name, encoder in (("text_encoder", source.text_encoder), ("text_encoder_2", source.text_encoder_2)):
        inject_adapter_in_model(config, encoder, adapter_name="style")
        randomize_adapter(encoder, "style", seed=5, std=0.5)
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(
            {key.replace(".style.", "."): value.detach() for key, value in encoder.named_parameters() if ".style." in key})
    StableDiffusionXLPipeline.save_lora_weights(
        tmp_path / "lora", unet_lora_layers=adapter_state_dict(source.unet, "style"), **layers,
        unet_lora_adapter_metadata=source.unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=config.to_dict(), text_encoder_2_lora_adapter_metadata=config.to_dict())

    pipeline = DiffStylerPipeline.from_pretrained(XL, progress=False)
    entry = StyleEntry(lora=str(tmp_path / "lora"), prompt="painting of sss").resolved()
    base = load_pipeline(ModelSpec(XL))
    reference, rows = pipeline.prepare_styles([entry], [None], Image.new("RGB", (64, 48)), SamplingConfig())
    expected_reference = encode_prompts(base, [""])
    assert (reference.hidden - expected_reference.hidden).abs().max() < 1e-5
    assert (reference.pooled - expected_reference.pooled).abs().max() < 1e-5
    styled, plain = encode_prompts(source, ["painting of sss"]), encode_prompts(base, ["painting of sss"])
    assert (rows[0].cond.hidden - styled.hidden).abs().max().item() < 1e-5
    assert (rows[0].cond.pooled - styled.pooled).abs().max().item() < 1e-5
    for part in (slice(0, 768), slice(768, 2048)):  # each encoder's half of the hidden states
        assert (rows[0].cond.hidden[..., part] - plain.hidden[..., part]).abs().max().item() > 1e-3
    assert torch.equal(rows[0].cond.time_ids, time_ids_for(base.unet, (48, 64)))


# --- the VAE --------------------------------------------------------------------------------------------

def overflowing_vae_pipe() -> StableDiffusionXLPipeline:
    """tiny-sdxl with a float16 VAE whose first convolutions' outputs overflow float16 (as SDXL's own
    VAE does inside its decoder; the weights themselves stay below float16's 65504) while the group
    norms after them keep float32 finite."""
    pipe = load_pipeline(ModelSpec(XL))
    with torch.no_grad():
        pipe.vae.decoder.conv_in.weight.mul_(1e5)
        pipe.vae.encoder.conv_in.weight.mul_(1e5)
    pipe.vae.to(torch.float16)
    return pipe


def test_float16_sdxl_vae_decodes_and_encodes_in_float32_never_a_black_image():
    """Caught: the float16 decode (inf, then NaN: a black image), or a decode tried in float16 first."""
    pipe = overflowing_vae_pipe()
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert not torch.isfinite(pipe.vae.decode(latent.half() / pipe.vae.config.scaling_factor).sample).all()
        assert not torch.isfinite(pipe.vae.encode(pixels.half()).latent_dist.mean).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pixels = decode_latents(pipe, latent.half())
        latents = encode_images(pipe, pixels)
    assert pixels.dtype == torch.float32 and torch.isfinite(pixels).all() and pixels.std() > 1e-2
    assert torch.isfinite(latents).all() and latents.dtype == torch.float16
    assert pipe.vae.dtype == torch.float16  # the VAE goes back to the precision it had


@pytest.mark.slow
def test_a_configured_vae_replaces_the_models_own(tmp_path):
    """`model.model.vae`: e.g. SDXL's VAE fixed for float16 (`force_upcast` false in its config) runs in float16."""
    from diffusers import AutoencoderKL

    fixed = AutoencoderKL(block_out_channels=(8, 16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=1, norm_num_groups=8,
                          scaling_factor=0.13025, force_upcast=False)
    fixed.save_pretrained(str(tmp_path / "vae"))
    pipe = load_pipeline(ModelSpec(XL, dtype="float16", vae=str(tmp_path / "vae")))
    assert not pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float16
    assert torch.equal(pipe.vae.decoder.conv_in.weight, fixed.decoder.conv_in.weight.half())
    assert ModelSpec(XL).fingerprint() == {k: v for k, v in ModelSpec(XL, vae="x").fingerprint().items() if k != "vae"}


# --- training -------------------------------------------------------------------------------------------

@torch.no_grad()
def xl_probe(unet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    added = {"text_embeds": torch.randn(2, 32, generator=generator), "time_ids": torch.tensor([[64.0, 48.0, 0, 0, 64, 48]] * 2)}
    return unet(torch.randn(2, 4, 8, 6, generator=generator), torch.tensor([10, 700]),
                encoder_hidden_states=torch.randn(2, 77, 2048, generator=generator), added_cond_kwargs=added).sample


class LossAndTimeIds:
    """Records each step's loss and the time ids the UNet was given."""

    def __init__(self):
        from lightning.pytorch.callbacks import Callback

        recorder = self

        class Recorder(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                recorder.losses[trainer.global_step] = float(outputs["loss"])

        self.callback = Recorder()
        self.losses: dict[int, float] = {}
        self.time_ids: list[torch.Tensor] = []

    def watch(self, unet) -> None:
        unet.register_forward_pre_hook(lambda m, a, kwargs: self.time_ids.append(kwargs["added_cond_kwargs"]["time_ids"].clone()),
                                       with_kwargs=True)


def fit_xl(output: Path, style_image: Path, steps: int, recorder: LossAndTimeIds, ckpt_path=None, checkpoints=None):
    import lightning as L

    from diffstyler.data import StyleDataModule
    from diffstyler.lora import StyleLoRAConfig
    from diffstyler.training import StyleLoRAModule

    module = StyleLoRAModule(ModelSpec(XL), lora=StyleLoRAConfig(rank=4, alpha=8), learning_rate=5e-3, output_dir=str(output), seed=0,
                             export_kohya=True)
    torch.manual_seed(0)  # PEFT draws the initial lora_A from the global RNG
    module.configure_model()
    recorder.watch(module.denoiser)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[recorder.callback] + ([checkpoints] if checkpoints else []), enable_checkpointing=bool(checkpoints),
                        default_root_dir=output.parent)
    trainer.fit(module, StyleDataModule([str(style_image)], resolution=64, crop=True), ckpt_path=ckpt_path)
    return module


@pytest.mark.slow
def test_an_sdxl_lora_trained_here_loads_into_diffusers_sdxl_pipeline_and_resumes(tmp_path, style_image):
    """Training on tiny-sdxl with crops: each image's time ids are its size, its crop's corner and the
    crop's size in pixels; the exported file loads with `StableDiffusionXLPipeline.load_lora_weights`
    and its kohya export with diffusers' SDXL kohya reader, both with our outputs; a resumed run
    repeats the uninterrupted run's last loss. Caught: the time ids of the whole image for a crop,
    a file without the adapter's metadata (alpha 8 reloaded as 4), SD 1.x kohya names, checkpoints
    that miss a LoRA weight."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    recorder = LossAndTimeIds()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "checkpoints", filename="{step}", every_n_train_steps=2, save_top_k=-1)
    module = fit_xl(tmp_path / "lora", style_image, 3, recorder, checkpoints=checkpoints)
    training_ids = recorder.time_ids[-3:]
    for ids in training_ids:
        (original_h, original_w, top, left, target_h, target_w), = ids.tolist()
        assert (original_h, original_w, target_h, target_w) == (64, 64, 48, 48)
        assert top in (0, 8, 16) and left in (0, 8, 16)
    info = json.loads((tmp_path / "lora" / "diffstyler_lora.json").read_text())
    assert info["model_card"]["base_model"] == "SDXL"

    trained = xl_probe(module.denoiser)
    fresh = load_pipeline(ModelSpec(XL))
    untrained = xl_probe(fresh.unet)
    fresh.load_lora_weights(str(tmp_path / "lora"), adapter_name="ours")
    assert (xl_probe(fresh.unet) - trained).abs().max() < 1e-5 < (trained - untrained).abs().max()
    kohya = tmp_path / "lora" / "lora.safetensors"
    from safetensors.torch import load_file

    assert any(key.startswith("lora_unet_output_blocks_") for key in load_file(str(kohya)))
    from_kohya = load_pipeline(ModelSpec(XL))
    from_kohya.load_lora_weights(str(kohya.parent), weight_name=kohya.name, adapter_name="kohya")
    assert (xl_probe(from_kohya.unet) - trained).abs().max() < 1e-5

    resumed = LossAndTimeIds()
    fit_xl(tmp_path / "resumed", style_image, 3, resumed, ckpt_path=str(tmp_path / "checkpoints" / "step=2.ckpt"))
    assert list(resumed.losses) == [3] and abs(resumed.losses[3] - recorder.losses[3]) < 1e-6
    assert torch.equal(resumed.time_ids[-1], training_ids[-1])


@pytest.mark.slow
def test_preview_samples_on_sdxl_carry_time_ids():
    from diffstyler.callbacks import sample_text_to_image

    pipe = load_pipeline(ModelSpec(XL))
    images = sample_text_to_image(pipe, "painting of sss", "", 64, 48, steps=2, guidance_scale=7.5,
                                  generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 64, 48) and torch.isfinite(images).all()
