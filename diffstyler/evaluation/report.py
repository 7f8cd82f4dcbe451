"""The reports of `diffstyler test`, written by rank zero into the output folder (atomically):

- `metrics.json`: `lpips`, `fid`, `artfid`, `cfsd`, `csd`, `count` (triples scored), `listed` (triples named
  by the inputs), `networks` (the feature extractor of each metric) and `preprocessing` (the sizes
  the metrics saw); with several runs, one entry of scores and counts per run under `runs`;
- `metrics_per_image.csv`: run, content, style, result, LPIPS, CFSD, CSD, in the inputs' order;
- `metrics_per_style.csv`: run, style, count, mean LPIPS, mean CFSD, mean CSD;
- `metrics.png` (matplotlib, two panels: `plot_panels`): with several runs, LPIPS against FID and
  against CSD per run (the settings compared); with one run, mean LPIPS against mean CFSD and
  against mean CSD per style (FID needs a set of results per point: one style's 20 results against
  its one image say little).

`log_per_image` puts the per-image scores into TensorBoard (a histogram per metric and the table as
text), for the evaluator to call where the run has a TensorBoardLogger.
"""

from __future__ import annotations

import csv
import io
import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from diffstyler.evaluation.metrics import MetricsConfig
from diffstyler.evaluation.networks import CSD_DEFAULT_WEIGHTS
from diffstyler.outputs import atomic_write

PAIR_METRICS = ("lpips", "cfsd", "csd")  # the metrics with a value per result
METRICS_NAME = "metrics.json"
PER_IMAGE_NAME = "metrics_per_image.csv"
PER_STYLE_NAME = "metrics_per_style.csv"
PLOT_NAME = "metrics.png"


def describe_networks(config: MetricsConfig) -> dict[str, str]:
    """Which feature extractor each metric used, for metrics.json."""
    if config.random:
        return {name: f"random (seed {config.seed}): the numbers mean nothing" for name in ("lpips", "fid", "cfsd", "csd")}
    return {
        "lpips": f"AlexNet LPIPS v0.1 ({config.alexnet_weights or 'alexnet-owt-7be5be79.pth'})",
        "fid": f"Inception-v3 pool features, {config.fid_kind} ({config.inception_weights or 'default file'})",
        "cfsd": f"{config.vgg_arch} relu3_1 ({config.vgg_weights or 'default file'})",
        "csd": f"CSD ViT-L/14 style head ({config.csd_weights or CSD_DEFAULT_WEIGHTS})",
    }


def per_image_rows(data, per_image: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
    """One row per scored triple, in the inputs' order (DDP gathers them process by process)."""
    order = per_image["index"].long().argsort()
    rows = []
    for position in order.tolist():
        triple = data.triples[int(per_image["index"][position])]
        rows.append({"run": triple.run, "content": triple.content, "style": triple.style, "style_name": triple.style_name,
                     "result": triple.result, **{metric: float(per_image[metric][position]) for metric in PAIR_METRICS}})
    return rows


def per_style_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["run"], row["style_name"])].append(row)
    return [
        {"run": run, "style": style, "count": len(members),
         **{metric: sum(m[metric] for m in members) / len(members) for metric in PAIR_METRICS}}
        for (run, style), members in groups.items()
    ]


def write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(path, lambda handle: handle.write(text.getvalue().encode("utf-8")))


@dataclass(frozen=True)
class PlotPanel:
    """One panel of metrics.png: LPIPS (content kept: lower is better) against `x_label`, a point
    per run or per style (`points`: label, x, LPIPS)."""

    x_label: str
    points: tuple[tuple[str, float, float], ...]


