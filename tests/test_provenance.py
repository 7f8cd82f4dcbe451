"""What changes the pixels is listed once (`provenance.PixelSettings`), and the rerun hash, the inversion
cache's key and the recorded settings all follow it."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import pytest
from PIL import Image

from diffstyler import DiffStylerPipeline
from diffstyler.data.jobs import StyleEntry
from diffstyler.injection import InjectionConfig
from diffstyler.masks import MaskSpec
from diffstyler.methods import StyleIDConfig
from diffstyler.stylize import SamplingConfig
from tests.helpers import CONTENT, MASK, write_random_lora

# The sampling settings a content's inversion depends on; the others change only the denoising.
INVERSION_SAMPLING = {"steps", "inversion_substeps", "inversion_prompt", "inversion_solver"}


@pytest.fixture(scope="module")
def pipes() -> dict[str, DiffStylerPipeline]:
    return {name: DiffStylerPipeline.from_pretrained(name, progress=False) for name in ("tiny", "tiny-flux")}


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    return write_random_lora(tmp_path_factory.mktemp("provenance") / "ink", seed=1)


# A valid other value for every setting; a setting added to a config must be added here (checked below).
OTHER_SAMPLING = {"steps": 11, "guidance_scale": 7.0, "negative_prompt": "blurry", "inversion_prompt": "a photo",
                  "inversion_substeps": 2, "inversion_solver": "midpoint", "reference": "separate"}
OTHER_INJECTION = {"features": False, "self_attention": False, "cross_attention": False, "feature_layers": [4, 5],
                   "attention_layers": [4, 5], "feature_steps": 0.3, "attention_steps": 0.2, "qk_mix": "timestep_rate",
                   "feature_site": "output", "reference_model": "style"}
OTHER_STYLEID = {"gamma": 0.5, "tau": 1.0, "adain": False, "layers": [4, 5]}


def variants(config, others: dict) -> dict:
    """{field: the config with that field changed}, every field of the config."""
    assert set(others) == {f.name for f in fields(config)}, "a setting without an other value to test"
    return {name: replace(config, **{name: value}) for name, value in others.items()}


def changed_sampling(pipe: DiffStylerPipeline) -> dict[str, SamplingConfig]:
    changed = variants(SamplingConfig(steps=10), OTHER_SAMPLING)
    if len(pipe.backbone.inversion_solvers) == 1:
        del changed["inversion_solver"]  # a DDIM inversion has one solver
    return changed


def settings(pipe, styles, sampling=SamplingConfig(steps=10), injection=InjectionConfig(), seed=0, composite=True, styleid=None):
    return pipe.pixel_settings(styles, sampling, injection, seed, 64, composite, styleid)


@pytest.mark.parametrize("name", ["tiny", "tiny-flux"])
def test_every_sampling_setting_changes_the_hash_and_the_record_and_those_of_the_inversion_the_key(pipes, lora, name):
    """Caught: a setting missing from the rerun hash (a rerun keeps results made otherwise), from the
    recorded settings, or from the inversion cache's key (a trajectory of other settings reused); and a
    key that changes with what the inversion does not read (the cache never hit). On FLUX.1-dev the
    guidance scale is an input of every pass, the inversion's too, so it is part of the key there."""
    pipe = pipes[name]
    content = Image.open(CONTENT).convert("RGB").resize((64, 48))
    styles = [StyleEntry(lora=str(lora)).resolved()]
    base = settings(pipe, styles)
    for key, sampling in changed_sampling(pipe).items():
        other = settings(pipe, styles, sampling=sampling)
        assert other.rerun_hash("c") != base.rerun_hash("c"), key
        assert other.recorded(content.size) != base.recorded(content.size), key
        reads = key in INVERSION_SAMPLING or (key == "guidance_scale" and pipe.backbone.guidance_embedded)
        assert (other.inversion_key(content).digest() != base.inversion_key(content).digest()) == reads, key
    assert pipe.backbone.guidance_embedded == (name == "tiny-flux")


def test_method_settings_seed_and_styles_change_the_hash_and_the_record_but_not_the_inversion(pipes, lora):
    """Caught: an injection or StyleID setting, the seed, a style's prompt, scale, mask or image, or the
    composite with masks left out of the hash or the record; or any of them in the inversion's key."""
    pipe = pipes["tiny"]
    content = Image.open(CONTENT).convert("RGB").resize((64, 48))
    masked = [StyleEntry(lora=str(lora), mask=MaskSpec(file=str(MASK))).resolved(),
              StyleEntry(image=str(CONTENT), mask=MaskSpec(file=str(MASK), invert=True)).resolved()]
    base = settings(pipe, masked)
    changes = {f"injection.{name}": {"injection": config} for name, config in variants(InjectionConfig(), OTHER_INJECTION).items()}
    changes.update({f"styleid.{name}": {"styleid": config} for name, config in variants(StyleIDConfig(), OTHER_STYLEID).items()})
    changes["seed"] = {"seed": 1}
    changes["composite"] = {"composite": False}
    changes["prompt"] = {"styles": [replace(masked[0], prompt="another"), masked[1]]}
    changes["scale"] = {"styles": [replace(masked[0], scale=0.5), masked[1]]}
    changes["mask"] = {"styles": [replace(masked[0], mask=replace(masked[0].mask, grow=2)), masked[1]]}
    changes["style image"] = {"styles": [masked[0], replace(masked[1], image=str(MASK))]}
    for key, change in changes.items():
        other = settings(pipe, change.pop("styles", masked), **change)
        assert other.rerun_hash("c") != base.rerun_hash("c"), key
        assert other.recorded(content.size) != base.recorded(content.size), key
        assert other.inversion_key(content) == base.inversion_key(content), key


def test_styleid_settings_count_only_where_a_style_is_an_image(pipes, lora):
    """Caught: StyleID's settings in the hash of LoRA-only jobs (every earlier result redone after an
    upgrade, and a StyleID change redoing jobs it cannot change)."""
    pipe = pipes["tiny"]
    styles = [StyleEntry(lora=str(lora)).resolved()]
    other = replace(StyleIDConfig(), gamma=0.5)
    assert settings(pipe, styles, styleid=other).rerun_hash("c") == settings(pipe, styles).rerun_hash("c")
    assert "StyleID" not in settings(pipe, styles).recorded((64, 48))


def test_an_image_not_at_the_settings_resolution_has_no_key(pipes, lora):
    """Caught: a key built for an image of another size than its run's (its VAE tiling read at the wrong size)."""
    styles = [StyleEntry(lora=str(lora)).resolved()]
    with pytest.raises(ValueError, match="not inverted at resolution 64"):
        settings(pipes["tiny"], styles).inversion_key(Image.new("RGB", (128, 96)))
