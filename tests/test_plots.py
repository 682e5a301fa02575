"""The run's pictures: what each figure draws, read back from the figure objects."""

from __future__ import annotations

import numpy as np
import pytest

from idsnn_jax import plots
from idsnn_jax.logs import MetricLogger


def _records(stage, accuracies, rates=None):
    return [
        {
            "stage": stage,
            "epoch": e,
            "test_accuracy": a,
            "test_loss": 2.0 - a,
            **{f"firing_rate/{k}": v * e for k, v in (rates or {}).items()},
        }
        for e, a in enumerate(accuracies, 1)
    ]


STAGES = {
    "teacher": _records("teacher", [0.5, 0.7, 0.6]),
    "student": _records("student", [0.4, 0.65], {"stage1/block0/act1": 0.05, "stem/act": 0.1}),
    "baseline": _records("baseline", [0.3, 0.3]),
}


def test_curves_figure_draws_each_stage_and_marks_its_best_epoch():
    fig = plots.curves_figure(STAGES)
    ax_acc, ax_loss = fig.axes
    assert len(ax_acc.lines) == len(ax_loss.lines) == 3
    np.testing.assert_allclose(ax_acc.lines[0].get_ydata(), [50, 70, 60])
    np.testing.assert_allclose(ax_loss.lines[1].get_ydata(), [1.6, 1.35])
    # One star per stage at its best epoch (the first maximum on ties: baseline epoch 1).
    stars = [c.get_offsets()[0].tolist() for c in ax_acc.collections]
    assert stars == [[2, 70], [2, 65], [1, 30]]
    colors = [line.get_color() for line in ax_acc.lines]
    assert colors == [plots.stage_color(s, i) for i, s in enumerate(STAGES)]


def test_firing_rates_figure_has_one_bar_per_layer():
    fig = plots.firing_rates_figure(STAGES["student"][-1], "x")
    (ax,) = fig.axes
    widths = [bar.get_width() for bar in ax.patches]
    np.testing.assert_allclose(widths, [20.0, 10.0])  # percent, epoch 2 doubles the rates
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["stem/act", "stage1/block0/act1"]  # network order, not the record's
    assert ax.lines[0].get_xdata()[0] == pytest.approx(15.0)  # the mean


def test_compare_figure_has_one_line_per_run_and_stage():
    runs = {"seed1": STAGES, "seed2": {"student": STAGES["student"]}}
    (ax,) = plots.compare_figure(runs).axes
    assert [line.get_label() for line in ax.lines] == [
        "seed1 / teacher",
        "seed1 / student",
        "seed1 / baseline",
        "seed2 / student",
    ]
    assert ax.lines[1].get_linestyle() == ax.lines[3].get_linestyle()  # the same stage
    assert ax.lines[1].get_color() != ax.lines[3].get_color()  # another run


def test_metric_logger_redraws_the_plots_after_every_epoch(tmp_path):
    writer = MetricLogger(str(tmp_path))
    writer.write("teacher", 1, {"test_accuracy": 0.5, "test_loss": 1.0})
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert not (tmp_path / "firing_rates.png").exists()  # no student yet
    writer.write("student", 1, {"test_accuracy": 0.4, "test_loss": 1.2, "firing_rate/a": 0.1})
    writer.close()
    assert (tmp_path / "firing_rates.png").stat().st_size > 0
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
