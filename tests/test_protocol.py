"""The StyleID protocol end to end on its smoke twin (configs/smoke/protocols/styleid.yaml): one LoRA
per style image, every content x every style, then the scores, all from the one file; a rerun of
each stage redoes nothing."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from diffstyler.cli import protocol_stage
from diffstyler.errors import UserError
from tests.helpers import finished, run_cli_in_process, run_console

SMOKE_PROTOCOL = "configs/smoke/protocols/styleid.yaml"
SMOKE_OUTPUTS = "outputs/smoke/styleid"
CONTENTS = ["mirrored", "night/dark", "shapes"]  # data/batch/content
STYLES = ["checks", "waves"]  # data/styles


def protocol_in(tmp_path: Path, repo_root: Path) -> Path:
    """The smoke protocol with its outputs under tmp_path (the anchors carry them to every stage)."""
    text = (repo_root / SMOKE_PROTOCOL).read_text()
    assert text.count(SMOKE_OUTPUTS) >= 5
    protocol = tmp_path / "styleid.yaml"
    protocol.write_text(text.replace(SMOKE_OUTPUTS, str(tmp_path / "styleid")))
    return protocol


def run_stage(protocol: Path, stage: str, monkeypatch, capsys) -> str:
    status, output = run_cli_in_process([stage, "--config", str(protocol)], monkeypatch, capsys)
    assert status == 0, output
    return output


def scores_of(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow
def test_the_smoke_protocol_runs_fit_predict_and_test_from_one_file(tmp_path, repo_root, monkeypatch, capsys):
    """Catches: all styles in one LoRA, a LoRA folder of LoRAs not read as one style each, a
    result scored against another style's image, and a stage that redoes its work on a rerun."""
    protocol = protocol_in(tmp_path, repo_root)
    out = tmp_path / "styleid"
    assert "2 style images: 0 already trained, 2 to train" in run_stage(protocol, "fit", monkeypatch, capsys)
    for style in STYLES:
        info = json.loads((out / "loras" / style / "diffstyler_lora.json").read_text())
        assert [entry["path"] for entry in info["style_images"]] == [f"data/styles/{style}.png"]

    assert "6 jobs: 6 done" in run_stage(protocol, "predict", monkeypatch, capsys)
    results = [json.loads(line) for line in (out / "stylized" / "results.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in results) == sorted(f"{c}_{s}" for c in CONTENTS for s in STYLES)
    assert all(row["status"] == "done" and row["outputs"] == [f"{row['id']}.png"] for row in results)

    assert "scored 6 of 6 results" in run_stage(protocol, "test", monkeypatch, capsys)
    evaluation = out / "evaluation"
    scores = scores_of(evaluation)
    assert (scores["count"], scores["listed"]) == (6, 6)
    assert scores["artfid"] == pytest.approx((1 + scores["lpips"]) * (1 + scores["fid"]), rel=1e-12)
    with open(evaluation / "metrics_per_image.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # each result is scored against the image its own LoRA was trained on
    assert sorted((Path(row["result"]).name, row["style"]) for row in rows) == sorted(
        (f"{Path(c).name}_{s}.png", f"data/styles/{s}.png") for c in CONTENTS for s in STYLES)
    with open(evaluation / "metrics_per_style.csv", newline="") as file:
        assert sorted((row["style"], row["count"]) for row in csv.DictReader(file)) == [("checks", "3"), ("waves", "3")]

    lora_files = {path: path.stat().st_mtime_ns for path in (out / "loras").rglob("*.safetensors")}
    assert "2 already trained, 0 to train" in run_stage(protocol, "fit", monkeypatch, capsys)
    assert {path: path.stat().st_mtime_ns for path in lora_files} == lora_files
    assert "6 jobs: 0 done, 6 already done (skipped)" in run_stage(protocol, "predict", monkeypatch, capsys)
    run_stage(protocol, "test", monkeypatch, capsys)
    again = scores_of(evaluation)
    assert all(again[key] == pytest.approx(scores[key], abs=1e-9) for key in ("lpips", "fid", "artfid", "cfsd", "csd"))


@pytest.mark.slow
def test_a_stage_on_two_ddp_processes_runs_its_own_section(tmp_path, repo_root, monkeypatch, capsys):
    """The full protocol's predict runs on every GPU. Catches: the section picked only for an
    in-process call, not from the console's sys.argv (both ranks would read the whole protocol
    file and refuse the other stages' keys)."""
    protocol = protocol_in(tmp_path, repo_root)
    run_stage(protocol, "fit", monkeypatch, capsys)
    status, output = finished(run_console(["predict", "--config", str(protocol), "--trainer.devices", "2", "--trainer.strategy", "ddp"]))
    assert status == 0, output[-3000:]
    assert "6 jobs: 6 done, 0 already done (skipped), 0 failed" in output
    assert sorted(path.relative_to(tmp_path / "styleid" / "stylized").as_posix() for path in (tmp_path / "styleid" / "stylized").rglob("*.png")) == sorted(
        f"{c}_{s}.png" for c in CONTENTS for s in STYLES)


@pytest.mark.slow
def test_the_full_protocol_parses_for_every_stage(repo_root, monkeypatch, capsys):
    """configs/protocols/styleid.yaml, as printed by each stage: the LoRA folder the fit writes is
    the styles of predict, whose folder is the results of test."""
    printed = {}
    for stage in ("fit", "predict", "test"):
        status, output = run_cli_in_process([stage, "--config", "configs/protocols/styleid.yaml", "--print_config"], monkeypatch, capsys)
        assert status == 0, output
        printed[stage] = output
    assert "one_lora_per_image: true" in printed["fit"] and "output_dir: outputs/styleid/loras" in printed["fit"]
    assert "- lora: outputs/styleid/loras" in printed["predict"] and "pairing: product" in printed["predict"]
    assert "folder: outputs/styleid/stylized" in printed["predict"]
    assert "- outputs/styleid/stylized" in printed["test"] and "fid_kind: art" in printed["test"]


def test_a_stage_sees_only_its_own_section(tmp_path):
    protocol = tmp_path / "p.yaml"
    protocol.write_text("fit:\n  data:\n    images: [a.png]\npredict:\n  model:\n    output:\n      folder: out\n")
    assert protocol_stage(["--config", str(protocol), "fit", "--trainer.max_steps", "3"], "fit") == [
        "fit", "--config", "data:\n  images:\n  - a.png\n", "--trainer.max_steps", "3"]
    assert protocol_stage([f"--config={protocol}", "predict"], "predict") == ["predict", "--config", "model:\n  output:\n    folder: out\n"]
    plain = tmp_path / "plain.yaml"
    plain.write_text("trainer:\n  max_steps: 3\n")
    assert protocol_stage(["--config", str(plain), "fit"], "fit") == ["--config", str(plain), "fit"]
    # after the subcommand too, and first among its configs
    assert protocol_stage(["fit", "--config", str(plain), "--config", str(protocol)], "fit") == [
        "fit", "--config", "data:\n  images:\n  - a.png\n", "--config", str(plain)]
    with pytest.raises(UserError, match="no test section") as caught:
        protocol_stage(["--config", str(protocol), "test"], "test")
    assert caught.value.where == str(protocol)
