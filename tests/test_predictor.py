"""StylizePredictor and its DataModule on the tiny model: files in, PNGs with settings out."""

import dataclasses
import logging
import re
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning import Trainer
from PIL import Image

import diffstyler.pipeline as pipeline_module
from diffstyler.data.jobs import StyleEntry, StylizeDataModule, job_seed
from diffstyler.data.naming import disambiguated
from diffstyler.errors import UserError
from diffstyler.masks import MaskSpec
from diffstyler.models import ModelSpec, encode_images
from diffstyler.outputs import read_parameters, read_settings
from diffstyler.images import load_image, resize_to_multiple, to_tensor
from diffstyler.inversion import invert
from diffstyler.callbacks.writer import content_ssim
from diffstyler.torch_utils import base_model
from tests.helpers import CONTENT, MASK, make_job as _job, make_predictor as _predictor, stylize_one, write_random_lora

@pytest.mark.slow
def test_same_seed_gives_identical_output_and_the_metadata_parses_back(tmp_path, loras):
    predictor = _predictor(tmp_path, overwrite=True)
    job = _job([StyleEntry(lora=str(loras[0]))])
    first = stylize_one(predictor, job).outputs[0]
    pixels = np.array(Image.open(first))
    second = stylize_one(predictor, job).outputs[0]
    assert np.array_equal(np.array(Image.open(second)), pixels)

    assert Image.open(first).size == (64, 48)  # the content's aspect
    settings = read_settings(first)
    assert settings["Seed"] == job_seed(7, job.id) == job.seed
    assert settings["Steps"] == 6 and settings["Sampler"] == "DDIM"
    assert settings["Injection"] == asdict(predictor.injection)
    assert settings["Sampling"] == asdict(predictor.sampling)
    assert settings["prompt"] == "painting of sss"  # taken from the LoRA's diffstyler_lora.json
    assert settings["Styles"][0]["lora"] == str(loras[0])
    assert len(settings["Styles"][0]["lora_sha256"]) == 64
    parameters = read_parameters(first)
    assert parameters["Seed"] == str(job.seed) and parameters["CFG scale"] == "10.5"
    assert parameters["Negative prompt"] == predictor.sampling.negative_prompt
    assert (tmp_path / "out" / "content_shapes_grid.png").is_file()
    content = resize_to_multiple(load_image(CONTENT), 64)
    assert settings["Content SSIM"] == round(content_ssim(content, Image.open(first).convert("RGB")), 4)
    assert content_ssim(content, content) == pytest.approx(1.0, abs=1e-4)
    assert settings["Content SSIM"] < 0.99


@pytest.mark.slow
def test_outputs_are_written_once_and_inversion_is_cached(tmp_path, loras, monkeypatch):
    calls = []
    real_invert = pipeline_module.invert_batch
    monkeypatch.setattr(pipeline_module, "invert_batch", lambda *a, **k: calls.append(1) or real_invert(*a, **k))
    predictor = _predictor(tmp_path)
    job = _job([StyleEntry(lora=str(loras[0]))])
    result = stylize_one(predictor, job)
    path = Path(result.outputs[0])
    stamp = path.stat().st_mtime_ns
    again = stylize_one(predictor, job)
    assert again.status == "skipped" and path.stat().st_mtime_ns == stamp

    other_style = _job([StyleEntry(lora=str(loras[1]), prompt="another style")])
    stylize_one(predictor, other_style)
    assert len(calls) == 1  # the second style on the same content reused the inversion
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1


@pytest.mark.slow
def test_several_styles_without_masks_give_one_image_each_from_one_unet(tmp_path, loras):
    predictor = _predictor(tmp_path)
    unet = predictor.pipeline.pipe.unet
    result = stylize_one(predictor, _job([StyleEntry(lora=str(loras[0])), StyleEntry(lora=str(loras[1]))]))
    names = sorted(Path(p).name for p in result.outputs)
    assert names == ["content_shapes_first.png", "content_shapes_second.png"]
    assert predictor.pipeline.pipe.unet is unet and set(unet.peft_config) == {"style0", "style1"}
    images = [np.array(Image.open(p)) for p in result.outputs]
    assert not np.array_equal(images[0], images[1])


