"""Tables 3 and 4 and Fig. 5 of the paper from the runs of `paper_study.py`, over seeds.

Reads `<root>/seed_<s>/{teacher_run,baseline,init_only,kd_only,idsnn,idsnn_lr<i>_e<e>}`
(each a workdir with `metrics.jsonl`) and writes, under `out`:
* `table3.{md,json,png}`: the ablation, best and last top-1 as mean ± sample std over seeds,
  each variant's gain over the baseline of the same seed, and the teacher beside it;
* `table4.{md,json,png}`: convergence, the first epoch at which each run reaches its seed's
  baseline best (the target), under the reference schedule and the shorter ones;
* `curves.json`: every run's per-epoch record and wall seconds, per seed;
* `fig5.png`: test accuracy and test loss per epoch, IDSNN against the baseline (mean over
  seeds, band = min..max).
Accuracies in the tables are percentages; in the JSON, fractions.
"""

from __future__ import annotations

import json
import os
import re
import statistics
from typing import Any

import ablation
import common
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from idsnn_jax.logs import epochs_by_stage, read_records  # noqa: E402

# The paper's Table 4 (CIFAR-100, T=6): top-1 % and the epoch it was reached.
PAPER_TABLE4 = {
    "baseline": "71.31 at epoch 192",
    "idsnn_lr20_e60": "74.45 at epoch 54",
    "idsnn_lr10_e20": "71.37 at epoch 14",
}


def _curve(workdir: str, stage: str) -> list[dict[str, float]]:
    """Per epoch of `stage`: epoch, test accuracy, test loss, train loss, lr."""
    keys = ("epoch", "test_accuracy", "test_loss", "train_loss", "lr")
    records = epochs_by_stage(read_records(workdir)).get(stage, [])
    return [{k: r[k] for k in keys if k in r} for r in records]


def _wall(workdir: str) -> float | None:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("wall_seconds")


def collect(root: str, runs: list[str]) -> dict[int, dict[str, Any]]:
    """seed -> {'teacher': curve, '<run>': curve, 'wall': {run: seconds}} for every
    `<root>/seed_<s>` whose `runs` have all finished (written `summary.json`)."""
    seeds = {}
    for name in sorted(os.listdir(root)):
        match = re.fullmatch(r"seed_(\d+)", name)
        if not match:
            continue
        sroot = os.path.join(root, name)
        teacher_dir = os.path.join(sroot, ablation.TEACHER_DIR)
        wall = {r: _wall(os.path.join(sroot, r)) for r in [*runs, ablation.TEACHER_DIR]}
        if any(wall[run] is None for run in runs):
            continue  # a run without summary.json has not finished
        curves = {run: _curve(os.path.join(sroot, run), "student") for run in runs}
        seeds[int(match.group(1))] = {
            "teacher": _curve(teacher_dir, "teacher"),
            **curves,
            "wall": wall,
        }
    return dict(sorted(seeds.items()))


def _pm(stats: dict[str, float]) -> str:
    return f"{100 * stats['mean']:.2f} ± {100 * stats['std']:.2f}"


def _best(curve: list[dict[str, float]]) -> tuple[float, int]:
    best = max(curve, key=lambda r: r["test_accuracy"])  # the first of ties
    return best["test_accuracy"], int(best["epoch"])


def reach_epoch(curve: list[dict[str, float]], target: float) -> int | None:
    """The first epoch whose test accuracy is >= target, or None."""
    return next((int(r["epoch"]) for r in curve if r["test_accuracy"] >= target), None)


def teacher_stats(seeds: dict[int, dict[str, Any]]) -> dict[str, float]:
    return common.mean_std([_best(s["teacher"])[0] for s in seeds.values()])


