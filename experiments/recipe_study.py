"""Does the paper's gain survive a modern recipe? The modern recipe, each option left out, and
the baseline under it, over seeds, beside the reference recipe.

Per seed s, under `<root>/seed_<s>/<variant>/`, one `pipeline.run` of the config (a modern
recipe, e.g. configs/fashion_mnist_modern.py) with the variant's overrides (`VARIANTS`), all
distilling from one teacher per seed: `--teacher` (a path with `{seed}`, e.g. the paper
study's teachers) or one trained with the config in `<root>/seed_<s>/teacher_run`. Runs go in
priority order (every seed's `modern` and `baseline`, then the leave-one-outs seed by seed),
so an interrupted study has its main comparison first; rerunning resumes and skips finished
runs. Leaving EMA out needs no run: every run reports its raw and EMA accuracy. The
reference recipe's runs come from `--reference_root` (a paper_study root: `idsnn`, `baseline`).

  python experiments/recipe_study.py --config=configs/fashion_mnist_modern.py \
      --root=runs/fm_recipe --seeds=1,2,3 --config.energy= \
      --teacher=runs/fm_study/seed_{seed}/teacher_run/teacher --reference_root=runs/fm_study \
      --out=experiments/results/fashion_mnist

Writes `recipe.md`, `recipe.json` and `recipe.png` under `--out`: best test top-1 (raw
weights, and EMA) as mean ± sample std over the seeds that finished each run, and the mean
per-seed difference to `modern`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import ablation  # beside this script (pytest: pythonpath)
import common
import ml_collections
from absl import app, flags, logging

# variant -> overrides of the modern config; the options' "off" values are the reference's.
VARIANTS: dict[str, dict[str, Any]] = {
    "modern": {},
    "baseline": {"init_from_teacher": False, "distill": False},
    "no_cosine": {"optimizer.schedule": "step", "optimizer.warmup_epochs": 0},
    "no_label_smoothing": {"label_smoothing": 0.0},
    "no_tet": {"tet_weight": 0.0},
    "no_kd_per_step": {"kd_per_step": False},
    "no_auto_augment": {"augment.auto_augment": False},
    "no_cutout": {"augment.cutout": 0},
}
MAIN = ("modern", "baseline")  # trained first, for every seed
REFERENCE = {"reference_idsnn": "idsnn", "reference_baseline": "baseline"}  # row -> study run


def variant_config(config: ml_collections.ConfigDict, variant: str, seed: int, teacher: str):
    """The config of one run: `config` with the seed, the teacher and the variant's overrides."""
    out = common.with_seed(config, seed)
    with out.unlocked():
        out.compare_baseline = False
        out.teacher.checkpoint = teacher
        for key, value in VARIANTS[variant].items():
            *parents, leaf = key.split(".")
            node = out
            for part in parents:
                node = node[part]
            node[leaf] = value
    return out


def run_order(seeds: list[int]) -> list[tuple[int, str]]:
    """(seed, variant) in training order: the main comparison of every seed first."""
    rest = [v for v in VARIANTS if v not in MAIN]
    return [(s, v) for v in MAIN for s in seeds] + [(s, v) for s in seeds for v in rest]


def teacher_for(config: ml_collections.ConfigDict, root: str, seed: int, template: str) -> str:
    """The seed's teacher checkpoint: `template` with the seed, or one trained once here."""
    if template:
        return template.format(seed=seed)
    sroot = common.seed_dir(root, seed)
    return ablation.shared_teacher(common.with_seed(config, seed), sroot)[0]


def run_study(config, root: str, seeds: list[int], teacher: str) -> None:
    from idsnn_jax import pipeline

    for seed, variant in run_order(seeds):
        workdir = os.path.join(common.seed_dir(root, seed), variant)
        if common.load_summary(workdir) is not None:
            continue
        checkpoint = teacher_for(config, root, seed, teacher)
        summary = pipeline.run(
            variant_config(config, seed=seed, variant=variant, teacher=checkpoint), workdir
        )
        print(
            f"seed {seed} {variant}: {summary['student_best_accuracy']:.4f} "
            f"({common.duration(summary['wall_seconds'])})",
            flush=True,
        )


