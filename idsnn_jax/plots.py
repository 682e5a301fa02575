"""Pictures of a run, redrawn after every epoch: learning curves per stage and the student's
firing rate per layer; and one figure comparing several runs (`experiments/summarize.py`).

matplotlib's object API (`Figure`, no pyplot): no display, no global state, safe in threads.
Each stage keeps one colour in every figure (`stage_color`).
"""

from __future__ import annotations

import math
import os
from typing import Any

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from idsnn_jax import files
from idsnn_jax.logs import FIRING_RATE_PREFIX

Records = list[dict[str, Any]]
_STAGE_COLORS = {"teacher": "C0", "student": "C1", "baseline": "C2"}


def stage_color(stage: str, index: int) -> str:
    """The colour of `stage`: fixed for the pipeline's stages, else by `index`."""
    return _STAGE_COLORS.get(stage, f"C{3 + index % 7}")


def curves_figure(stages: dict[str, Records], title: str = "") -> Figure:
    """Test accuracy (%) and test loss per epoch, one line per stage (`stages`: stage ->
    records in epoch order), a star on each stage's best epoch (the first maximum)."""
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_acc, ax_loss = fig.subplots(1, 2)
    for i, (stage, records) in enumerate(stages.items()):
        color = stage_color(stage, i)
        epochs = [int(r["epoch"]) for r in records]
        accuracy = [100 * float(r["test_accuracy"]) for r in records]
        best = accuracy.index(max(accuracy))
        label = f"{stage} (best {accuracy[best]:.2f}% at epoch {epochs[best]})"
        ax_acc.plot(epochs, accuracy, color=color, marker=".", label=label)
        ax_acc.scatter([epochs[best]], [accuracy[best]], color=color, marker="*", s=150, zorder=3)
        loss = [float(r.get("test_loss", math.nan)) for r in records]
        ax_loss.plot(epochs, loss, color=color, marker=".")
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="test loss (cross-entropy)", title="test loss")
    ax_acc.legend(fontsize="small")
    for ax in (ax_acc, ax_loss):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return fig


def firing_rates_figure(record: dict[str, Any], title: str) -> Figure:
    """Horizontal bars: the firing rate (%) of each spiking layer in `record` (its
    `firing_rate/<layer>` entries), in network order, with their mean as a line."""
    layers = sorted(
        (k[len(FIRING_RATE_PREFIX) :] for k in record if k.startswith(FIRING_RATE_PREFIX)),
        key=lambda name: (not name.startswith("stem"), name),  # stem, then stage1, ...
    )
    rates = {name: 100 * float(record[FIRING_RATE_PREFIX + name]) for name in layers}
    fig = Figure(figsize=(7, 0.25 * len(rates) + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.barh(list(rates), list(rates.values()), color=stage_color("student", 0))
    mean = sum(rates.values()) / len(rates)
    ax.axvline(mean, color="k", linestyle="--", linewidth=1, label=f"mean {mean:.1f}%")
    ax.legend(fontsize="small")
    ax.invert_yaxis()  # the stem on top
    ax.set(xlabel="firing rate (% of neurons and time steps)", title=title)
    ax.tick_params(axis="y", labelsize="small")
    return fig


def write_run_plots(workdir: str, stages: dict[str, Records]) -> list[str]:
    """Writes `<workdir>/curves.png` and, once the student has firing rates,
    `<workdir>/firing_rates.png` (its last epoch); returns the paths written."""
    paths = [os.path.join(workdir, "curves.png")]
    save_png(curves_figure(stages, title=os.path.basename(os.path.abspath(workdir))), paths[0])
    student = stages.get("student", [])
    if student and any(k.startswith(FIRING_RATE_PREFIX) for k in student[-1]):
        paths.append(os.path.join(workdir, "firing_rates.png"))
        title = f"student firing rates, epoch {student[-1]['epoch']}"
        save_png(firing_rates_figure(student[-1], title), paths[1])
    return paths


def save_png(fig: Figure, path: str) -> None:
    """`fig` as a PNG at `path`, replaced whole (`files.write_atomic`)."""
    files.write_atomic(path, lambda f: fig.savefig(f, format="png"))


def compare_figure(runs: dict[str, dict[str, Records]]) -> Figure:
    """Test accuracy per epoch of several runs (`runs`: name -> stage -> records) on one
    axis: one line per (run, stage), colour by run, line style by stage."""
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    stage_names = list(dict.fromkeys(s for stages in runs.values() for s in stages))
    for i, (name, stages) in enumerate(runs.items()):
        for stage, records in stages.items():
            ax.plot(
                [int(r["epoch"]) for r in records],
                [100 * float(r["test_accuracy"]) for r in records],
                color=f"C{i % 10}",
                linestyle=styles[stage_names.index(stage) % len(styles)],
                label=f"{name} / {stage}",
            )
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax.grid(alpha=0.3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize="small")
    return fig