@pytest.mark.slow
def test_masked_style_keeps_the_content_outside_the_feathered_mask(tmp_path, loras):
    predictor = _predictor(tmp_path)
    entry = StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(MASK), feather=2))
    result = stylize_one(predictor, _job([entry]))
    output = np.array(Image.open(result.outputs[0]))
    content = np.array(Image.open(CONTENT).convert("RGB"))
    saved_mask = np.array(Image.open(tmp_path / "out" / "content_shapes_mask0_first.png"))
    outside = saved_mask == 0
    assert outside.any() and (~outside).any()
    assert np.array_equal(output[outside], content[outside])
    assert not np.array_equal(output[~outside], content[~outside])


def test_box_prompt_with_a_missing_fastsam_file_names_the_file(tmp_path, loras):
    predictor = _predictor(tmp_path)
    predictor.segmenter_config.weights = str(tmp_path / "FastSAM-s.pt")
    entry = StyleEntry(lora=str(loras[0]), mask=MaskSpec(box=[0, 0, 10, 10]))
    with pytest.raises(FileNotFoundError, match="FastSAM-s.pt"):
        stylize_one(predictor, _job([entry]))


def test_bad_inputs_fail_when_the_data_is_built(tmp_path, loras):
    with pytest.raises(FileNotFoundError, match="missing.png"):
        StylizeDataModule(content=[str(tmp_path / "missing.png")], styles=[StyleEntry(lora=str(loras[0]))])
    with pytest.raises(FileNotFoundError, match="nolora"):
        StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(tmp_path / "nolora"))])
    not_an_image = tmp_path / "mask.png"
    not_an_image.write_text("hello")
    with pytest.raises(ValueError, match="either every style entry has a mask"):
        StylizeDataModule(content=[str(CONTENT)], styles=[
            StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(not_an_image))), StyleEntry(lora=str(loras[1]))])


@pytest.mark.slow
def test_lightning_predict_loop_writes_every_job_and_restores_the_unet(tmp_path, loras):
    second_content = tmp_path / "second.png"
    Image.open(CONTENT).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(second_content)
    data = StylizeDataModule(content=[str(CONTENT), str(second_content)], styles=[StyleEntry(lora=str(loras[0]))], resolution=64)
    predictor = _predictor(tmp_path)
    unet = predictor.pipeline.pipe.unet
    processors = dict(unet.attn_processors)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    results = trainer.predict(predictor, datamodule=data)
    jobs = [result.job for batch in results for result in batch]
    assert sorted(job.id for job in jobs) == ["content_shapes", "second"]
    assert all((tmp_path / "out" / job.files.results[0]).is_file() for job in jobs)
    assert unet.attn_processors == processors
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert read_settings(tmp_path / "out" / "second.png")["Seed"] == job_seed(0, "second")


def test_a_broken_lora_file_is_named_before_any_model_is_loaded(tmp_path):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ValueError, match="broken.safetensors"):
        StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(broken), prompt="p")])
    pickled = tmp_path / "style.ckpt"
    pickled.write_bytes(b"whatever")
    with pytest.raises(ValueError, match="pickled LoRAs are not loaded"):
        StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(pickled), prompt="p")])


