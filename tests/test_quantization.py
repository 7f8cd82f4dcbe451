"""A quantized transformer (`diffstyler.quantization`) on tiny-flux and tiny-sd3: torchao's int8
weight-only and a GGUF file of the transformer load the way a downloaded model's do, stay close to
the float32 model, and carry style LoRAs (in stylization and in training); bitsandbytes' NF4 (CUDA
only) and every bad value are refused in one line before a weight loads."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline

from diffstyler import DiffStylerPipeline
from diffstyler.backbones import backbone_for
from diffstyler.errors import UserError
from diffstyler.lora import StyleLoRAConfig, add_style_adapter
from diffstyler.models import ModelSpec, load_pipeline
from diffstyler.quantization import check_quantization_device, is_quantized
from tests.helpers import CONTENT, MASK, write_gguf, write_transformer_lora

FAST = dict(num_inference_steps=4, inversion_substeps=1, resolution=64)


@pytest.fixture(scope="module")
def flux_lora(tmp_path_factory) -> Path:
    return write_transformer_lora(tmp_path_factory.mktemp("flux_lora"), "tiny-flux")


@pytest.fixture(scope="module")
def sd3_lora(tmp_path_factory) -> Path:
    return write_transformer_lora(tmp_path_factory.mktemp("sd3_lora"), "tiny-sd3")


# --- refusals: one line, before any weight loads ---------------------------------------------------

def test_bad_values_name_their_key():
    """Caught: a misspelt mode taken for none (silently full size), a safetensors file taken for a
    GGUF one, and a GGUF file quantized a second time."""
    with pytest.raises(UserError, match=r"model\.model\.quantization.*none, int8, nf4.*'int4'"):
        ModelSpec("tiny-flux", quantization="int4")
    with pytest.raises(UserError, match=r"model\.model\.transformer.*GGUF file.*'flux\.safetensors'"):
        ModelSpec("tiny-flux", transformer="flux.safetensors")
    with pytest.raises(UserError, match=r"model\.model\.quantization.*quantized already"):
        ModelSpec("tiny-flux", quantization="int8", transformer="flux-Q8_0.gguf")


def test_a_unet_family_is_refused(tmp_path):
    """A UNet (SD 1.x / 2.x / SDXL) has no transformer to quantize. Caught: the key accepted and
    ignored (the model loads at full size, the user believes it is quantized)."""
    with pytest.raises(UserError, match=r"model\.model\.quantization.*diffusion transformer.*tiny has a UNet.*leave it none"):
        load_pipeline(ModelSpec("tiny", quantization="int8"))
    gguf_file = tmp_path / "flux.gguf"
    gguf_file.write_bytes(b"GGUF")
    with pytest.raises(UserError, match=r"model\.model\.transformer.*tiny-sdxl has a UNet.*leave it null"):
        load_pipeline(ModelSpec("tiny-sdxl", transformer=str(gguf_file)))


@pytest.mark.parametrize("quantization, package", [("int8", "torchao"), ("nf4", "bitsandbytes"), ("gguf", "gguf")])
def test_a_missing_package_is_refused_with_its_install_command(monkeypatch, tmp_path, quantization, package):
    """The package is made to look absent (which the CI machine's install decides, not the code).
    Caught: diffusers' ImportError from inside the loading, after the rest of the model is built,
    instead of one line with the install command; and the GGUF check forgotten."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # nf4 is refused first on a machine without CUDA
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == package else real_find_spec(name, *args))
    monkeypatch.setattr("diffstyler.models.kind_of", lambda pipe: pytest.fail("the model was built before the check"))
    gguf_file = tmp_path / "flux.gguf"
    gguf_file.write_bytes(b"GGUF")
    spec = ModelSpec("tiny-flux", transformer=str(gguf_file)) if quantization == "gguf" else ModelSpec("tiny-flux", quantization=quantization)
    with pytest.raises(UserError, match=rf"needs the {package} package, which is not installed: pip install .*\[quant\]"):
        load_pipeline(spec)


def test_a_gguf_path_must_be_a_gguf_file(tmp_path):
    """Caught: a missing or wrong file reaching diffusers' reader (a long traceback)."""
    with pytest.raises(UserError, match=r"GGUF file not found.*model\.model\.transformer=.*nowhere\.gguf"):
        load_pipeline(ModelSpec("tiny-flux", transformer=str(tmp_path / "nowhere.gguf")))
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(UserError, match=r"not a GGUF file"):
        load_pipeline(ModelSpec("tiny-flux", transformer=str(fake)))


