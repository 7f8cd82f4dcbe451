"""`DiffStylerPipeline` (the Python API) and `train_style` on the tiny model, against the CLI and the
batched predictor path."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffstyler import DiffStylerPipeline, InjectionConfig, train_style
from diffstyler.cli import main
from diffstyler.data.jobs import StyleEntry, StylizeDataModule
from diffstyler.errors import UserError
from diffstyler.images import load_image, resize_to_multiple
from diffstyler.injection import INJECTION_PRESETS
from diffstyler.stylize import SamplingConfig
from tests.helpers import CONTENT, MASK, REPO_ROOT, make_predictor, write_random_lora

SMOKE = dict(num_inference_steps=10, injection=InjectionConfig(feature_steps=6, attention_steps=5), resolution=64)
# float32 sums differ with the batch size (see tests/test_predictor_batches.py): 1e-5 of the latents' scale
RELATIVE_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pipeline_loras")
    return [write_random_lora(folder / name, seed).parent for name, seed in (("ink", 1), ("oil", 2))]


@pytest.fixture(scope="module")
def pipe(loras) -> DiffStylerPipeline:
    pipeline = DiffStylerPipeline.from_pretrained("tiny", progress=False)
    for lora in loras:
        pipeline.load_style(lora)
    return pipeline


def content() -> Image.Image:
    return resize_to_multiple(load_image(CONTENT), 64)


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() / max(1.0, b.abs().max().item())


@pytest.mark.slow
def test_the_api_with_a_mask_file_equals_diffstyler_predict(pipe, loras, tmp_path, monkeypatch):
    """The smoke config's settings given to both, every other setting left to its default. Caught: the
    API using other defaults than the CLI (negative prompt, guidance, inversion, compositing, ...)."""
    styles = f"[{{lora: {loras[0]}, mask: {{file: {MASK}}}}}]"
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["predict", "--config", "configs/smoke/stylize.yaml", "--data.styles", styles, "--model.output.folder", str(tmp_path / "out"),
          "--model.inversion_cache", "null", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    by_cli = np.asarray(Image.open(tmp_path / "out" / "content_shapes.png"))
    result = pipe(CONTENT, styles="ink", masks=[MASK], **SMOKE)
    assert np.array_equal(np.asarray(result.composite), by_cli)
    assert result.settings["Sampling"]["negative_prompt"] == SamplingConfig.negative_prompt


@pytest.mark.slow
def test_outside_the_mask_the_composite_and_each_image_are_the_content(pipe):
    """Caught: compositing skipped (the decoded image differs from the content everywhere)."""
    mask = np.zeros((48, 64), dtype=np.uint8)
    mask[10:30, 20:50] = 255
    result = pipe(CONTENT, styles=["ink"], masks=[mask], **SMOKE)
    original = np.asarray(content())
    outside = mask == 0
    for image in (result.composite, result.images[0]):
        pixels = np.asarray(image)
        assert pixels.shape == original.shape
        assert np.array_equal(pixels[outside], original[outside])
        assert not np.array_equal(pixels[~outside], original[~outside])
    assert np.array_equal(np.asarray(result.masks[0]) > 0, mask > 0)


@pytest.mark.slow
def test_two_styles_in_one_call_equal_their_one_style_calls(pipe):
    """Disjoint masks; latents compared. Caught: rows of one style read by the other (its uncond row,
    its reference, its mask or its adapter)."""
    top, bottom = np.zeros((48, 64), bool), np.zeros((48, 64), bool)
    top[:24], bottom[24:] = True, True
    together = pipe(CONTENT, styles=["ink", "oil"], masks=[top, bottom], output_type="latent", **SMOKE).images
    alone = [pipe(CONTENT, styles=[name], masks=[mask], output_type="latent", **SMOKE).images[0]
             for name, mask in (("ink", top), ("oil", bottom))]
    for ours, theirs in zip(together, alone):
        assert close(ours, theirs) < RELATIVE_TOLERANCE
    assert close(alone[0], alone[1]) > 1e-2  # the two styles really differ


@pytest.mark.slow
def test_the_batched_predictor_equals_the_pipeline_job_by_job(pipe, loras, tmp_path):
    """Six jobs (three contents, two of one size, x two styles) in one chunk, every step of a size in
    one UNet call, against `__call__` per job. Caught: a row layout off by one (a style row injected
    from, guided with, or fused with another job's rows)."""
    tall, flipped = tmp_path / "tall.png", tmp_path / "flipped.png"
    Image.open(CONTENT).transpose(Image.Transpose.ROTATE_90).save(tall)
    Image.open(CONTENT).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(flipped)
    styles = [StyleEntry(lora=str(lora)) for lora in loras]
    jobs = StylizeDataModule(content=[str(CONTENT), str(tall), str(flipped)], styles=styles, pairing="product", resolution=64).jobs()
    predictor = make_predictor(tmp_path)
    final: dict[str, torch.Tensor] = {}
    predictor.step_callback = lambda state: final.__setitem__(state.job, state.latents[0])
    calls = []
    predictor.pipeline.denoiser.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    assert [r.status for r in predictor.stylize_jobs(jobs)] == ["done"] * 6
    assert max(calls) > 6  # jobs of two contents really shared UNet calls
    settings = dict(num_inference_steps=6, injection=predictor.injection, resolution=64, output_type="latent")
    for job in jobs:
        alone = pipe(job.content, styles=[job.styles[0].name], **settings).images[0]
        assert close(final[job.id], alone) < RELATIVE_TOLERANCE, job.id


def test_a_preset_name_equals_its_config_and_the_paper_code_yaml():
    """The Python preset and the CLI's YAML overlay say the same. Caught: one edited without the other."""
    import yaml

    overlay = yaml.safe_load((REPO_ROOT / "configs" / "presets" / "paper_code.yaml").read_text())["model"]["injection"]
    assert InjectionConfig(**overlay) == INJECTION_PRESETS["paper_code"]
    assert INJECTION_PRESETS["paper"] == InjectionConfig()


@pytest.mark.parametrize("call, key", [
    (dict(content="missing.png"), "content"),
    (dict(content=CONTENT, styles=["nobody"]), "styles"),
    (dict(content=CONTENT, masks=[MASK, MASK]), "masks"),
    (dict(content=CONTENT, num_inference_steps=0), "num_inference_steps"),
    (dict(content=CONTENT, injection="papers"), "injection"),
    (dict(content=CONTENT, resolution=60), "resolution"),
    (dict(content=CONTENT, masks=[{"box": [0, 0, 10]}]), r"masks\[0\]"),
    (dict(content=CONTENT, injection=InjectionConfig(feature_steps=3)), r"injection\.feature_steps"),
])
def test_bad_arguments_are_one_line_naming_the_argument(pipe, call, key):
    with pytest.raises(UserError, match=rf"\({key}\)") as error:
        pipe(**{"styles": ["ink"], "injection": InjectionConfig(feature_steps=2, attention_steps=2), **call,
                "num_inference_steps": call.get("num_inference_steps", 2)})
    assert "\n" not in str(error.value)


@pytest.mark.slow
def test_train_style_writes_the_lora_the_cli_writes_and_both_loaders_read_it(tmp_path, monkeypatch, unet_probe):
    """Caught: `train_style` with other defaults or seeding than `diffstyler fit` (then its LoRA
    differs by far more than the 1e-6 two-thread CPU training varies by); a LoRA that our loader
    or diffusers' `load_lora_weights` cannot read."""
    from diffstyler.lora import StyleLoRAConfig
    from diffstyler.models import ModelSpec, load_pipeline
    from safetensors.torch import load_file

    ours = train_style(REPO_ROOT / "data" / "style_stripes.png", tmp_path / "api", steps=4, model="tiny", prompt="painting of <sss>",
                       lora=StyleLoRAConfig(rank=4), resolution=64, accelerator="cpu", progress=False)
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["fit", "--config", "configs/smoke/style.yaml", "--model.output_dir", str(tmp_path / "cli"), "--trainer.logger", "false",
          "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"])
    api, cli = load_file(str(ours / "pytorch_lora_weights.safetensors")), load_file(str(tmp_path / "cli" / "pytorch_lora_weights.safetensors"))
    assert api.keys() == cli.keys()
    assert max((api[k] - cli[k]).abs().max().item() for k in api) < 1e-5
    assert max(cli[k].abs().max().item() for k in cli if "lora_B" in k or "lora.up" in k) > 1e-4  # it trained

    pipeline = DiffStylerPipeline.from_pretrained("tiny", progress=False)
    assert pipeline.load_style(ours) == ["api"]
    assert pipeline.styles["api"].prompt == "painting of <sss>"
    diffusers_pipe = load_pipeline(ModelSpec("tiny"))
    before = unet_probe(diffusers_pipe.unet)
    diffusers_pipe.load_lora_weights(str(ours), adapter_name="api")
    assert (unet_probe(diffusers_pipe.unet) - before).abs().max().item() > 1e-6


def test_the_composite_is_the_result_inside_the_union_of_the_masks_and_the_content_elsewhere():
    """Several styles' soft masks: the result where any mask is 1, a blend by the largest mask where
    they are soft, the content's own pixels where every mask is 0. Caught (fast): the intersection
    (or the mean) of the masks, which keeps the content where only one style is; their sum, which
    overshoots where they overlap."""
    from diffstyler.pipeline import composite_in_pixels

    content = Image.fromarray(np.full((4, 6, 3), 40, np.uint8))
    result = Image.fromarray(np.full((4, 6, 3), 200, np.uint8))
    first, second = torch.zeros(4, 6), torch.zeros(4, 6)
    first[:, :2] = 1  # columns 0-1
    second[:, 1:4] = 1  # columns 1-3: both styles in column 1
    second[0, 4] = 0.5  # a feathered edge
    composite = np.asarray(composite_in_pixels(content, result, [first, second]))
    expected = np.full((4, 6), 40)
    expected[:, :4] = 200
    expected[0, 4] = 120  # 0.5 * 200 + 0.5 * 40
    assert np.array_equal(composite, np.repeat(expected[..., None], 3, axis=2))