@pytest.mark.slow
def test_a_lora_with_text_encoder_layers_leaves_the_reference_prompt_alone(tmp_path):
    """Text-encoder LoRA layers (community LoRAs have them) apply to their own style's prompts only."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model

    from diffstyler.lora import adapter_state_dict
    from diffstyler.models import encode_prompts, load_pipeline
    from tests.helpers import randomize_adapter, tiny_pipe_with_adapter

    source = tiny_pipe_with_adapter("style", seed=4)
    config = LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "fc1"], init_lora_weights="gaussian")
    # PEFT directly: transformers' own add_adapter asks for a newer PEFT than the pinned one
    inject_adapter_in_model(config, source.text_encoder, adapter_name="style")
    randomize_adapter(source.text_encoder, "style", seed=5, std=0.5)
    text_encoder_layers = {
        name.replace(".style.", "."): parameter.detach()
        for name, parameter in source.text_encoder.named_parameters() if ".style." in name
    }
    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "lora",
        unet_lora_layers=adapter_state_dict(source.unet, "style"),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(text_encoder_layers),
        unet_lora_adapter_metadata=source.unet.peft_config["style"].to_dict(),
        text_encoder_lora_adapter_metadata=config.to_dict(),
    )

    predictor = _predictor(tmp_path)
    entry = StyleEntry(lora=str(tmp_path / "lora"), prompt="painting of sss").resolved()
    base = load_pipeline(ModelSpec(name="tiny"))
    negative = predictor.sampling.negative_prompt
    for _ in range(2):  # the second job runs with the adapters already loaded
        reference, rows = predictor.pipeline.prepare_styles([entry], [None], Image.new("RGB", (64, 48)), predictor.sampling)
        assert torch.equal(reference.hidden, encode_prompts(base, [predictor.sampling.inversion_prompt]).hidden)
        assert (rows[0].cond.hidden - encode_prompts(source, ["painting of sss"]).hidden).abs().max().item() < 1e-5
        assert (rows[0].uncond.hidden - encode_prompts(source, [negative]).hidden).abs().max().item() < 1e-5
        assert (rows[0].cond.hidden - encode_prompts(base, ["painting of sss"]).hidden).abs().max().item() > 1e-3


def test_contents_with_the_same_file_name_get_distinct_outputs(tmp_path, loras):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        Image.open(CONTENT).save(tmp_path / folder / "photo.png")
    data = StylizeDataModule(content=[str(tmp_path / "a" / "photo.png"), str(tmp_path / "b" / "photo.png"), str(CONTENT)],
                             styles=[StyleEntry(lora=str(loras[0]))])
    # the second gets a hash of its path, not its position: reordering the inputs renames nothing
    second = disambiguated("photo", str(tmp_path / "b" / "photo.png"))
    assert [job.id for job in data.jobs()] == ["photo", second, "content_shapes"]
    assert re.fullmatch(r"photo-[0-9a-f]{8}", second)


# -- output names: inside the folder, unique, checked before any work ---------------------------


@pytest.mark.parametrize("name", ["../../../x", "a/b", ".hidden", "..", "tab\tname"])
def test_a_style_name_that_is_not_a_plain_file_name_is_refused_naming_its_key(tmp_path, loras, name):
    """Mistake caught: style names pasted into output paths unchecked (`../../../x` leaves the folder)."""
    with pytest.raises(UserError, match=r"data\.styles\[1\]\.name"):
        StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(loras[0])), StyleEntry(lora=str(loras[1]), name=name)])


def test_a_content_stem_that_is_not_a_plain_file_name_is_refused(tmp_path, loras):
    hidden = tmp_path / ".hidden.png"
    Image.open(CONTENT).save(hidden)
    with pytest.raises(UserError, match=r"data\.content\[0\]"):
        StylizeDataModule(content=[str(hidden)], styles=[StyleEntry(lora=str(loras[0]))])


def test_a_job_edited_to_leave_the_output_folder_writes_nothing_outside(tmp_path, loras):
    """Mistake caught: a write that does not check its target lies inside `model.output.folder`."""
    predictor = _predictor(tmp_path)
    job = _job([StyleEntry(lora=str(loras[0]))])
    job = dataclasses.replace(job, id="../escaped", files=dataclasses.replace(job.files, results=("../escaped.png",)))
    with pytest.raises(UserError, match="outside the output folder"):
        stylize_one(predictor, job)
    assert not (tmp_path / "escaped.png").exists()


@pytest.mark.slow
def test_the_same_lora_at_two_scales_writes_two_results(tmp_path, loras):
    """Mistake caught: two unnamed styles from one LoRA share a name, so one result overwrites the other."""
    styles = [StyleEntry(lora=str(loras[0])), StyleEntry(lora=str(loras[0]), scale=0.5)]
    job = _job(styles)
    result = stylize_one(_predictor(tmp_path), job)
    assert len(set(result.outputs)) == 2 and all(Path(p).is_file() for p in result.outputs)
    images = [np.array(Image.open(p)) for p in result.outputs]
    assert not np.array_equal(images[0], images[1])
    assert job.files.results == ("content_shapes_first-0.png", "content_shapes_first-1.png")


@pytest.mark.slow
def test_a_content_named_like_another_jobs_grid_is_not_skipped(tmp_path, loras):
    """Mistake caught: content `x_grid.png` after `x.png`: its result is `x.png`'s grid, so it counts as done."""
    (tmp_path / "in").mkdir()
    contents = [tmp_path / "in" / "x.png", tmp_path / "in" / "x_grid.png"]
    for path in contents:
        Image.open(CONTENT).save(path)
    data = StylizeDataModule(content=[str(p) for p in contents], styles=[StyleEntry(lora=str(loras[0]))], resolution=64)
    jobs = data.jobs()
    predictor = _predictor(tmp_path)
    results = [stylize_one(predictor, job) for job in jobs]
    assert [r.status == "skipped" for r in results] == [False, False]
    assert read_settings(results[1].outputs[0])["Content"] == str(contents[1])
    names = [name for job in jobs for name in (*job.files.results, job.files.grid)]
    assert len(set(names)) == len(names) == 4


