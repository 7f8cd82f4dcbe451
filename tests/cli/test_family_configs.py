"""The family configs (configs/sdxl/, configs/sd15/, configs/sd3/, configs/flux/) and their smoke
twins (configs/smoke/<family>/): they parse with their family's settings, and the smoke twins run
end to end, SDXL and the transformers through every path SD 2.x has (masks from files and FastSAM,
several styles, data.batch_size, sweeps, `diffstyler test`). Every command runs in this process: CLI subprocesses cost seconds of
imports each, and the multi-process paths do not depend on the family (tests/test_cli_batch.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from diffstyler.cli import main
from diffstyler.outputs import SETTINGS_KEY
from diffstyler.results import RESULTS_NAME, read_json_lines

REPO_ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {  # family: (model, smoke model, resolution)
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "tiny-sdxl", 1024),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny-sd15", 512),
    "sd3": ("stabilityai/stable-diffusion-3.5-medium", "tiny-sd3", 1024),
    "flux": ("black-forest-labs/FLUX.1-dev", "tiny-flux", 1024),
}
# The layers the default rules give on each smoke model: (features, attention)
SMOKE_LAYERS = {"sdxl": (list(range(1, 9)), list(range(6))), "sd15": (list(range(4, 12)), list(range(3, 12))),
                "sd3": ([4, 5], [3]), "flux": ([4, 5], [3])}


def printed(args: list[str], capsys) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_configs_parse_with_their_familys_model_resolution_and_layer_rules(family, capsys, monkeypatch):
    """Caught: a typo in a config (an unknown key fails the parse), a config naming another family's
    model or resolution, or fixed SD layer numbers (which SDXL's decoder refuses)."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    model, tiny, resolution = FAMILIES[family]
    for folder, name, side in ((f"configs/{family}", model, resolution), (f"configs/smoke/{family}", tiny, 64)):
        fit = printed(["fit", "--config", f"{folder}/style.yaml"], capsys)
        predict = printed(["predict", "--config", f"{folder}/stylize.yaml"], capsys)
        assert fit["model"]["model"]["name"] == predict["model"]["model"]["name"] == name
        assert fit["data"]["resolution"] == predict["data"]["resolution"] == side
        assert predict["model"]["injection"]["feature_layers"] == ["paper"]
        assert predict["model"]["injection"]["attention_layers"] == ["all"]
        assert predict["data"]["styles"][0]["lora"] == fit["model"]["output_dir"]


def png_settings(path: Path) -> dict:
    with Image.open(path) as image:
        return json.loads(image.text[SETTINGS_KEY])


def run_main(args: list[str]) -> None:
    """`diffstyler <args>` in this process, from the repository root (the configs' relative paths)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", ["diffstyler"])
        main(args)


@pytest.fixture(scope="module")
def smoke_fit(tmp_path_factory):
    """`diffstyler fit` with a family's smoke twin (its checkpoints and previews included), once per
    family for this module: the LoRA folder it writes."""
    folders: dict[str, Path] = {}

    def fit(family: str) -> Path:
        if family not in folders:
            folder = tmp_path_factory.mktemp(f"{family}_fit")
            run_main(["fit", "--config", f"configs/smoke/{family}/style.yaml", "--model.output_dir", str(folder / "lora"),
                      "--trainer.logger.init_args.save_dir", str(folder / "logs")])
            folders[family] = folder / "lora"
        return folders[family]

    return fit


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoke_twins_fit_and_stylize_end_to_end(family, smoke_fit, tmp_path):
    """Caught: a smoke twin that does not run (a key its family's model refuses), a LoRA recorded
    for another family, or the layer rules resolved on SD's map for SDXL (features 4-11)."""
    lora = smoke_fit(family)
    info = json.loads((lora / "diffstyler_lora.json").read_text())
    assert info["model_card"]["base_model"] == {"sdxl": "SDXL", "sd15": "SD 1.x", "sd3": "SD 3.5", "flux": "FLUX.1"}[family]
    run_main(["predict", "--config", f"configs/smoke/{family}/stylize.yaml", "--data.styles", f"[{{lora: {lora}}}]",
              "--model.output.folder", str(tmp_path / "out"), "--model.inversion_cache", str(tmp_path / "cache"),
              "--trainer.logger", "false"])
    settings = png_settings(tmp_path / "out" / "content_shapes.png")
    assert (settings["Injection"]["feature_layers"], settings["Injection"]["attention_layers"]) == SMOKE_LAYERS[family]
    steps = settings["Sampling"]["steps"]  # the windows were fractions: the paper's 0.6 and 0.5 of the steps
    assert (settings["Injection"]["feature_steps"], settings["Injection"]["attention_steps"]) == (round(0.6 * steps), round(0.5 * steps))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "sd3", "flux"])
def test_a_dataset_with_masks_in_batches_then_scored(family, smoke_fit, tmp_path):
    """Every image under data/batch/content (two sizes) x two styles, one in a mask file, one in a
    FastSAM box, one job per (content, style), two jobs per call; then `diffstyler test` scores the
    six results. Caught: an SDXL or transformer path that a batch of jobs or a masked style breaks
    (time ids, pooled embeddings or token packing not following the rows), or results the scorer
    cannot read."""
    lora = smoke_fit(family)
    styles = json.dumps([
        {"lora": str(lora), "name": "masked", "mask": {"file": "data/content_shapes_mask.png", "feather": 2}},
        {"lora": str(lora), "name": "boxed", "scale": 0.5, "mask": {"box": [0, 0, 32, 24]}},
    ])
    out = tmp_path / "out"
    run_main(["predict", "--config", f"configs/smoke/{family}/stylize.yaml", "--config", "configs/smoke/localized.yaml",
              "--model.model.name", FAMILIES[family][1], "--data.content", "[data/batch/content]", "--data.styles", styles,
              "--data.pairing", "product", "--data.batch_size", "2", "--trainer.logger", "false",
              "--model.sampling.steps", "4", "--model.injection.feature_steps", "3", "--model.injection.attention_steps", "2",
              "--model.output.folder", str(out), "--model.inversion_cache", str(tmp_path / "cache")])
    jobs = read_json_lines(out / RESULTS_NAME)
    assert len(jobs) == 6 and all(job["status"] == "done" for job in jobs), jobs
    run_main(["test", "--config", "configs/smoke/evaluate.yaml", "--data.results", json.dumps([str(out)]),
              "--model.output", str(tmp_path / "evaluation"), "--trainer.logger", "false"])
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["count"] == len(jobs)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_a_sweep_makes_one_grid(family, smoke_fit, tmp_path):
    """Caught: a sweep that SDXL's conditioning or a transformer's breaks (each cell denoises the
    job's inversion again), or cells that all give one image."""
    run_main(["predict", "--config", f"configs/smoke/{family}/stylize.yaml", "--data.styles", f"[{{lora: {smoke_fit(family)}}}]",
              "--model.sampling.steps", "4", "--model.injection.feature_steps", "3", "--model.injection.attention_steps", "2",
              "--model.sweep.feature_steps", "[0, 3]", "--model.output.grid", "false", "--trainer.logger", "false",
              "--model.output.folder", str(tmp_path / "out"), "--model.inversion_cache", str(tmp_path / "cache")])
    (grid,) = [path for path in (tmp_path / "out").rglob("*.png")]
    cells = png_settings(grid)["Sweep cells"]
    assert [cell["feature_steps"] for cell in cells] == [0, 3]
    assert cells[0]["Content SSIM"] != cells[1]["Content SSIM"]  # each cell its own denoising
