"""What a finished (or running) training reached, stage by stage, from its `metrics.jsonl`.

`pipeline.run` appends one JSON record per stage-epoch to `<workdir>/metrics.jsonl`; this
reads one or more workdirs and prints, per stage: epochs, best and last test top-1, the
epoch of the best, mean training throughput and the mean firing rate over layers at the
last epoch (spiking stages). `--json` also writes the rows; `--plot` draws every stage of
every workdir on one figure of test accuracy per epoch (e.g. seeds or variants).

  python experiments/summarize.py runs/cifar100_t4 runs/cifar100_t6 --json=summary.json
  python experiments/summarize.py runs/ablation --plot=runs/ablation/compare.png

Conventions:
* An epoch logged twice (a run killed after logging an epoch but before checkpointing it
  redoes that epoch on resume) counts once, with its last record.
* `images_per_sec` is the mean over epochs, leaving out epoch 1 when there are more: the
  first epoch includes compilation (so does the first epoch after a resume, which is kept).
* The best epoch is the first epoch that reached the best test accuracy.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

import common  # beside this script (pytest: pythonpath)
from absl import app, flags

from idsnn_jax.logs import METRICS_FILE, epochs_by_stage, read_records


def summarize_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage (in order of first appearance) from metrics records.

    Accuracies are fractions in [0, 1]; `mean_firing_rate` is the mean of the
    `firing_rate/<layer>` values of the last epoch (None for stages without spikes);
    `train_seconds` sums the epochs' training time (evaluation and checkpoints excluded),
    over every invocation of a resumed run.
    """
    rows = []
    for stage, epochs in epochs_by_stage(records).items():
        best = max(epochs, key=lambda r: r["test_accuracy"])  # max keeps the first maximum
        last = epochs[-1]
        timed = epochs[1:] if len(epochs) > 1 else epochs
        rates = [v for k, v in last.items() if k.startswith("firing_rate/")]
        rows.append(
            {
                "stage": stage,
                "epochs": len(epochs),
                "last_epoch": int(last["epoch"]),
                "best_accuracy": float(best["test_accuracy"]),
                "best_epoch": int(best["epoch"]),
                "last_accuracy": float(last["test_accuracy"]),
                "images_per_sec": _mean([r.get("images_per_sec") for r in timed]),
                "train_seconds": sum(float(r.get("epoch_seconds", 0.0)) for r in epochs),
                "mean_firing_rate": _mean(rates),
            }
        )
    return rows


def _mean(values: list[Any]) -> float | None:
    values = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(values) / len(values) if values else None


def find_workdirs(paths: list[str]) -> list[str]:
    """`paths` with each directory lacking a metrics file replaced by its subdirectories
    (sorted) that have one, so an ablation root summarizes all its variants."""
    out = []
    for path in paths:
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, METRICS_FILE)):
            subdirs = sorted(
                os.path.join(path, d)
                for d in os.listdir(path)
                if os.path.exists(os.path.join(path, d, METRICS_FILE))
            )
            if not subdirs:
                raise FileNotFoundError(f"no {METRICS_FILE} in {path!r} or its subfolders")
            out.extend(subdirs)
        else:
            out.append(path)
    return out


def summarize(paths: list[str]) -> list[dict[str, Any]]:
    """Rows (workdir, stage, ...) for every stage of every workdir in `paths`."""
    rows = []
    for workdir in find_workdirs(paths):
        for row in summarize_records(read_records(workdir)):
            rows.append({"workdir": workdir, **row})
    return rows


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def format_table(rows: list[dict[str, Any]]) -> str:
    """A plain-text table of `summarize` rows (accuracies and firing rates in percent)."""
    header = [
        "workdir",
        "stage",
        "epochs",
        "best top-1",
        "best epoch",
        "last top-1",
        "images/s",
        "firing rate %",
    ]
    lines = [
        [
            r["workdir"],
            r["stage"],
            str(r["epochs"]),
            _pct(r["best_accuracy"]),
            str(r["best_epoch"]),
            _pct(r["last_accuracy"]),
            "-" if r["images_per_sec"] is None else f"{r['images_per_sec']:.1f}",
            _pct(r["mean_firing_rate"]),
        ]
        for r in rows
    ]
    return common.text_table(header, lines)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        raise app.UsageError(
            f"usage: {argv[0]} WORKDIR [WORKDIR ...] [--json=FILE] [--plot=FILE.png]"
        )
    rows = summarize(argv[1:])
    print(format_table(rows))
    if _PLOT.value:
        from idsnn_jax import plots

        runs = {w: epochs_by_stage(read_records(w)) for w in find_workdirs(argv[1:])}
        os.makedirs(os.path.dirname(_PLOT.value) or ".", exist_ok=True)
        plots.compare_figure(runs).savefig(_PLOT.value)
        print(f"wrote {_PLOT.value}", file=sys.stderr)
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {_JSON.value}", file=sys.stderr)


if __name__ == "__main__":  # flags only here, so other scripts and tests can import this
    _JSON = flags.DEFINE_string("json", None, "Also write the rows here as JSON.")
    _PLOT = flags.DEFINE_string("plot", None, "Also draw test accuracy per epoch here (PNG).")
    app.run(main)