def test_colliding_output_names_are_refused_when_the_data_is_built(tmp_path, loras):
    with pytest.raises(UserError, match=r"data\.styles\[1\]\.name"):
        StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(loras[0]), name="a"), StyleEntry(lora=str(loras[1]), name="a")])
    with pytest.raises(UserError, match="content_shapes_grid.png"):  # a style's result would be the grid
        StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(loras[0]), name="grid"), StyleEntry(lora=str(loras[1]))])


@pytest.mark.slow
def test_a_245_character_content_stem_is_stylized(tmp_path, loras):
    """Mistake caught: temporary names made from the stem, over the 255-byte file name limit."""
    content = tmp_path / ("c" * 245 + ".png")
    Image.open(CONTENT).save(content)
    result = stylize_one(_predictor(tmp_path), _job([StyleEntry(lora=str(loras[0]))], content=content))
    assert Path(result.outputs[0]).is_file()
    assert (tmp_path / "out" / ("c" * 245 + "_grid.png")).is_file()
    with pytest.raises(UserError, match=r"too long.*data\.content\[0\]|data\.content\[0\].*too long"):  # its mask file would be
        StylizeDataModule(content=[str(content)], styles=[StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(MASK)))])


@pytest.mark.slow
def test_a_rerun_says_how_many_jobs_it_skipped(tmp_path, loras, caplog):
    """Mistake caught: finished jobs skipped without a word."""
    data = StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(loras[0]))], resolution=64)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    predictor = _predictor(tmp_path)
    with caplog.at_level(logging.INFO):
        trainer.predict(predictor, datamodule=data)
        assert "already done" not in caplog.text
        trainer.predict(predictor, datamodule=data)
    assert caplog.text.count("1 job already done, skipped") == 1


