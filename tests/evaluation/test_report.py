"""metrics.png's panels, from the scores of the runs and the per-style means."""

from __future__ import annotations

import numpy as np
from PIL import Image

from diffstyler.evaluation.report import plot_panels, write_plot

STYLES = [{"run": "out/a", "style": "data/styles/waves.png", "count": 3, "lpips": 0.4, "cfsd": 0.2, "csd": 0.7},
          {"run": "out/a", "style": "data/styles/checks.png", "count": 3, "lpips": 0.5, "cfsd": 0.3, "csd": 0.1}]
RUNS = {"out/a": {"lpips": 0.45, "fid": 30.0, "artfid": 45.0, "cfsd": 0.25, "csd": 0.4},
        "out/b": {"lpips": 0.35, "fid": 40.0, "artfid": 55.0, "cfsd": 0.15, "csd": 0.6}}


def test_one_run_is_plotted_per_style_against_cfsd_and_against_csd():
    """Catches: CFSD plotted in the CSD panel (or the reverse), the axes swapped, and one run's
    single point plotted where its styles are the points."""
    cfsd, csd = plot_panels({"out/a": RUNS["out/a"]}, STYLES)
    assert cfsd.x_label.startswith("CFSD") and csd.x_label.startswith("CSD")
    assert cfsd.points == (("data/styles/waves.png", 0.2, 0.4), ("data/styles/checks.png", 0.3, 0.5))
    assert csd.points == (("data/styles/waves.png", 0.7, 0.4), ("data/styles/checks.png", 0.1, 0.5))


def test_several_runs_are_plotted_per_run_against_fid_and_against_csd(tmp_path):
    """Catches: the styles plotted when runs are compared, CFSD in place of FID, and a figure
    without its CSD panel (two panels side by side: twice as wide as tall, and more)."""
    fid, csd = plot_panels(RUNS, STYLES)
    assert fid.x_label.startswith("FID") and fid.points == (("out/a", 30.0, 0.45), ("out/b", 40.0, 0.35))
    assert csd.x_label.startswith("CSD") and csd.points == (("out/a", 0.4, 0.45), ("out/b", 0.6, 0.35))
    write_plot(tmp_path / "metrics.png", RUNS, STYLES)
    image = np.asarray(Image.open(tmp_path / "metrics.png"))
    assert image.shape[1] == 2 * 500 and image.shape[0] == 400
