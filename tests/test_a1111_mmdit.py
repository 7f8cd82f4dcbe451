"""SD 3.5 and FLUX.1 results as A1111-Forge writes (and reads back) their `parameters` text:
"Sampler: Euler, Schedule type: Simple", SD 3.5's guidance as the CFG scale, FLUX.1-dev's embedded
guidance as Forge's "Distilled CFG Scale" beside "CFG scale: 1" (FLUX.1 runs no negative rows)."""

from __future__ import annotations

import pytest
from PIL import Image

from diffstyler.backbones import backbone_for
from diffstyler.backbones.mmdit import build_flux, build_sd3
from diffstyler.data.jobs import StyleEntry
from diffstyler.lora import StyleLoRAConfig, add_style_adapter, save_lora, write_lora_info
from diffstyler.outputs import a1111_lora_hash, format_parameters
from tests.a1111 import a1111_lora_hashes, a1111_parse_generation_parameters
from tests.helpers import make_job, make_predictor, randomize_adapter, stylize_one

# What Forge's PNG Info reads back into its UI (sampler, schedule, both guidance sliders).
SAMPLING_KEYS = ("Sampler", "Schedule type", "CFG scale", "Distilled CFG Scale")


@pytest.mark.parametrize("model, expected", [
    ("tiny-flux", {"Sampler": "Euler", "Schedule type": "Simple", "CFG scale": "1.0", "Distilled CFG Scale": "3.5"}),
    ("tiny-flux-schnell", {"Sampler": "Euler", "Schedule type": "Simple", "CFG scale": "1.0"}),
    ("tiny-sd3", {"Sampler": "Euler", "Schedule type": "Simple", "CFG scale": "3.5"}),
])
def test_sampler_and_guidance_read_back_in_a1111_as_forge_writes_them(model, expected):
    """Mistakes caught: "Euler (flow matching)" (no sampler of that name: Forge falls back to its
    default), FLUX.1's distilled guidance written as the CFG scale (Forge would then run real CFG
    with negative rows: another image at twice the cost), the distilled scale missing on dev or
    written for schnell (which reads none)."""
    builders = {"tiny-flux": lambda: build_flux(0), "tiny-flux-schnell": lambda: build_flux(0, guidance=False),
                "tiny-sd3": lambda: build_sd3(0)}
    fields = backbone_for(builders[model]()).a1111_sampling_fields(3.5)
    read = a1111_parse_generation_parameters(format_parameters("a lake", "", {"Steps": 28, **fields, "Seed": 1, "Size": "64x64"}))
    assert {key: read[key] for key in SAMPLING_KEYS if key in read} == expected


@pytest.mark.slow
def test_a_flux_result_reads_in_a1111_with_its_fields_lora_tag_and_hash(tmp_path):
    """A predict result on tiny-flux, its PNG read by A1111's own parsing. Mistakes caught: the
    predictor writing other sampling fields than the backbone's, the tag or the hash missing."""
    pipe = build_flux(0)
    add_style_adapter(pipe.transformer, StyleLoRAConfig(rank=4), "style")
    randomize_adapter(pipe.transformer, "style", seed=1, std=0.05)
    save_lora(pipe.transformer, "style", tmp_path / "ink")
    write_lora_info(tmp_path / "ink", {"prompt": "painting"})

    predictor = make_predictor(tmp_path, model="tiny-flux")
    record = stylize_one(predictor, make_job([StyleEntry(lora=str(tmp_path / "ink"), scale=0.5)]))
    read = a1111_parse_generation_parameters(Image.open(record.outputs[0]).text["parameters"])
    assert read["Prompt"] == "painting <lora:ink:0.5>"
    assert a1111_lora_hashes(read["Lora hashes"]) == {"ink": a1111_lora_hash(tmp_path / "ink" / "pytorch_lora_weights.safetensors")}
    guidance = str(predictor.sampling.guidance_scale)
    assert (read["Sampler"], read["Schedule type"], read["CFG scale"], read["Distilled CFG Scale"]) == ("Euler", "Simple", "1.0", guidance)
    assert read["Steps"] == "6" and read["Model"] == "tiny-flux"
