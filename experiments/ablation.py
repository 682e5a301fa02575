"""The paper's CIFAR-100 ablation: initialization from the ANN and distillation, on and off.

Four variants of one config, differing only by `init_from_teacher` and `distill`:

  variant     init  KD    paper (CIFAR-100, T=6, ResNet34 -> Spiking ResNet18)
  baseline    no    no    71.34
  init_only   yes   no    74.47
  kd_only     no    yes   73.71
  idsnn       yes   yes   75.41

The variants share one teacher: it is trained once in `<root>/teacher_run` (exactly stage
1 of `pipeline.run`: same seed, same recipe) and every variant that needs it loads it with
`config.teacher.checkpoint=<root>/teacher_run/teacher` (the stage directory: its best epoch
is loaded). Each variant runs `pipeline.run` in `<root>/<variant>` (with
`compare_baseline=False`: the baseline is its own variant). Rerunning the same command
resumes every unfinished stage and skips finished variants (delete `<root>/<variant>` to
redo one). Prints a table and writes `<root>/ablation.json` (rows for the variants of this
invocation). `wall` is the `wall_seconds` of the variant's last `pipeline.run` (after a
resume: that invocation only); `train_seconds` in the JSON sums the training time of every
epoch, across resumes.

  python experiments/ablation.py --root=runs/cifar100_ablation_t6 \
      --config=configs/cifar100.py --config.student.time_steps=6
  python experiments/ablation.py --root=/tmp/fm_ablation --config=configs/fashion_mnist.py \
      --variants=baseline,idsnn

A teacher given on the command line (`--config.teacher.checkpoint=DIR`) is used as is.
Expected cost at the paper's setting: 200 teacher epochs + 4 x 200 student epochs.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import common  # beside this script: its directory is on sys.path (pytest: pythonpath)
import ml_collections
import summarize
from absl import app, flags, logging

# name -> (init_from_teacher, distill), in the paper's order.
VARIANTS = {
    "baseline": (False, False),
    "init_only": (True, False),
    "kd_only": (False, True),
    "idsnn": (True, True),
}
# The paper's ablation (CIFAR-100, T=6, ResNet34 teacher -> Spiking ResNet18), top-1 %.
PAPER = {"baseline": 71.34, "init_only": 74.47, "kd_only": 73.71, "idsnn": 75.41}
PAPER_SETTING = dict(
    dataset="cifar100",
    time_steps=6,
    teacher_model="resnet34",
    student_model="spiking_resnet18",
    teacher_width=1.0,
    student_width=1.0,
)
TEACHER_PAPER = {"cifar100": 77.26}  # the ResNet34 teacher, top-1 %
TEACHER_DIR = "teacher_run"


def is_paper_setting(config: ml_collections.ConfigDict) -> bool:
    """Whether `config` is the setting of the paper's ablation table (numbers comparable)."""
    setting = dict(
        dataset=config.dataset,
        time_steps=config.student.time_steps,
        teacher_model=config.teacher.model,
        student_model=config.student.model,
        teacher_width=config.teacher.width,
        student_width=config.student.width,
    )
    return setting == PAPER_SETTING


def variant_config(
    config: ml_collections.ConfigDict, variant: str, teacher_checkpoint: str
) -> ml_collections.ConfigDict:
    """A copy of `config` with the variant's switches (and the shared teacher if it uses one)."""
    init, distill = VARIANTS[variant]
    out = config.copy_and_resolve_references()
    with out.unlocked():
        out.init_from_teacher = init
        out.distill = distill
        out.compare_baseline = False
        if init or distill:
            out.teacher.checkpoint = teacher_checkpoint
    return out


def _stage_row(workdir: str, stage: str) -> dict[str, Any] | None:
    from idsnn_jax.logs import METRICS_FILE, read_records

    if not os.path.exists(os.path.join(workdir, METRICS_FILE)):
        return None
    rows = summarize.summarize_records(read_records(workdir))
    return next((r for r in rows if r["stage"] == stage), None)


def shared_teacher(config: ml_collections.ConfigDict, root: str) -> tuple[str, dict | None]:
    """(checkpoint path, teacher summary or None): the given teacher, or one trained (once,
    resumably) with `config` in `<root>/teacher_run`."""
    from idsnn_jax import pipeline
    from idsnn_jax.checkpoints import best_epoch

    if config.teacher.checkpoint:
        return config.teacher.checkpoint, None
    workdir = os.path.join(root, TEACHER_DIR)
    checkpoint = os.path.join(workdir, "teacher")  # the stage directory: its best epoch is used
    done = _stage_row(workdir, "teacher")
    if not (
        done and done["epochs"] >= config.teacher.num_epochs and best_epoch(checkpoint) is not None
    ):
        start = time.time()
        pipeline.train_teacher(config, workdir)
        print(f"teacher trained in {workdir} in {common.duration(time.time() - start)}", flush=True)
    return checkpoint, _stage_row(workdir, "teacher")