def _results(root: str, runs: dict[str, str]) -> dict[str, dict[int, dict[str, float]]]:
    """row -> seed -> {'best', 'ema'} of the finished runs (`runs`: row -> run directory)."""
    out: dict[str, dict[int, dict[str, float]]] = {row: {} for row in runs}
    if not root or not os.path.isdir(root):
        return out
    for name in sorted(os.listdir(root)):
        if not name.startswith("seed_"):
            continue
        for row, run in runs.items():
            summary = common.load_summary(os.path.join(root, name, run))
            if summary is not None:
                out[row][int(name[5:])] = {
                    "best": summary["student_best_accuracy"],
                    "ema": summary.get("student_ema_best_accuracy"),
                }
    return out


def table(root: str, reference_root: str | None) -> dict[str, Any]:
    """Rows of the report: per row the seeds' best accuracies, their mean ± std, the EMA
    weights' and the mean difference to `modern` over the seeds both have."""
    results = _results(root, {v: v for v in VARIANTS})
    results |= _results(reference_root, REFERENCE)
    modern = results["modern"]
    rows = []
    for name, seeds in results.items():
        if not seeds:
            continue
        best = [r["best"] for r in seeds.values()]
        ema = [r["ema"] for r in seeds.values() if r["ema"] is not None]
        shared = [s for s in seeds if s in modern]
        diff = [seeds[s]["best"] - modern[s]["best"] for s in shared]
        rows.append(
            {
                "run": name,
                "seeds": {str(s): r for s, r in seeds.items()},
                "best": common.mean_std(best),
                "ema": common.mean_std(ema) if ema else None,
                "minus_modern": common.mean_std(diff) if diff and name != "modern" else None,
            }
        )
    return {"rows": rows}


def markdown(t: dict[str, Any]) -> str:
    pm = lambda s: "–" if s is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
    signed = lambda s: "–" if s is None else f"{100 * s['mean']:+.2f} ± {100 * s['std']:.2f}"
    header = ["run", "seeds", "best top-1 (raw)", "EMA weights", "minus modern", "per seed"]
    lines = [
        [
            r["run"],
            str(len(r["seeds"])),
            pm(r["best"]),
            pm(r["ema"]),
            signed(r["minus_modern"]),
            " / ".join(f"{100 * v['best']:.2f}" for v in r["seeds"].values()),
        ]
        for r in t["rows"]
    ]
    return common.markdown_table(header, lines)


def plot(t: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = t["rows"][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    y = range(len(rows))
    means = [100 * r["best"]["mean"] for r in rows]
    ax.barh(y, means, xerr=[100 * r["best"]["std"] for r in rows], color="tab:blue", alpha=0.7)
    for i, r in enumerate(rows):
        for v in r["seeds"].values():
            ax.plot(100 * v["best"], i, "k.", ms=4)
    modern = next((r for r in rows if r["run"] == "modern"), None)
    if modern is not None:
        ax.axvline(100 * modern["best"]["mean"], color="gray", ls=":", label="modern (mean)")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_yticks(list(y), [r["run"] for r in rows])
    ax.set_xlim(min(means) - 5, max(means) + 3)
    ax.set_xlabel("best test top-1 (%), mean ± std; dots: seeds")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(root: str, reference_root: str | None, out: str, title: str) -> list[str]:
    t = table(root, reference_root)
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"recipe.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w") as f:
        json.dump(t, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown(t) + "\n")
    plot(t, paths[2], title)
    return paths


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    root = os.path.abspath(_FLAGS.root.value)
    if not _FLAGS.report_only.value:
        run_study(_FLAGS.config.value, root, [int(s) for s in _FLAGS.seeds.value], _TEACHER.value)
    title = f"{_FLAGS.config.value.dataset}: modern recipe, options left out"
    for path in write_report(root, _REFERENCE_ROOT.value, _FLAGS.out.value or root, title):
        print(f"wrote {path}")
    print(markdown(table(root, _REFERENCE_ROOT.value)))


if __name__ == "__main__":
    from idsnn_jax.configs import fashion_mnist_modern

    _FLAGS = common.define_study_flags(
        fashion_mnist_modern.__file__, "Directory for every seed's runs.", seeds=True
    )
    _TEACHER = flags.DEFINE_string(
        "teacher", "", "Teacher checkpoint per seed, '{seed}' replaced; '': train one per seed."
    )
    _REFERENCE_ROOT = flags.DEFINE_string(
        "reference_root", None, "A paper_study root whose idsnn/baseline runs are the reference."
    )
    app.run(main)
