"""The paper's ablation (Table 3), convergence (Table 4) and curves (Fig. 5), over seeds.

Per seed, under `<root>/seed_<s>/`:
* the ablation (`ablation.run_ablation`): one teacher in `teacher_run/`, trained with the
  config plus `--teacher_set` overrides (e.g. more data, so that it is clearly stronger than
  the students), and the variants `baseline`, `init_only`, `kd_only`, `idsnn`;
* the convergence runs: IDSNN with the learning rate stepped every `interval` epochs for
  `epochs` epochs (`--schedules=interval:epochs,...`), in `idsnn_lr<interval>_e<epochs>/`,
  loading the same teacher.
Then `study_report.write_report` writes `table3.{md,json,png}`, `table4.{md,json,png}` and
`fig5.png` under `<root>`. Rerunning the command resumes unfinished runs and skips finished
ones; `--report_only` redraws the report from what is there.

  # Fashion-MNIST, 3 seeds (the committed experiments/results/fashion_mnist/)
  python experiments/paper_study.py --config=configs/fashion_mnist.py \
      --root=experiments/results/fashion_mnist --seeds=1,2,3 \
      --config.energy= --teacher_set=max_train_examples=None --teacher_set=teacher.num_epochs=2 \
      --teacher_set="optimizer.lr_milestones=(1,)" --schedules=1:2
  # CIFAR-100 at the paper's settings (T=6; Table 4's intervals 20 and 10)
  python experiments/paper_study.py --config=configs/cifar100.py --root=runs/cifar100_study \
      --config.student.time_steps=6 --seeds=0 --schedules=20:60,10:20
"""

from __future__ import annotations

import ast
import os
import time
from typing import Any

import ablation  # beside this script (pytest: pythonpath)
import common
import ml_collections
from absl import app, flags, logging


def parse_schedules(specs: list[str]) -> list[tuple[int, int]]:
    """`["1:2", ...]` -> `[(interval, epochs), ...]`; a one-line error names a bad entry."""
    out = []
    for spec in specs:
        try:
            interval, epochs = (int(v) for v in spec.split(":"))
        except ValueError:
            raise ValueError(f"--schedules: {spec!r} is not interval:epochs") from None
        if interval < 1 or epochs < 1:
            raise ValueError(f"--schedules: {spec!r} needs interval >= 1 and epochs >= 1")
        out.append((interval, epochs))
    return out


def with_overrides(config: ml_collections.ConfigDict, overrides: list[str]) -> Any:
    """A copy of `config` with each `key.path=value` set (value a Python literal, else a
    string); an unknown key or a value of the wrong type is a ValueError naming the key."""
    out = config.copy_and_resolve_references()
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--teacher_set: {item!r} is not key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        *parents, leaf = key.split(".")
        node = out
        try:
            for part in parents:
                node = node[part]
            node[leaf]  # noqa: B018 (raises for an unknown key)
            with out.unlocked():
                node[leaf] = value
        except (KeyError, AttributeError, TypeError) as e:
            raise ValueError(f"--teacher_set: cannot set {key}={value!r}: {e}") from None
    return out


def run_schedule(config: Any, workdir: str, teacher: str, interval: int, epochs: int) -> None:
    """IDSNN with the lr stepped every `interval` epochs, trained `epochs` epochs (resumes)."""
    from idsnn_jax import pipeline

    cfg = ablation.variant_config(config, "idsnn", teacher)
    cfg.optimizer.lr_interval = interval
    cfg.student.num_epochs = epochs
    summary = common.load_summary(workdir)
    if summary is None or summary.get("student_epochs") != epochs:
        pipeline.run(cfg, workdir)


def run_study(
    config: ml_collections.ConfigDict,
    root: str,
    seeds: list[int],
    teacher_set: list[str],
    schedules: list[tuple[int, int]],
) -> None:
    """Trains (or resumes) every seed's ablation and convergence runs under `root`."""
    root = os.path.abspath(root)
    teacher_configs = {s: with_overrides(common.with_seed(config, s), teacher_set) for s in seeds}
    for seed in seeds:
        start = time.time()
        cfg = common.with_seed(config, seed)
        sroot = common.seed_dir(root, seed)
        ablation.run_ablation(cfg, sroot, None, teacher_configs[seed])
        teacher = os.path.join(sroot, ablation.TEACHER_DIR, "teacher")
        for interval, epochs in schedules:
            workdir = os.path.join(sroot, common.schedule_dir(interval, epochs))
            run_schedule(cfg, workdir, teacher, interval, epochs)
        print(f"seed {seed} done in {common.duration(time.time() - start)}", flush=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    try:
        schedules = parse_schedules(_SCHEDULES.value)
        with_overrides(_FLAGS.config.value, _TEACHER_SET.value)  # bad keys before any training
    except ValueError as e:
        raise app.UsageError(str(e)) from None
    root = os.path.abspath(_FLAGS.root.value)
    if not _FLAGS.report_only.value:
        seeds = [int(s) for s in _FLAGS.seeds.value]
        run_study(_FLAGS.config.value, root, seeds, _TEACHER_SET.value, schedules)
    import study_report  # matplotlib only once the runs are done

    out = os.path.abspath(_FLAGS.out.value or root)
    for path in study_report.write_report(root, _FLAGS.config.value, schedules, out):
        print(f"wrote {path}")
    for name in ("table3.md", "table4.md"):
        with open(os.path.join(out, name)) as f:
            print(f.read())


if __name__ == "__main__":
    from idsnn_jax.configs import fashion_mnist

    _FLAGS = common.define_study_flags(
        fashion_mnist.__file__, "Directory for every seed's runs and the report.", seeds=True
    )
    _TEACHER_SET = flags.DEFINE_multi_string(
        "teacher_set", [], "key=value override for the shared teacher's run only (repeat)."
    )
    _SCHEDULES = flags.DEFINE_list(
        "schedules", ["1:2"], "Convergence runs: lr stepped every interval epochs, for epochs."
    )
    app.run(main)
