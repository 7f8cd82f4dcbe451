"""The StyleID protocol end to end on its smoke twin (configs/smoke/protocols/styleid.yaml): one LoRA
per style image, every content x every style, then the scores, all from the one file; a rerun of
each stage redoes nothing."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import yaml

import numpy as np
from PIL import Image, ImageOps

from diffstyler.cli import protocol_stage
from diffstyler.cli.command_line import find_subcommand
from diffstyler.cli.compare import comparison_plan
from diffstyler.errors import UserError
from diffstyler.evaluation.comparison import LABEL_HEIGHT, sample
from diffstyler.results import read_json_lines
from tests.helpers import finished, run_cli_in_process, run_console

SMOKE_PROTOCOL = "configs/smoke/protocols/styleid.yaml"
SMOKE_OUTPUTS = "outputs/smoke/styleid"
CONTENTS = ["mirrored", "shapes"]  # data/batch/content/*.png
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

    assert "4 jobs: 4 done" in run_stage(protocol, "predict", monkeypatch, capsys)
    results = [json.loads(line) for line in (out / "stylized" / "results.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in results) == sorted(f"{c}_{s}" for c in CONTENTS for s in STYLES)
    assert all(row["status"] == "done" and row["outputs"] == [f"{row['id']}.png"] for row in results)

    assert "scored 4 of 4 results" in run_stage(protocol, "test", monkeypatch, capsys)
    evaluation = out / "evaluation"
    scores = scores_of(evaluation)
    assert (scores["count"], scores["listed"]) == (4, 4)
    assert scores["artfid"] == pytest.approx((1 + scores["lpips"]) * (1 + scores["fid"]), rel=1e-12)
    with open(evaluation / "metrics_per_image.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    # each result is scored against the image its own LoRA was trained on
    assert sorted((Path(row["result"]).name, row["style"]) for row in rows) == sorted(
        (f"{Path(c).name}_{s}.png", f"data/styles/{s}.png") for c in CONTENTS for s in STYLES)
    with open(evaluation / "metrics_per_style.csv", newline="") as file:
        assert sorted((row["style"], row["count"]) for row in csv.DictReader(file)) == [("checks", "2"), ("waves", "2")]

    lora_files = {path: path.stat().st_mtime_ns for path in (out / "loras").rglob("*.safetensors")}
    assert "2 already trained, 0 to train" in run_stage(protocol, "fit", monkeypatch, capsys)
    assert {path: path.stat().st_mtime_ns for path in lora_files} == lora_files
    assert "4 jobs: 0 done, 4 already done (skipped)" in run_stage(protocol, "predict", monkeypatch, capsys)
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
    assert "4 jobs: 4 done, 0 already done (skipped), 0 failed" in output
    assert sorted(path.relative_to(tmp_path / "styleid" / "stylized").as_posix() for path in (tmp_path / "styleid" / "stylized").rglob("*.png")) == sorted(
        f"{c}_{s}.png" for c in CONTENTS for s in STYLES)


@pytest.mark.slow
def test_the_full_protocol_parses_for_every_stage_and_method(repo_root, monkeypatch, capsys):
    """configs/protocols/styleid.yaml, as printed by each stage: the LoRA folder the fit writes is
    the styles of predict, whose folder is the results of test; StyleID's predict takes the style
    images the LoRAs are fitted on, with no LoRA (a LoRA merged in from DiffStyler's entry would
    make it DiffStyler again), and writes its own folder, which its test scores."""
    printed = {}
    for stage, method in (("fit", None), ("predict", None), ("test", None), ("predict", "styleid"), ("test", "styleid")):
        extra = ["--method", method] if method else []
        status, output = run_cli_in_process([stage, "--config", "configs/protocols/styleid.yaml", *extra, "--print_config"],
                                            monkeypatch, capsys)
        assert status == 0, output
        printed[stage, method] = yaml.safe_load(output[output.index("seed_everything"):])
    fit, predict, test = printed["fit", None], printed["predict", None], printed["test", None]
    assert fit["data"]["one_lora_per_image"] and fit["model"]["output_dir"] == "outputs/styleid/loras"
    assert [style["lora"] for style in predict["data"]["styles"]] == ["outputs/styleid/loras"] and predict["data"]["pairing"] == "product"
    assert predict["model"]["output"]["folder"] == "outputs/styleid/stylized"
    assert test["data"]["results"] == ["outputs/styleid/stylized"] and test["model"]["metrics"]["fid_kind"] == "art"
    styleid_predict, styleid_test = printed["predict", "styleid"], printed["test", "styleid"]
    assert [(style["lora"], style["image"]) for style in styleid_predict["data"]["styles"]] == [(None, fit["data"]["images"][0])]
    assert styleid_predict["model"]["output"]["folder"] == styleid_test["data"]["results"][0] != "outputs/styleid/stylized"
    assert styleid_predict["data"]["content"] == predict["data"]["content"] and styleid_predict["data"]["pairing"] == "product"
    assert styleid_predict["model"]["styleid"] == {"gamma": 0.75, "tau": 1.5, "adain": True, "layers": [7, 8, 9, 10, 11]} or \
        styleid_predict["model"]["styleid"]["layers"] == ["styleid"]
    assert styleid_test["model"]["output"] != test["model"]["output"]


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


def test_a_method_of_a_protocol_changes_its_sections(tmp_path):
    """`--method` picks a method's section: its changes merged key by key, a list replaced whole
    (StyleID's styles must not keep DiffStyler's `lora`), a null stage refused; the file's
    `method` is the default. Catches: the method ignored, lists merged by position, --method left
    for LightningCLI (an unknown option) or read as the subcommand."""
    protocol = tmp_path / "p.yaml"
    protocol.write_text(
        "method: lora\n"
        "methods:\n  lora: {}\n  image:\n    fit: null\n    predict: {model: {output: {folder: b}}, data: {styles: [{image: s}]}}\n"
        "fit:\n  data:\n    images: [a.png]\n"
        "predict:\n  model:\n    output: {folder: a, grid: false}\n  data:\n    styles: [{lora: l, scale: 0.5}]\n")
    section = lambda args, stage: yaml.safe_load(protocol_stage(args, stage)[protocol_stage(args, stage).index(stage) + 2])  # noqa: E731
    assert section(["predict", "--config", str(protocol)], "predict")["data"]["styles"] == [{"lora": "l", "scale": 0.5}]
    for given in (["--method", "image"], ["--method=image"]):
        assert section(["predict", "--config", str(protocol), *given], "predict") == {
            "model": {"output": {"folder": "b", "grid": False}}, "data": {"styles": [{"image": "s"}]}}
    assert "--method" not in protocol_stage(["predict", "--config", str(protocol), "--method", "image"], "predict")
    assert find_subcommand(["--method", "image", "--config", str(protocol), "predict"]) == "predict"
    with pytest.raises(UserError, match="no fit for method image") as caught:
        protocol_stage(["fit", "--config", str(protocol), "--method", "image"], "fit")
    assert caught.value.where == str(protocol)
    with pytest.raises(UserError, match="unknown method 'text'.*lora, image"):
        protocol_stage(["fit", "--config", str(protocol), "--method", "text"], "fit")
    plain = tmp_path / "plain.yaml"
    plain.write_text("trainer:\n  max_steps: 3\n")
    with pytest.raises(UserError, match="--method without a protocol file"):
        protocol_stage(["fit", "--config", str(plain), "--method", "image"], "fit")


def test_compare_checks_the_protocol_before_anything_runs(tmp_path, repo_root):
    """Catches: a comparison of one method, two methods writing one folder (the second would skip
    the first's results as its own), and a compare section without its folder."""
    text = (repo_root / SMOKE_PROTOCOL).read_text()
    plan = comparison_plan(str(repo_root / SMOKE_PROTOCOL))
    assert plan.methods == ["diffstyler", "styleid"] and plan.folders == [f"{SMOKE_OUTPUTS}/stylized", f"{SMOKE_OUTPUTS}/stylized_styleid"]
    assert [command[0] for command in plan.stage_commands()] == ["fit", "predict", "predict", "test"]  # StyleID has no fit
    for change, message in ((("stylized_styleid", "stylized"), "two methods write to one folder"),
                            (("method: diffstyler\nmethods:\n  diffstyler: {}\n", "methods:\n"), "nothing to compare"),
                            (("  output: outputs/smoke/styleid/comparison\n", ""), "no compare.output")):
        broken = tmp_path / "broken.yaml"
        broken.write_text(text.replace(*change))
        with pytest.raises(UserError, match=message):
            comparison_plan(str(broken))


@pytest.mark.slow
def test_compare_runs_both_methods_on_the_same_pairs_and_writes_one_table(tmp_path, repo_root, monkeypatch, capsys):
    """The smoke twin compared end to end: the stages `diffstyler compare` runs (here in this
    process, as its commands say), then its table and grid. Catches: StyleID fitting LoRAs or
    reading them, its results scored against another image than its own style image, the table's
    scores not those of `diffstyler test`, its seconds not those of results.jsonl, and a grid
    with another pair's or another method's images."""
    protocol = protocol_in(tmp_path, repo_root)
    out = tmp_path / "styleid"
    plan = comparison_plan(str(protocol))
    for command in plan.stage_commands():
        status, output = run_cli_in_process(command, monkeypatch, capsys)
        assert status == 0, output[-3000:]
    assert sorted(path.name for path in (out / "loras").iterdir()) == STYLES  # DiffStyler's fit only
    lines = {folder: read_json_lines(Path(folder) / "results.jsonl") for folder in plan.folders}
    styleid = lines[plan.folders[1]]
    assert sorted(line["id"] for line in styleid) == sorted(f"{c}_{s}" for c in CONTENTS for s in STYLES)
    assert all(line["methods"] == ["styleid"] and line["loras"] == [None] and line["images"] == [f"data/styles/{line['styles'][0]}.png"]
               for line in styleid)
    assert all(line["methods"] == ["diffstyler"] and line["loras"][0].startswith(str(out / "loras")) for line in lines[plan.folders[0]])
    with open(out / "comparison" / "evaluation" / "metrics_per_image.csv", newline="") as file:
        scored = {(row["run"], Path(row["result"]).name): row["style"] for row in csv.DictReader(file)}
    assert scored == {(folder, f"{c}_{s}.png"): f"data/styles/{s}.png" for folder in plan.folders for c in CONTENTS for s in STYLES}

    status, output = run_cli_in_process(["compare", "--config", str(protocol), "--report-only"], monkeypatch, capsys)
    assert status == 0, output
    metrics = json.loads((out / "comparison" / "evaluation" / "metrics.json").read_text())["runs"]
    with open(out / "comparison" / "comparison.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(row["method"], row["styles"], row["results"]) for row in rows] == [
        ("DiffStyler", "LoRA", plan.folders[0]), ("StyleID", "image", plan.folders[1])]
    for row, folder in zip(rows, plan.folders):
        scores = ("lpips", "fid", "artfid", "cfsd", "csd")  # CSD too: every score diffstyler test gives a run
        assert {key: float(row[key]) for key in scores} == {key: metrics[folder][key] for key in scores}
        assert float(row["seconds_per_image"]) == pytest.approx(sum(line["seconds"] for line in lines[folder]) / 4)
    fits = [json.loads((out / "loras" / style / "diffstyler_lora.json").read_text())["fit_seconds"] for style in STYLES]
    assert float(rows[0]["style_preparation_seconds"]) == pytest.approx(sum(fits) / 2) and all(seconds > 0 for seconds in fits)
    assert float(rows[1]["style_preparation_seconds"]) == 0.0
    assert "| DiffStyler | LoRA | 4 of 4 |" in output and "| StyleID | image | 4 of 4 |" in output

    grid = np.asarray(Image.open(out / "comparison" / "comparison_grid.png"))
    pairs = sample(sorted((c, s) for c in CONTENTS for s in STYLES), 3)  # the smoke twin's grid_pairs
    result = Image.open(Path(plan.folders[1]) / f"{pairs[2][0]}_{pairs[2][1]}.png")
    shown = [repo_root / "data" / "batch" / "content" / f"{c}.png" for c in CONTENTS] + [repo_root / "data" / "styles" / f"{s}.png" for s in STYLES]
    cell = max(max(Image.open(path).size) for path in shown + [Path(result.filename)])  # the largest image's longest side
    assert grid.shape[0] == LABEL_HEIGHT + 3 * cell
    column = grid.shape[1] // 4
    tile = grid[LABEL_HEIGHT + 2 * cell: LABEL_HEIGHT + 3 * cell, 3 * column + (column - cell) // 2:][:, :cell]
    assert np.array_equal(tile, np.asarray(ImageOps.pad(result.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS, color="white")))


@pytest.mark.slow
def test_compare_runs_each_stage_as_a_process_and_stops_at_a_failing_one(tmp_path, repo_root, monkeypatch, capfd):
    """The stages run as `diffstyler` processes (DDP starts its ranks from their command line).
    Catches: a failing stage's status ignored (the table written from nothing, or from an older
    run), and its own error line hidden."""
    protocol = protocol_in(tmp_path, repo_root)
    protocol.write_text(protocol.read_text().replace("    one_lora_per_image: true", "    one_lora_per_image: true\n    resolutoin: 64"))
    status, output = run_cli_in_process(["compare", "--config", str(protocol)], monkeypatch, capfd)  # the stage's output: fd 2
    assert status == 2, output[-3000:]
    assert "diffstyler compare: diffstyler fit --config" in output
    assert "data.resolutoin" in output  # the stage's own line
    assert output.strip().splitlines()[-1].startswith("diffstyler compare: error: diffstyler fit --method diffstyler ended with status 2")
    assert not (tmp_path / "styleid").exists()