def test_nf4_needs_cuda():
    """bitsandbytes' 4-bit kernels are CUDA's. Caught: nf4 reaching the loader on the CPU (where
    diffusers fails deep inside, or the model loads unquantized)."""
    with pytest.raises(UserError, match=r"nf4 .*needs a CUDA device, the run is on cpu; use int8"):
        DiffStylerPipeline.from_pretrained("tiny-flux", quantization="nf4", device="cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match=r"model\.model\.quantization.*nf4 .*needs a CUDA device, this machine has none"):
            load_pipeline(ModelSpec("tiny-flux", quantization="nf4"))
    with pytest.raises(UserError, match=r"model\.model\.quantization.*nf4.*needs a CUDA device"):
        check_quantization_device("nf4", torch.device("cpu"))
    check_quantization_device("int8", torch.device("cpu"))  # int8 runs anywhere


def test_quantization_reaches_the_hashes_only_when_set():
    """Caught: every existing output's settings hash changed by the new keys, or an int8 run reusing
    a float32 run's results and inversion trajectories (the key missing from the fingerprint)."""
    assert ModelSpec("tiny-flux").fingerprint() == {"name": "tiny-flux", "revision": None, "variant": None, "dtype": "float32",
                                                    "config": None, "prediction_type": None}
    assert ModelSpec("tiny-flux", quantization="int8").fingerprint()["quantization"] == "int8"
    assert ModelSpec("tiny-flux", transformer="a.gguf").fingerprint()["transformer"] == "a.gguf"


# --- int8 (torchao) ------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("model, lora", [("tiny-flux", "flux_lora"), ("tiny-sd3", "sd3_lora")])
def test_int8_stays_close_to_float32_and_carries_the_style(request, model, lora):
    """Localized stylization with a LoRA on an int8 transformer, against the float32 model's: within
    2 levels on average (measured 0.21 on tiny-flux, 0.11 on tiny-sd3), while the LoRA moves the
    pixels over 5 times more (9.2 and 6.6). Caught: the weights not quantized (still float tensors), the LoRA
    not applied on the quantized linears (PEFT skipping layers it does not know), and a
    quantization that computes wrongly (a scale lost: far from float32)."""
    folder = request.getfixturevalue(lora)
    results = {}
    for quantization in ("none", "int8"):
        pipeline = DiffStylerPipeline.from_pretrained(model, quantization=quantization, progress=False)
        pipeline.load_style(folder, name="style")
        results[quantization] = np.asarray(pipeline(CONTENT, masks=[MASK], **FAST).composite).astype(np.float64)
    projection = pipeline.denoiser.transformer_blocks[0].attn.to_q
    assert is_quantized(pipeline.denoiser) and type(projection.base_layer.weight).__name__ == "Int8Tensor"
    assert [a.weight.dtype for a in projection.lora_A.values()] == [torch.float32]  # the adapter on the quantized linear
    quantization_error = np.abs(results["int8"] - results["none"]).mean()
    assert quantization_error < 2.0
    base = DiffStylerPipeline.from_pretrained(model, quantization="int8", progress=False)
    base.load_style(folder, name="style", scale=0.0)  # the same LoRA at scale 0: the int8 base alone
    style_effect = np.abs(results["int8"] - np.asarray(base(CONTENT, masks=[MASK], **FAST).composite)).mean()
    assert style_effect > 5 * quantization_error


def test_a_lora_loads_on_an_int8_model_in_inference_mode(flux_lora):
    """Lightning's predict loads the styles' LoRAs inside `torch.inference_mode`. Caught: the load
    reading the model's state dict there, where torchao's weights cannot be detached ("Cannot set
    version_counter for inference tensor": every job of a predict run failed)."""
    pipeline = DiffStylerPipeline.from_pretrained("tiny-flux", quantization="int8", progress=False)
    with torch.inference_mode():
        assert pipeline.load_style(flux_lora, name="style") == ["style"]


@pytest.mark.slow
def test_a_lora_trains_on_an_int8_base_and_loads_on_the_full_model(tmp_path):
    """`fit` as people train FLUX LoRAs on 24 GB: the frozen base quantized, bfloat16 autocast,
    gradient checkpointing. Caught: the base's int8 weights made trainable or cast back to float
    by the adapter set-up, the LoRA not learning through the quantized linears (its B still zero),
    and a LoRA file that needs the quantized model (PEFT's quantized layer names in its keys)."""
    from lightning.pytorch import Callback, Trainer, seed_everything

    from diffstyler.data.style import StyleDataModule
    from diffstyler.training import StyleLoRAModule

    losses = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    seed_everything(0, verbose=False)
    module = StyleLoRAModule(model=ModelSpec("tiny-flux", dtype="bfloat16", quantization="int8"), lora=StyleLoRAConfig(rank=4),
                             gradient_checkpointing=True, output_dir=str(tmp_path / "lora"))
    data = StyleDataModule(images=["data/style_stripes.png"], prompt="painting of sss", resolution=64)
    trainer = Trainer(max_steps=2, accelerator="cpu", devices=1, precision="bf16-mixed", logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=False, callbacks=[Losses()])
    trainer.fit(module, datamodule=data)

    assert len(losses) == 2 and all(np.isfinite(losses))
    trainable = module.trainable_parameter_names()
    assert trainable and all(".lora_A.style." in name or ".lora_B.style." in name for name in trainable)
    projection = module.denoiser.transformer_blocks[0].attn.to_q
    assert type(projection.base_layer.weight).__name__ == "Int8Tensor" and not projection.base_layer.weight.requires_grad
    assert projection.lora_B["style"].weight.abs().sum() > 0  # it learnt (B starts at zero)

    full = load_pipeline(ModelSpec("tiny-flux"))  # diffusers' own FLUX.1 pipeline, not quantized
    assert isinstance(full, FluxPipeline) and not is_quantized(full.transformer)
    backbone = backbone_for(full)
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = backbone.encode_prompts(["painting of sss"])
    with torch.no_grad():
        before = backbone.predict(latents, torch.tensor(500.0), prompt)
        full.load_lora_weights(str(tmp_path / "lora"), adapter_name="style")
        after = backbone.predict(latents, torch.tensor(500.0), prompt)
    assert "style" in full.transformer.peft_config
    assert not torch.equal(before, after)


# --- GGUF ----------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_gguf_transformer_replaces_the_models_own(tmp_path):
    """A Q8_0 GGUF file of another tiny-flux's transformer (seed 1), loaded into tiny-flux (seed 0):
    the weights stay quantized (dequantized per layer when they run), its outputs are seed 1's within
    Q8_0's error and not seed 0's, and a LoRA applies on it. Caught: the file ignored (the model's
    own weights kept), dequantized to float at load (no memory saved), or its layers unable to carry
    an adapter."""
    from diffstyler.backbones.mmdit import build_flux

    other = build_flux(seed=1).transformer
    path = write_gguf(other, tmp_path / "flux-tiny-Q8_0.gguf")
    pipe = load_pipeline(ModelSpec("tiny-flux", transformer=str(path)))
    projection = pipe.transformer.transformer_blocks[0].attn.to_q
    assert is_quantized(pipe.transformer) and type(projection.weight).__name__ == "GGUFParameter"
    assert projection.weight.dtype == torch.uint8

    backbone = backbone_for(pipe)
    latents = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = backbone.encode_prompts(["a photo", "a painting"])
    with torch.no_grad():
        loaded = backbone.predict(latents, torch.tensor(700.0), prompt)
        reference = backbone_for(load_pipeline(ModelSpec("tiny-flux"))).predict(latents, torch.tensor(700.0), prompt)
        pipe.transformer = other
        source = backbone.predict(latents, torch.tensor(700.0), prompt)
    assert (loaded - source).norm() < 0.02 * source.norm()
    assert (loaded - reference).norm() > 0.5 * reference.norm()

    quantized = load_pipeline(ModelSpec("tiny-flux", transformer=str(path))).transformer
    add_style_adapter(quantized, StyleLoRAConfig(rank=4), "style")
    assert "style" in quantized.transformer_blocks[0].attn.to_q.lora_A


@pytest.mark.slow
def test_a_diffusers_folder_loads_its_transformer_quantized(tmp_path):
    """The path of a downloaded model (hub id or folder): the transformer loads quantized from the
    folder's own weights (int8) or from a GGUF file (its configs from the folder), the rest of the
    pipeline from the folder. Caught: the quantized transformer not passed to the pipeline's
    `from_pretrained` (the folder's full-size one loaded instead), or the GGUF file read with
    another model's configs."""
    load_pipeline(ModelSpec("tiny-flux")).save_pretrained(tmp_path / "flux")
    folder = str(tmp_path / "flux")
    int8 = load_pipeline(ModelSpec(folder, quantization="int8"))
    assert isinstance(int8, FluxPipeline) and type(int8.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "Int8Tensor"
    gguf_file = write_gguf(load_pipeline(ModelSpec("tiny-flux")).transformer, tmp_path / "flux-Q8_0.gguf")
    from_gguf = load_pipeline(ModelSpec(folder, transformer=str(gguf_file)))
    assert type(from_gguf.transformer.transformer_blocks[0].attn.to_q.weight).__name__ == "GGUFParameter"
    backbone, reference = backbone_for(from_gguf), backbone_for(load_pipeline(ModelSpec(folder)))
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    prompt = reference.encode_prompts(["a photo"])
    with torch.no_grad():
        expected = reference.predict(latents, torch.tensor(300.0), prompt)
        assert (backbone.predict(latents, torch.tensor(300.0), prompt) - expected).norm() < 0.02 * expected.norm()
        assert (backbone_for(int8).predict(latents, torch.tensor(300.0), prompt) - expected).norm() < 0.02 * expected.norm()


@pytest.mark.slow
def test_a_gguf_file_of_another_family_fails_in_one_line(tmp_path):
    """Caught: diffusers' shape-mismatch traceback instead of a line naming the key."""
    path = write_gguf(load_pipeline(ModelSpec("tiny-sd3")).transformer, tmp_path / "sd3.gguf")
    with pytest.raises(UserError, match=r"cannot load the quantized transformer \(model\.model\.transformer=.*sd3\.gguf\)"):
        load_pipeline(ModelSpec("tiny-flux", transformer=str(path)))
