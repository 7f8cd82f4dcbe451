"""`diffstyler test` end to end on the smoke config (random feature networks): the results of a
product predict run scored, on one process and on two, a CSV of triples with a missing file, two
runs compared, a missing weights file, and the per-image scores in TensorBoard."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from diffstyler.cli import USER_ERROR_STATUS, main
from diffstyler.evaluation.data import EvaluationDataModule
from diffstyler.results import read_json_lines
from tests.helpers import run_cli_in_process, write_random_lora

REPO_ROOT = Path(__file__).resolve().parents[2]
CONTENT = REPO_ROOT / "data" / "content_shapes.png"
STYLE_IMAGE = REPO_ROOT / "data" / "style_stripes.png"
ENVIRONMENT = {**os.environ, "HF_HUB_OFFLINE": "1", "YOLO_OFFLINE": "1"}

pytestmark = pytest.mark.slow  # every test here runs `diffstyler predict` or `diffstyler test` end to end


@pytest.fixture(scope="module")
def predicted(tmp_path_factory):
    """A product predict run: 3 contents x 2 styles (one LoRA at two scales, trained on data/style_stripes.png)."""
    folder = tmp_path_factory.mktemp("predicted")
    lora = write_random_lora(folder / "lora", seed=6).parent
    info = json.loads((lora / "diffstyler_lora.json").read_text())
    info["style_images"] = [{"path": str(STYLE_IMAGE), "sha256": "", "size": [64, 64]}]  # as `diffstyler fit` records it
    (lora / "diffstyler_lora.json").write_text(json.dumps(info))
    (folder / "photos").mkdir()
    for k in range(3):  # three different contents: every process's share has its own mean
        Image.open(CONTENT).rotate(40 * k).save(folder / "photos" / f"p{k}.png")
    styles = [{"lora": str(lora), "name": "full"}, {"lora": str(lora), "name": "half", "scale": 0.5}]
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", ["diffstyler"])
        main(["predict", "--config", "configs/smoke/batch.yaml", "--data.content", json.dumps([str(folder / "photos")]),
              "--data.styles", json.dumps(styles), "--model.output.folder", str(folder / "run"),
              "--model.inversion_cache", str(folder / "cache"), "--trainer.logger.init_args.save_dir", str(folder / "logs")])
    return folder / "run"


def evaluate_args(out: Path, *extra: str) -> list[str]:
    return ["test", "--config", "configs/smoke/evaluate.yaml", "--model.output", str(out / "evaluation"),
            "--trainer.logger.init_args.save_dir", str(out / "logs"), *extra]


def read_metrics(out: Path) -> dict:
    return json.loads((out / "evaluation" / "metrics.json").read_text())


def per_image(out: Path) -> list[dict]:
    with open(out / "evaluation" / "metrics_per_image.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def tensorboard_events(out: Path) -> EventAccumulator:
    """The TensorBoard events the run wrote under out/logs (the one version folder of `test`)."""
    folders = sorted((out / "logs" / "test").glob("version_*"))
    assert len(folders) == 1, folders
    events = EventAccumulator(str(folders[0]), size_guidance={"histograms": 0, "tensors": 0, "scalars": 0})
    events.Reload()
    return events


@pytest.fixture(scope="module")
def one_process(predicted, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(REPO_ROOT)
        monkeypatch.setattr(sys, "argv", ["diffstyler"])
        main(evaluate_args(out, "--data.results", json.dumps([str(predicted)])))
    return out


def test_the_results_of_a_predict_run_are_scored_with_every_report(predicted, one_process):
    metrics = read_metrics(one_process)
    assert metrics["count"] == metrics["listed"] == 6
    assert metrics["artfid"] == pytest.approx((1 + metrics["lpips"]) * (1 + metrics["fid"]), rel=1e-12)
    assert all(metrics[key] > 0 for key in ("lpips", "fid", "cfsd"))  # the results differ from contents and style
    assert 0 < metrics["csd"] < 1
    assert "mean nothing" in metrics["networks"]["fid"] and "mean nothing" in metrics["networks"]["csd"]
    rows = per_image(one_process)
    jobs = [line for line in read_json_lines(predicted / "results.jsonl")]
    assert [row["result"] for row in rows] == [str(predicted / line["outputs"][0]) for line in jobs]
    assert sum(float(row["lpips"]) for row in rows) / 6 == pytest.approx(metrics["lpips"], rel=1e-6)
    assert sum(float(row["cfsd"]) for row in rows) / 6 == pytest.approx(metrics["cfsd"], rel=1e-6)
    assert sum(float(row["csd"]) for row in rows) / 6 == pytest.approx(metrics["csd"], rel=1e-6)
    with open(one_process / "evaluation" / "metrics_per_style.csv", newline="") as handle:
        styles = list(csv.DictReader(handle))
    assert [(row["style"], row["count"]) for row in styles] == [("full", "3"), ("half", "3")]
    for style in styles:  # each style's mean CSD is the mean of its results'
        mine = [float(row["csd"]) for row in rows if Path(row["result"]).stem.endswith(style["style"])]
        assert len(mine) == 3 and float(style["csd"]) == pytest.approx(sum(mine) / 3, rel=1e-6)
    assert (one_process / "evaluation" / "metrics.png").stat().st_size > 0


def test_two_ddp_processes_give_the_metrics_of_one(predicted, one_process, tmp_path):
    """Catches metric states not synced (each rank's half reported) and triples counted twice."""
    command = [str(Path(sys.executable).parent / "diffstyler"), *evaluate_args(tmp_path, "--data.results", json.dumps([str(predicted)]),
               "--trainer.devices", "2", "--trainer.strategy", "ddp", "--data.batch_size", "2")]
    result = subprocess.run(command, cwd=REPO_ROOT, env=ENVIRONMENT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected, metrics = read_metrics(one_process), read_metrics(tmp_path)
    assert metrics["count"] == 6
    for key in ("lpips", "fid", "artfid", "cfsd", "csd"):
        assert metrics[key] == pytest.approx(expected[key], abs=1e-5, rel=1e-5), key
    assert [row["result"] for row in per_image(tmp_path)] == [row["result"] for row in per_image(one_process)]
    # rank zero logs the per-image scores of both processes, once
    histograms = tensorboard_events(tmp_path).Histograms("test/lpips_per_image")
    assert [event.histogram_value.num for event in histograms] == [6]


def test_a_csv_row_with_a_missing_file_is_reported_and_the_rest_scored(predicted, tmp_path, monkeypatch, capsys, caplog):
    rows = ["content,style,result"] + [f"{CONTENT},{STYLE_IMAGE},{path}" for path in sorted(predicted.glob("p*.png"))]
    rows.append(f"{CONTENT},{STYLE_IMAGE},{tmp_path / 'gone.png'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    status, output = run_cli_in_process(evaluate_args(tmp_path, "--data.results", "null", "--data.pairs", str(tmp_path / "pairs.csv")), monkeypatch, capsys)
    assert status == 0, output[-3000:]
    assert f"{tmp_path / 'gone.png'} is missing" in caplog.text
    assert "scored 6 of 7 results" in output
    assert "test/lpips" not in output  # Lightning's table of the logged metrics: the scored line says them
    assert read_metrics(tmp_path)["count"] == 6 and read_metrics(tmp_path)["listed"] == 7


def test_two_runs_are_compared_in_one_table(predicted, tmp_path, monkeypatch, capsys):
    other = tmp_path / "other_run"
    shutil.copytree(predicted, other)
    status, output = run_cli_in_process(evaluate_args(tmp_path, "--data.results", json.dumps([str(predicted), str(other)])), monkeypatch, capsys)
    assert status == 0, output[-3000:]
    runs = read_metrics(tmp_path)["runs"]
    assert sorted(runs) == sorted([str(predicted), str(other)])
    assert runs[str(predicted)]["lpips"] == pytest.approx(runs[str(other)]["lpips"], rel=1e-6)  # the same images
    assert runs[str(other)]["count"] == 6


def test_a_missing_weights_file_is_one_line_naming_it(predicted, tmp_path, monkeypatch, capsys):
    missing = tmp_path / "vgg19.pth"
    args = evaluate_args(tmp_path, "--data.results", json.dumps([str(predicted)]), "--model.metrics.random", "false",
                     "--model.metrics.vgg_weights", str(missing))
    status, output = run_cli_in_process(args, monkeypatch, capsys)
    assert status == USER_ERROR_STATUS
    lines = [line for line in output.splitlines() if line.startswith("diffstyler test: error: ")]
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in output, output[-2000:]


def test_the_per_image_scores_are_in_tensorboard(one_process):
    """A histogram of the per-image LPIPS, one of the CFSD and one of the CSD, and the per-image table as
    text, read back from the event file. Catches: per-image scores not logged, logged for some images only, or another
    metric's values under a tag."""
    events = tensorboard_events(one_process)
    rows = per_image(one_process)
    for metric in ("lpips", "cfsd", "csd"):
        [event] = events.Histograms(f"test/{metric}_per_image")
        values = [float(row[metric]) for row in rows]
        assert event.histogram_value.num == 6
        assert event.histogram_value.sum == pytest.approx(sum(values), rel=1e-5)
        assert (event.histogram_value.min, event.histogram_value.max) == pytest.approx((min(values), max(values)), rel=1e-5)
    [text] = events.Tensors("test/per_image/text_summary")
    table = text.tensor_proto.string_val[0].decode().splitlines()
    assert table[0].startswith("| result | content | style | LPIPS | CFSD | CSD |") and len(table) == 2 + 6
    for row, line in zip(rows, table[2:]):
        scores = f"| {float(row['lpips']):.4f} | {float(row['cfsd']):.4f} | {float(row['csd']):.4f} |"
        assert line.startswith(f"| {row['result']} |") and line.endswith(scores)
    assert {"test/lpips", "test/csd"} <= set(events.Tags()["scalars"])  # the run's metrics


def test_without_a_logger_nothing_is_written_for_tensorboard(predicted, tmp_path, monkeypatch, capsys):
    """`--trainer.logger false`: the reports, and no event file anywhere (the run starts in tmp_path, so a
    writer falling back to a default folder such as ./runs or ./lightning_logs would land there).
    Catches: a SummaryWriter of its own when the run has no TensorBoardLogger."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["diffstyler"])
    main(["test", "--config", str(REPO_ROOT / "configs/smoke/evaluate.yaml"), "--model.output", str(tmp_path / "evaluation"),
          "--data.results", json.dumps([str(predicted)]), "--trainer.logger", "false"])
    assert read_metrics(tmp_path)["count"] == 6
    assert not list(tmp_path.rglob("*tfevents*"))


def test_a_run_mixing_lora_and_image_styles_pairs_each_result_with_its_style_image(predicted, tmp_path, monkeypatch, capsys):
    """One product run over a LoRA (trained on data/style_stripes.png), the same LoRA given another
    `image`, and a folder of style images alone (StyleID). Catches: an image style's result left
    unscored or paired with a LoRA's image, a LoRA style's own `image` ignored, and results.jsonl
    without each style's method."""
    lora = json.loads((predicted / "results.jsonl").read_text().splitlines()[0])["loras"][0]
    styles = [{"lora": lora, "name": "trained"}, {"lora": lora, "name": "shown", "image": str(CONTENT)},
              {"lora": None, "image": str(REPO_ROOT / "data" / "styles")}]
    status, output = run_cli_in_process(["predict", "--config", "configs/smoke/batch.yaml", "--data.content", json.dumps([str(CONTENT)]),
                                         "--data.styles", json.dumps(styles), "--model.output.folder", str(tmp_path / "run"),
                                         "--model.inversion_cache", str(tmp_path / "cache"), "--model.sampling.steps", "4",
                                         "--model.injection.feature_steps", "2", "--model.injection.attention_steps", "2",
                                         "--trainer.logger", "false"], monkeypatch, capsys)
    assert status == 0, output[-3000:]
    lines = {line["id"]: line for line in read_json_lines(tmp_path / "run" / "results.jsonl")}
    assert {name: (line["methods"], line["loras"], line["images"]) for name, line in lines.items()} == {
        "content_shapes_trained": (["diffstyler"], [lora], [None]),
        "content_shapes_shown": (["diffstyler"], [lora], [str(CONTENT)]),
        "content_shapes_checks": (["styleid"], [None], [str(REPO_ROOT / "data" / "styles" / "checks.png")]),
        "content_shapes_waves": (["styleid"], [None], [str(REPO_ROOT / "data" / "styles" / "waves.png")])}
    triples = EvaluationDataModule(results=[str(tmp_path / "run")]).triples
    assert {Path(triple.result).stem: (triple.style_name, triple.style) for triple in triples} == {
        "content_shapes_trained": ("trained", str(STYLE_IMAGE)), "content_shapes_shown": ("shown", str(CONTENT)),
        "content_shapes_checks": ("checks", str(REPO_ROOT / "data" / "styles" / "checks.png")),
        "content_shapes_waves": ("waves", str(REPO_ROOT / "data" / "styles" / "waves.png"))}