def run_ablation(
    config: ml_collections.ConfigDict,
    root: str,
    variants: list[str] | None = None,
    teacher_config: ml_collections.ConfigDict | None = None,
) -> list[dict[str, Any]]:
    """Runs (or resumes) `variants` (default: all four) under `root`; returns one row each
    (accuracies as fractions) and writes `<root>/ablation.json`.

    `teacher_config` (default `config`) trains the shared teacher: the same architecture with,
    e.g., more data or epochs, so that it is clearly stronger than the students.
    """
    from idsnn_jax import pipeline

    variants = list(VARIANTS) if variants is None else list(variants)
    _check_configs(config, variants, teacher_config)
    root = os.path.abspath(root)
    os.makedirs(root, exist_ok=True)
    teacher_checkpoint, teacher = "", None
    if any(VARIANTS[v][0] or VARIANTS[v][1] for v in variants):
        teacher_checkpoint, teacher = shared_teacher(teacher_config or config, root)
    paper = is_paper_setting(config)
    rows = []
    for variant in variants:
        workdir = os.path.join(root, variant)
        cfg = variant_config(config, variant, teacher_checkpoint)
        summary = common.load_summary(workdir)
        if summary is None or summary.get("student_epochs") != cfg.student.num_epochs:
            summary = pipeline.run(cfg, workdir)
        rows.append(_row(variant, cfg, summary, workdir, paper))
    result = {
        "dataset": config.dataset,
        "time_steps": config.student.time_steps,
        "teacher_model": config.teacher.model,
        "student_model": config.student.model,
        "teacher_checkpoint": teacher_checkpoint or None,
        "teacher": teacher,
        "paper_setting": paper,
        "rows": rows,
    }
    with open(os.path.join(root, "ablation.json"), "w") as f:
        json.dump(result, f, indent=2)
    return rows


def _check_configs(
    config: ml_collections.ConfigDict,
    variants: list[str],
    teacher_config: ml_collections.ConfigDict | None,
) -> None:
    """ValueError for an unknown variant, a teacher config of another dataset or teacher, or
    any variant's config that would fail: before hours of training."""
    from idsnn_jax.plan import build_plan, get

    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if teacher_config is not None:
        for key in ("dataset", "teacher.model", "teacher.width"):
            ours, theirs = get(config, key), get(teacher_config, key)
            if ours != theirs:
                raise ValueError(f"teacher config: {key}={theirs!r} differs from {ours!r}")
    for variant in variants:
        build_plan(variant_config(config, variant, config.teacher.checkpoint))


def _row(
    variant: str, cfg: ml_collections.ConfigDict, summary: dict, workdir: str, paper: bool
) -> dict[str, Any]:
    """The ablation table's row of one finished variant (accuracies as fractions)."""
    return {
        "variant": variant,
        "init_from_teacher": cfg.init_from_teacher,
        "distill": cfg.distill,
        "best_accuracy": summary["student_best_accuracy"],
        "last_accuracy": summary["student_last_accuracy"],
        "epochs": summary["student_epochs"],
        "wall_seconds": summary["wall_seconds"],
        "train_seconds": (_stage_row(workdir, "student") or {}).get("train_seconds"),
        "paper_accuracy": PAPER[variant] if paper else None,
        "workdir": workdir,
    }


def format_table(rows: list[dict[str, Any]]) -> str:
    """The ablation table: top-1 in percent, `-` where the paper has no comparable number."""
    header = ["variant", "init", "KD", "best top-1", "last top-1", "epochs", "wall", "paper"]
    yes = lambda b: "yes" if b else "no"
    lines = [
        [
            r["variant"],
            yes(r["init_from_teacher"]),
            yes(r["distill"]),
            f"{100 * r['best_accuracy']:.2f}",
            f"{100 * r['last_accuracy']:.2f}",
            str(r["epochs"]),
            common.duration(r["wall_seconds"]),
            "-" if r["paper_accuracy"] is None else f"{r['paper_accuracy']:.2f}",
        ]
        for r in rows
    ]
    return common.text_table(header, lines)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and JAX are chatty at INFO
    unknown = sorted(set(_VARIANTS.value) - set(VARIANTS))
    if unknown:
        raise app.UsageError(f"--variants: unknown {unknown}; choose from {list(VARIANTS)}")
    config = _FLAGS.config.value
    root = os.path.abspath(_FLAGS.root.value)
    rows = run_ablation(config, root, _VARIANTS.value)
    print()
    print(format_table(rows))
    with open(os.path.join(root, "ablation.json")) as f:
        teacher = json.load(f)["teacher"]
    if teacher:
        paper = TEACHER_PAPER.get(config.dataset) if is_paper_setting(config) else None
        print(
            f"teacher ({config.teacher.model}, {os.path.join(root, TEACHER_DIR)}): "
            f"best {100 * teacher['best_accuracy']:.2f} (epoch {teacher['best_epoch']}), "
            f"last {100 * teacher['last_accuracy']:.2f}, epochs {teacher['epochs']}; "
            f"paper {'-' if paper is None else f'{paper:.2f}'}"
        )
    if not is_paper_setting(config):
        print(
            "paper: '-' as this is not the paper's setting "
            f"({', '.join(f'{k}={v}' for k, v in PAPER_SETTING.items())})"
        )
    print(f"wrote {os.path.join(root, 'ablation.json')}")


if __name__ == "__main__":  # flags only here, so tests can import this module beside others
    from idsnn_jax.configs import cifar100

    _FLAGS = common.define_study_flags(
        cifar100.__file__, "Directory for the teacher and the variants.", seeds=False
    )
    _VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Subset of {list(VARIANTS)}.")
    app.run(main)
