"""`diffstyler export` and `diffstyler fit --model.export_kohya true`: our LoRAs in the kohya / A1111 layout."""

from __future__ import annotations

import json
import sys

import pytest
from safetensors import safe_open

from diffstyler.cli import main
from diffstyler.export import exported_lora_hash
from diffstyler.data.jobs import StyleEntry
from diffstyler.outputs import a1111_lora_hash, read_parameters
from tests.a1111 import a1111_lora_hashes
from tests.helpers import REPO_ROOT, make_job, make_predictor, stylize_one

LORA = REPO_ROOT / "tests" / "reference" / "smoke" / "lora"


def run(args, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_export_writes_the_kohya_file_and_names_its_a1111_hash(tmp_path, monkeypatch, capsys):
    """Caught: the subcommand not reaching `export_lora`, or another file's hash in its line."""
    output = tmp_path / "mine.safetensors"
    status, err = run(["export", "--lora", str(LORA), "--output", str(output)], monkeypatch, capsys)
    assert status == 0 and output.is_file()
    with safe_open(str(output), framework="pt") as file:
        assert all(key.startswith("lora_unet_") for key in file.keys())
        assert file.metadata()["ss_output_name"] == "mine"
    assert err.strip() == f"diffstyler export: kohya LoRA written to {output} (A1111 hash {a1111_lora_hash(output)})"
    assert a1111_lora_hash(output) == exported_lora_hash(LORA)


@pytest.mark.parametrize("args, line", [
    (["--lora", "nowhere", "--output", "x.safetensors"], "diffstyler export: error: LoRA not found (--lora)"),
    (["--lora", str(LORA), "--output", "x.safetensors", "--format", "a1111"], "diffstyler export: error: unknown export format (--format)"),
    (["--lora", str(LORA), "--output", "x.safetensors", "--format", "comfyui"], "diffstyler export: error: LoRA cannot be exported (--lora)"),
])
def test_export_errors_are_one_line(args, line, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, err = run(["export", *args], monkeypatch, capsys)
    assert status == 2 and err.strip().startswith(line) and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_export_writes_a_flux_lora_in_comfyuis_layout(tmp_path, monkeypatch, capsys):
    """Caught: --format not reaching `export_lora` (the kohya file written instead)."""
    from diffstyler.backbones.mmdit import build_flux
    from diffstyler.lora import StyleLoRAConfig, add_style_adapter, save_lora

    transformer = build_flux(0).transformer
    add_style_adapter(transformer, StyleLoRAConfig(rank=4), "style")
    save_lora(transformer, "style", tmp_path / "flux")
    output = tmp_path / "flux.safetensors"
    status, err = run(["export", "--lora", str(tmp_path / "flux"), "--format", "comfyui", "--output", str(output)], monkeypatch, capsys)
    assert status == 0 and err.strip().startswith(f"diffstyler export: comfyui LoRA written to {output}")
    with safe_open(str(output), framework="pt") as file:
        assert "diffusion_model.single_blocks.3.linear1.lora_down.weight" in file.keys()


def test_an_abbreviated_export_option_is_refused(monkeypatch, capsys):
    status, err = run(["export", "--lor", str(LORA), "--output", "x.safetensors"], monkeypatch, capsys)
    assert status == 2 and "--lora" in err


@pytest.mark.slow
def test_fit_with_export_kohya_writes_both_files_and_a_model_card(tmp_path, monkeypatch, capsys):
    """Caught: the option ignored; a model card without the trigger prompt or the image's hash."""
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["fit", "--config", "configs/smoke/style.yaml", "--model.output_dir", str(tmp_path / "stripes"), "--model.export_kohya", "true",
          "--trainer.logger", "false", "--trainer.callbacks", "[]", "--trainer.enable_checkpointing", "false",
          "--trainer.enable_progress_bar", "false"])
    assert (tmp_path / "stripes" / "pytorch_lora_weights.safetensors").is_file()
    assert (tmp_path / "stripes" / "stripes.safetensors").is_file()
    info = json.loads((tmp_path / "stripes" / "diffstyler_lora.json").read_text())
    card = info["model_card"]
    assert card["type"] == "LORA" and card["trigger_words"] == ["painting of <sss>"] and card["rank"] == 4 and card["steps"] == 4
    assert card["training_images_sha256"] == [info["style_images"][0]["sha256"]] and card["base_model_name"] == "tiny"
    # A1111 loads the kohya file: a result made with this LoRA names its hash (not the diffusers file's)
    record = stylize_one(make_predictor(tmp_path, grid=False), make_job([StyleEntry(lora=str(tmp_path / "stripes"))]))
    hashes = a1111_lora_hashes(read_parameters(record.outputs[0])["Lora hashes"])
    assert hashes == {"stripes": a1111_lora_hash(tmp_path / "stripes" / "stripes.safetensors")}
    assert hashes["stripes"] != a1111_lora_hash(tmp_path / "stripes" / "pytorch_lora_weights.safetensors")
