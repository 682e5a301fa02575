"""What a run says on the console: one line of key settings before it starts, the table of
what each stage reached when it ends, and what to do next.

The whole config is in `<workdir>/config.json`; the console gets `config_line`. The closing
table (`stage_rows`, `format_rows`) is computed from the records of `<workdir>/metrics.jsonl`
alone, so it is the same after a resume and for a finished run read back later:
- top-1: the stage's best test accuracy (the epoch kept as best; the first if tied);
- vs baseline: top-1 minus the baseline stage's best, in points;
- epochs to baseline: the first epoch whose test accuracy reaches the baseline's best;
- firing rate: the mean over spiking layers of `firing_rate/<layer>` at the best epoch;
- energy: the estimated energy of one test image's forward pass at the best epoch
  (`energy.py`: MACs and SOPs times their per-operation costs), and its ratio to the teacher's.
A column without its data (no baseline stage, no teacher stage, energy off) shows `-`.
"""

from __future__ import annotations

import os
from typing import Any

import ml_collections

from idsnn_jax.logs import epochs_by_stage, mean_firing_rate


def _budget(n: int | None) -> str:
    return "all" if n is None else str(n)


def config_line(config: ml_collections.ConfigDict, workdir: str) -> str:
    """One line of the settings that decide what a run is; the rest is in config.json."""
    from idsnn_jax.plan import train_examples

    teacher, student = config.teacher, config.student
    method = " + ".join(
        name for name, on in (("init", config.init_from_teacher), ("KD", config.distill)) if on
    )
    parts = [
        f"{config.dataset}, seed {config.seed}, batch {config.batch_size}",
        f"teacher {teacher.model} x{teacher.width}: {teacher.num_epochs} epoch(s) on "
        f"{_budget(train_examples(config, 'teacher'))} images"
        if config.init_from_teacher or config.distill
        else "no teacher",
        f"student {student.model} x{student.width} T={student.time_steps}: "
        f"{student.num_epochs} epoch(s) on {_budget(train_examples(config, 'student'))} images"
        f" ({method or 'no init, no KD'})",
    ]
    if config.compare_baseline:
        parts.append("baseline SNN (no init, no KD) alike")
    return "; ".join(parts) + f". All settings: {os.path.join(workdir, 'config.json')}"


def stage_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stage (in order of first appearance) of a run's metrics records.

    Accuracies and firing rates are fractions; `gain` is in fraction points (None without a
    baseline stage); `epochs_to_baseline` is None when the baseline's best was not reached;
    `energy_uj` is per test image (None when energy was not counted) and `energy_ratio`
    divides it by the teacher stage's (None without one).
    """
    stages = epochs_by_stage(records)
    best = {s: max(epochs, key=lambda r: r["test_accuracy"]) for s, epochs in stages.items()}
    target = best["baseline"]["test_accuracy"] if "baseline" in best else None
    teacher_energy = best["teacher"].get("test_energy_uj") if "teacher" in best else None
    rows = []
    for stage, epochs in stages.items():
        record = best[stage]
        reached = (
            [int(r["epoch"]) for r in epochs if r["test_accuracy"] >= target]
            if target is not None
            else []
        )
        energy_uj = record.get("test_energy_uj")
        rows.append(
            {
                "stage": stage,
                "epochs": len(epochs),
                "best_epoch": int(record["epoch"]),
                "top1": float(record["test_accuracy"]),
                "gain": None if target is None else float(record["test_accuracy"]) - target,
                "epochs_to_baseline": reached[0] if reached else None,
                "firing_rate": mean_firing_rate(record),
                "energy_uj": energy_uj,
                "energy_ratio": (
                    energy_uj / teacher_energy if energy_uj and teacher_energy else None
                ),
            }
        )
    return rows


def format_rows(rows: list[dict[str, Any]]) -> str:
    """`stage_rows` as a plain-text table (percentages with 2 decimals)."""
    dash = lambda v, fmt: "-" if v is None else fmt(v)
    header = [
        "stage",
        "top-1 %",
        "vs baseline",
        "epochs to baseline",
        "firing rate %",
        "energy uJ/image",
        "vs teacher",
    ]
    lines = [
        [
            r["stage"],
            f"{100 * r['top1']:.2f}",
            "-" if r["stage"] == "baseline" else dash(r["gain"], lambda g: f"{100 * g:+.2f}"),
            dash(r["epochs_to_baseline"], str) if r["gain"] is not None else "-",
            dash(r["firing_rate"], lambda f: f"{100 * f:.2f}"),
            dash(r["energy_uj"], lambda e: f"{e:.3g}"),
            dash(r["energy_ratio"], lambda x: f"{x:.2f}x"),
        ]
        for r in rows
    ]
    return text_table(header, lines)


def text_table(header: list[str], lines: list[list[str]]) -> str:
    """Left-aligned columns under `header` and a rule (for the console)."""
    widths = [max(len(x) for x in col) for col in zip(header, *lines, strict=True)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()
    return "\n".join([fmt(header), fmt(["-" * w for w in widths])] + [fmt(x) for x in lines])


def next_steps(config: ml_collections.ConfigDict, workdir: str) -> str:
    """Where the plots are and, after Fashion-MNIST, the commands of the paper's runs."""
    path = lambda name: os.path.join(workdir, name)
    lines = [
        f"plots: {path('curves.png')}  {path('firing_rates.png')}",
        f"records: {path('metrics.jsonl')}  {path('summary.json')}  (TensorBoard: "
        f"{path('tensorboard')})",
    ]
    if config.dataset == "fashion_mnist":
        lines += [
            "next, the paper's runs on a GPU (data: README, 'CIFAR: the paper's experiments'):",
            "  python -m idsnn_jax.main --config=configs/cifar100.py --workdir=runs/c100_t4",
            "  python -m idsnn_jax.main --config=configs/cifar10.py --workdir=runs/c10_t4",
            "  python experiments/paper_study.py --config=configs/cifar100.py "
            "--root=runs/c100_study --config.student.time_steps=6 --seeds=0,1,2 "
            "--schedules=20:60,10:20   # the ablation and convergence study",
        ]
    return "\n".join(lines)
