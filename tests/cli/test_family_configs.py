"""The family configs (configs/sdxl/, configs/sd15/) and their smoke twins (configs/smoke/sdxl/,
configs/smoke/sd15/): they parse with their family's settings, and the smoke twins run end to end,
SDXL through every path SD 2.x has (masks from files and FastSAM, several styles, data.batch_size
on two DDP processes, sweeps, `diffstyler test`)."""

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
from tests.helpers import finished, run_console

REPO_ROOT = Path(__file__).resolve().parents[2]
FAMILIES = {  # family: (model, smoke model, resolution)
    "sdxl": ("stabilityai/stable-diffusion-xl-base-1.0", "tiny-sdxl", 1024),
    "sd15": ("stable-diffusion-v1-5/stable-diffusion-v1-5", "tiny-sd15", 512),
}


def printed(args: list[str], capsys) -> dict:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args + ["--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


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


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_smoke_twins_fit_and_stylize_end_to_end(family, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    logs = ["--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    main(["fit", "--config", f"configs/smoke/{family}/style.yaml", "--model.output_dir", str(tmp_path / "lora"), *logs])
    info = json.loads((tmp_path / "lora" / "diffstyler_lora.json").read_text())
    assert info["model_card"]["base_model"] == {"sdxl": "SDXL", "sd15": "SD 1.x"}[family]
    main(["predict", "--config", f"configs/smoke/{family}/stylize.yaml", "--data.styles", f"[{{lora: {tmp_path / 'lora'}}}]",
          "--model.output.folder", str(tmp_path / "out"), "--model.inversion_cache", str(tmp_path / "cache"), *logs])
    settings = png_settings(tmp_path / "out" / "content_shapes.png")
    expected = {"sdxl": (list(range(1, 9)), list(range(6))), "sd15": (list(range(4, 12)), list(range(3, 12)))}[family]
    assert (settings["Injection"]["feature_layers"], settings["Injection"]["attention_layers"]) == expected


@pytest.fixture(scope="module")
def sdxl_lora(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("sdxl_fit")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", ["diffstyler"])
        main(["fit", "--config", "configs/smoke/sdxl/style.yaml", "--model.output_dir", str(folder / "lora"),
              "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false"])
    return folder / "lora"


@pytest.mark.slow
def test_sdxl_datasets_with_masks_on_two_ddp_processes_then_scored(sdxl_lora, tmp_path):
    """Every image under data/batch/content x two styles, one in a mask file, one in a FastSAM box,
    two jobs per UNet call, on two DDP processes; then `diffstyler test` scores the results."""
    styles = json.dumps([
        {"lora": str(sdxl_lora), "name": "masked", "mask": {"file": "data/content_shapes_mask.png", "feather": 2}},
        {"lora": str(sdxl_lora), "name": "boxed", "scale": 0.5, "mask": {"box": [0, 0, 32, 24]}},
    ])
    out = tmp_path / "out"
    status, output = finished(run_console([
        "predict", "--config", "configs/smoke/sdxl/stylize.yaml", "--config", "configs/smoke/localized.yaml",
        "--model.model.name", "tiny-sdxl", "--data.content", "[data/batch/content]", "--data.styles", styles,
        "--data.batch_size", "2", "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.logger", "false",
        "--model.output.folder", str(out), "--model.inversion_cache", str(tmp_path / "cache")]))
    assert status == 0, output[-3000:]
    jobs = read_json_lines(out / RESULTS_NAME)
    assert len(jobs) >= 3 and all(job["status"] == "done" for job in jobs), jobs
    status, output = finished(run_console([
        "test", "--config", "configs/smoke/evaluate.yaml", "--data.results", json.dumps([str(out)]),
        "--model.output", str(tmp_path / "evaluation"), "--trainer.logger", "false"]))
    assert status == 0, output[-3000:]
    assert json.loads((tmp_path / "evaluation" / "metrics.json").read_text())["count"] == len(jobs)


@pytest.mark.slow
def test_an_sdxl_sweep_makes_one_grid(sdxl_lora, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["predict", "--config", "configs/smoke/sdxl/stylize.yaml", "--data.styles", f"[{{lora: {sdxl_lora}}}]",
          "--model.sweep.feature_steps", "[0, 6]", "--model.sweep.attention_steps", "[0, 5]", "--trainer.logger", "false",
          "--model.output.folder", str(tmp_path / "out"), "--model.inversion_cache", str(tmp_path / "cache")])
    (grid,) = [path for path in (tmp_path / "out").rglob("*.png")]
    cells = png_settings(grid)["Sweep cells"]
    assert len(cells) == 4