def plot_panels(runs: dict[str, dict[str, float]], styles: list[dict[str, Any]]) -> tuple[PlotPanel, PlotPanel]:
    """What metrics.png shows: LPIPS against a style measure (FID, or CFSD per style where one run is
    scored: one style's results against its one image are too few for FID) and LPIPS against CSD
    (style similarity, higher is better), a point per run when several are compared, else per style."""
    if len(runs) > 1:
        first = PlotPanel("FID (style images vs results; lower is better)",
                          tuple((name, scores["fid"], scores["lpips"]) for name, scores in runs.items()))
        csd = tuple((name, scores["csd"], scores["lpips"]) for name, scores in runs.items())
    else:
        first = PlotPanel("CFSD (content structure; lower is better)",
                          tuple((row["style"], row["cfsd"], row["lpips"]) for row in styles))
        csd = tuple((row["style"], row["csd"], row["lpips"]) for row in styles)
    return first, PlotPanel("CSD (style similarity; higher is better)", csd)


def write_plot(path: Path, runs: dict[str, dict[str, float]], styles: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display; before pyplot is imported
    from matplotlib import pyplot

    panels = plot_panels(runs, styles)
    figure, all_axes = pyplot.subplots(1, len(panels), figsize=(5 * len(panels), 4), dpi=100)
    for axes, panel in zip(all_axes, panels):
        axes.set_xlabel(panel.x_label)
        axes.set_ylabel("LPIPS (content vs result; lower is better)")
        axes.scatter([x for _, x, _ in panel.points], [y for _, _, y in panel.points])
        for label, x, y in panel.points:
            axes.annotate(Path(label).name, (x, y), fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    pyplot.close(figure)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))


def write_reports(folder: str, data, runs: dict[str, dict[str, float]], rows: list[dict[str, Any]],
                  networks: dict[str, str], preprocessing: str) -> dict[str, Any]:
    """Write every report from the runs' scores and the per-image rows (`per_image_rows`); returns what
    metrics.json holds."""
    folder_path = Path(folder)
    counts = {name: sum(row["run"] == name for row in rows) for name in runs}
    listed = {name: sum(t.run == name for t in data.all_triples) for name in runs}
    entries = {name: {**scores, "count": counts[name], "listed": listed[name]} for name, scores in runs.items()}
    summary = next(iter(entries.values())) if len(entries) == 1 else {"runs": entries}
    summary = {**summary, "networks": networks, "preprocessing": preprocessing}
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(folder_path / METRICS_NAME, lambda handle: handle.write(text.encode("utf-8")))
    write_csv(folder_path / PER_IMAGE_NAME, rows, ["run", "content", "style", "result", *PAIR_METRICS])
    styles = per_style_rows(rows)
    write_csv(folder_path / PER_STYLE_NAME, styles, ["run", "style", "count", *PAIR_METRICS])
    write_plot(folder_path / PLOT_NAME, runs, styles)
    return summary


def log_per_image(experiment, rows: list[dict[str, Any]], labels: dict[str, str], step: int) -> None:
    """Per run (tags `<label>/...`, `labels`: run -> label): a histogram of the per-image LPIPS, one of
    the CFSD and one of the CSD, and the per-image table as a markdown table (TensorBoard's text tab renders it).
    `experiment` is a TensorBoard `SummaryWriter`."""
    for run, label in labels.items():
        mine = [row for row in rows if row["run"] == run]
        if not mine:
            continue
        for metric in PAIR_METRICS:
            experiment.add_histogram(f"{label}/{metric}_per_image", torch.tensor([row[metric] for row in mine]), step)
        experiment.add_text(f"{label}/per_image", markdown_table(mine), step)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Per-image rows as a markdown table: result, content, style, LPIPS, CFSD, CSD."""
    lines = ["| result | content | style | LPIPS | CFSD | CSD |", "|---|---|---|---|---|---|"]
    for row in rows:
        paths = [str(row[key]).replace("|", "\\|") for key in ("result", "content", "style")]  # | ends a cell
        lines.append("| " + " | ".join([*paths, *(f"{row[metric]:.4f}" for metric in PAIR_METRICS)]) + " |")
    return "\n".join(lines)