def table3(seeds: dict[int, dict[str, Any]], paper: bool) -> dict[str, Any]:
    rows = []
    for variant, (init, kd) in ablation.VARIANTS.items():
        best = [_best(s[variant])[0] for s in seeds.values()]
        gain = [_best(s[variant])[0] - _best(s["baseline"])[0] for s in seeds.values()]
        rows.append(
            {
                "variant": variant,
                "init_from_teacher": init,
                "distill": kd,
                "best": common.mean_std(best),
                "last": common.mean_std([s[variant][-1]["test_accuracy"] for s in seeds.values()]),
                "gain_over_baseline": common.mean_std(gain),
                "best_per_seed": best,
                "best_epoch_per_seed": [_best(s[variant])[1] for s in seeds.values()],
                "paper": ablation.PAPER[variant] if paper else None,
            }
        )
    return {"seeds": list(seeds), "teacher_best": teacher_stats(seeds), "rows": rows}


def table4(seeds: dict[int, dict[str, Any]], schedules: list[str], paper: bool) -> dict[str, Any]:
    """Rows for the baseline and IDSNN under the reference schedule, then each shorter one;
    the target of a seed is its baseline's best test accuracy."""
    targets = {seed: _best(s["baseline"])[0] for seed, s in seeds.items()}
    rows = []
    for run in ["baseline", "idsnn", *schedules]:
        reach = [reach_epoch(s[run], targets[seed]) for seed, s in seeds.items()]
        rows.append(
            {
                "run": run,
                "epochs": len(next(iter(seeds.values()))[run]),
                "best": common.mean_std([_best(s[run])[0] for s in seeds.values()]),
                "reach_epoch_per_seed": reach,
                "accuracy_per_epoch": _mean_curve(seeds, run, "test_accuracy")[1],
                "paper": PAPER_TABLE4.get(run) if paper else None,
            }
        )
    return {
        "seeds": list(seeds),
        "target_per_seed": list(targets.values()),
        "teacher_best": teacher_stats(seeds),
        "rows": rows,
    }


def table3_markdown(t: dict[str, Any]) -> str:
    header = [
        "variant",
        "init",
        "KD",
        "best top-1",
        "last top-1",
        "gain over baseline",
        "best per seed",
        "paper",
    ]
    yes = lambda b: "yes" if b else "no"
    lines = [
        [
            r["variant"],
            yes(r["init_from_teacher"]),
            yes(r["distill"]),
            _pm(r["best"]),
            _pm(r["last"]),
            f"{100 * r['gain_over_baseline']['mean']:+.2f} ± "
            f"{100 * r['gain_over_baseline']['std']:.2f}",
            " / ".join(f"{100 * v:.2f}" for v in r["best_per_seed"]),
            "-" if r["paper"] is None else f"{r['paper']:.2f}",
        ]
        for r in t["rows"]
    ]
    return (
        common.markdown_table(header, lines) + f"\nTeacher (best top-1): {_pm(t['teacher_best'])}; "
        f"seeds {', '.join(map(str, t['seeds']))}; mean ± sample std.\n"
    )


def table4_markdown(t: dict[str, Any]) -> str:
    header = [
        "run",
        "epochs",
        "best top-1",
        "top-1 per epoch (mean)",
        "epoch reaching the baseline's best, per seed",
        "paper",
    ]
    lines = [
        [
            r["run"],
            str(r["epochs"]),
            _pm(r["best"]),
            " / ".join(f"{100 * v:.2f}" for v in r["accuracy_per_epoch"]),
            " / ".join("-" if e is None else str(e) for e in r["reach_epoch_per_seed"]),
            r["paper"] or "-",
        ]
        for r in t["rows"]
    ]
    targets = " / ".join(f"{100 * v:.2f}" for v in t["target_per_seed"])
    return (
        common.markdown_table(header, lines) + f"\nTarget per seed (baseline best): {targets}; "
        f"teacher {_pm(t['teacher_best'])}; '-': not reached.\n"
    )


def _mean_curve(seeds: dict[int, Any], run: str, key: str) -> tuple[list, list, list, list]:
    """(epochs, mean, min, max) of `key` over seeds, on the epochs every seed has."""
    n = min(len(s[run]) for s in seeds.values())
    values = [[s[run][i][key] for s in seeds.values()] for i in range(n)]
    epochs = [seeds[next(iter(seeds))][run][i]["epoch"] for i in range(n)]
    return (
        epochs,
        [statistics.fmean(v) for v in values],
        [min(v) for v in values],
        [max(v) for v in values],
    )