@pytest.mark.slow
def test_outside_the_mask_every_steps_latent_is_the_content_trajectory_before_compositing(tmp_path, loras):
    """Eq. 6 inside the loop, seen from the predictor with pixel compositing on: compositing alone
    would hide a missing latent blend in the final image, so the latents of every step are checked."""
    from diffstyler.masks import mask_to_latent, resolve_mask
    from diffstyler.sampling import ddim_schedule

    predictor = _predictor(tmp_path)
    assert predictor.output.composite
    steps = []
    predictor.step_callback = steps.append
    entry = StyleEntry(lora=str(loras[0]), mask=MaskSpec(file=str(MASK), feather=2))
    stylize_one(predictor, _job([entry]))

    content = resize_to_multiple(load_image(CONTENT), 64)
    mask = resolve_mask(entry.mask, content)
    reference, _ = predictor.pipeline.prepare_styles([entry.resolved()], [mask], content, predictor.sampling)
    pixels = to_tensor(content).unsqueeze(0)
    with base_model(predictor.pipeline.pipe.unet):
        trajectory = invert(predictor.pipeline.backbone, encode_images(predictor.pipeline.pipe, pixels), reference,
                            ddim_schedule(predictor.pipeline.pipe.scheduler, 6), progress=False)
    outside = ~mask_to_latent(mask, (6, 8)).bool().expand(1, 4, 6, 8)
    assert len(steps) == 6 and outside.any() and (~outside).any()
    for state in steps:
        expected = trajectory[state.step + 1 : state.step + 2]
        assert torch.equal(state.latents[0][outside], expected[outside]), f"step {state.step}"
        assert not torch.equal(state.latents[0][~outside], expected[~outside])


@pytest.mark.slow
def test_a_lora_with_nan_weights_fails_the_job_and_writes_no_image(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    lora = write_random_lora(tmp_path / "broken", seed=3)
    with safe_open(str(lora), framework="pt") as file:
        metadata = file.metadata()
    weights = {k: torch.full_like(v, float("nan")) if "lora.up" in k or "lora_B" in k else v
               for k, v in load_file(str(lora)).items()}
    save_file(weights, str(lora), metadata=metadata)
    predictor = _predictor(tmp_path)
    with pytest.raises(UserError, match=r"non-finite.*style 'broken'"):
        stylize_one(predictor, _job([StyleEntry(lora=str(lora))]))
    assert not list((tmp_path / "out").glob("*.png"))


@pytest.mark.slow
def test_a_result_reads_in_a1111_with_its_lora_tag_and_hash(tmp_path, loras):
    """What A1111's own parsing reads from a predict result: the prompt with `<lora:name:scale>`, the
    LoRA's short hash as A1111 computes it for that file, and no `Model hash` for a model that is not
    one file. Caught: tags or hashes missing from the text written; the hash of the wrong bytes."""
    from diffstyler.outputs import a1111_lora_hash
    from tests.a1111 import a1111_lora_hashes, a1111_parse_generation_parameters

    record = stylize_one(_predictor(tmp_path), _job([StyleEntry(lora=str(loras[0]), scale=0.5)]))
    read = a1111_parse_generation_parameters(Image.open(record.outputs[0]).text["parameters"])
    assert read["Prompt"] == "painting of sss <lora:first:0.5>"
    assert a1111_lora_hashes(read["Lora hashes"]) == {"first": a1111_lora_hash(loras[0])}
    assert "Model hash" not in read and read["Steps"] == "6"
    assert read_settings(record.outputs[0])["prompt"] == "painting of sss"  # the JSON keeps the exact prompt


@pytest.mark.slow
def test_a_jobs_seconds_include_its_share_of_the_inversions(tmp_path, loras, monkeypatch):
    """results.jsonl's seconds are what `diffstyler compare` reports per image. Catches: the chunk's
    inversions (run between preparing and denoising the jobs) left out of its jobs' seconds. The
    inversion here is 10 sub-steps per step, far more than the rest of the job."""
    predictor = _predictor(tmp_path)
    predictor.sampling = dataclasses.replace(predictor.sampling, inversion_substeps=10)
    spent = []
    real_trajectories = predictor.pipeline.trajectories

    def timed_trajectories(*args, **kwargs):
        started = time.perf_counter()
        value = real_trajectories(*args, **kwargs)
        spent.append(time.perf_counter() - started)
        return value

    monkeypatch.setattr(predictor.pipeline, "trajectories", timed_trajectories)
    jobs = StylizeDataModule(content=[str(CONTENT)], styles=[StyleEntry(lora=str(loras[0])), StyleEntry(lora=str(loras[1]))],
                             pairing="product", resolution=64).jobs()
    results = predictor.stylize_jobs(jobs)
    assert len(spent) == 1 and all(result.seconds >= spent[0] / 2 for result in results)