def _plot_runs(ax, seeds, runs: list[str], key: str, scale: float = 1.0) -> None:
    for run in runs:
        epochs, mean, low, high = _mean_curve(seeds, run, key)
        (line,) = ax.plot(epochs, [scale * v for v in mean], marker="o", label=run)
        ax.fill_between(
            epochs,
            [scale * v for v in low],
            [scale * v for v in high],
            color=line.get_color(),
            alpha=0.2,
        )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def fig5(seeds: dict[int, Any], path: str, title: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    _plot_runs(axes[0], seeds, ["baseline", "idsnn"], "test_accuracy", 100)
    axes[0].axhline(100 * teacher_stats(seeds)["mean"], color="gray", ls="--", label="teacher")
    axes[0].set_ylabel("test top-1 (%)")
    _plot_runs(axes[1], seeds, ["baseline", "idsnn"], "test_loss")
    axes[1].set_ylabel("test loss")
    axes[0].legend()
    fig.suptitle(f"{title}: IDSNN vs baseline, mean over seeds {list(seeds)} (band: min..max)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table3_png(t: dict[str, Any], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    names = [r["variant"] for r in t["rows"]]
    ax.bar(
        names,
        [100 * r["best"]["mean"] for r in t["rows"]],
        yerr=[100 * r["best"]["std"] for r in t["rows"]],
        capsize=4,
        color="tab:blue",
    )
    for i, r in enumerate(t["rows"]):
        ax.scatter(
            [i] * len(r["best_per_seed"]),
            [100 * v for v in r["best_per_seed"]],
            color="black",
            s=12,
            zorder=3,
        )
    ax.axhline(100 * t["teacher_best"]["mean"], color="gray", ls="--", label="teacher")
    low = min(min(r["best_per_seed"]) for r in t["rows"])
    ax.set_ylim(100 * low - 3, 100 * max(t["teacher_best"]["mean"], 0) + 2)
    ax.set_ylabel("best test top-1 (%)")
    ax.set_title(f"{title}: ablation (mean ± std, dots: seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table4_png(seeds: dict[int, Any], t: dict[str, Any], path: str, title: str) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    _plot_runs(ax, seeds, [r["run"] for r in t["rows"]], "test_accuracy", 100)
    target = statistics.fmean(t["target_per_seed"])
    ax.axhline(100 * target, color="black", ls=":", label="target (baseline best)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(f"{title}: convergence")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    root: str, config: Any, schedules: list[tuple[int, int]], out: str | None = None
) -> list[str]:
    """Writes the tables, JSON and plots of the finished seeds under `out` (default `root`)."""
    out = out or root
    os.makedirs(out, exist_ok=True)
    runs = [common.schedule_dir(i, e) for i, e in schedules]
    seeds = collect(root, [*ablation.VARIANTS, *runs])
    if not seeds:
        raise FileNotFoundError(f"no finished seed under {root!r}")
    paper = ablation.is_paper_setting(config)
    title = f"{config.dataset}, T={config.student.time_steps}"
    t3, t4 = table3(seeds, paper), table4(seeds, runs, paper)
    paths = []
    for name, table, text in (
        ("table3", t3, table3_markdown(t3)),
        ("table4", t4, table4_markdown(t4)),
    ):
        paths += [os.path.join(out, f"{name}.md"), os.path.join(out, f"{name}.json")]
        with open(paths[-2], "w") as f:
            f.write(f"# {title}\n\n{text}")
        with open(paths[-1], "w") as f:
            json.dump(table, f, indent=1)
    paths.append(os.path.join(out, "curves.json"))  # per seed and run, per epoch; wall times
    with open(paths[-1], "w") as f:
        json.dump(seeds, f, indent=1)
    paths.append(os.path.join(out, "table3.png"))
    table3_png(t3, paths[-1], title)
    paths.append(os.path.join(out, "table4.png"))
    table4_png(seeds, t4, paths[-1], title)
    paths.append(os.path.join(out, "fig5.png"))
    fig5(seeds, paths[-1], title)
    return paths
