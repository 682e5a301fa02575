"""The three IDSNN stages: train the ANN teacher, initialize the SNN from it, distill.

`run(config, workdir)` is what the CLI and the notebooks call. Every stage checkpoints
under the workdir and a rerun of the same call resumes where it stopped, skipping
finished stages. The ablations of the paper are config switches alone:
baseline (`init_from_teacher=False, distill=False`), init only (`distill=False`),
KD only (`init_from_teacher=False`) and IDSNN (both, the default).

Bad input fails before any work and touches no checkpoint: the config (`plan.build_plan`),
a workdir that holds a run of another config (`check_workdir`, against the
`<workdir>/config.json` every run writes), a `teacher.checkpoint` of another architecture,
width or class count (`check_teacher_checkpoint`), then the data files (`datasets`). A run
that stops on a non-finite loss leaves `DIVERGED_FILE`, after which (only) a resume may
lower the learning rate (`RESUME_AFTER_DIVERGENCE`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from idsnn_jax import faults, input_pipeline, steps, torch_import, train
from idsnn_jax.checkpoints import has_checkpoint, load_variables, locate, saved_shapes
from idsnn_jax.datasets import load_split
from idsnn_jax.logs import MetricLogger, logger, setup_logging
from idsnn_jax.plan import RunPlan, build_plan, data_shards, flatten
from idsnn_jax.transfer import init_snn_from_ann


def train_teacher(
    ctx: train.RunContext, config: ml_collections.ConfigDict, plan: RunPlan
) -> tuple[dict[str, Any], float | None]:
    """Stage 1: (the teacher's variables as host arrays, its best test accuracy or None).

    Trains the teacher in `<workdir>/teacher` (resuming, or returning at once when done),
    or loads `config.teacher.checkpoint` (one of ours, or a PyTorch file: `torch_import`).
    The best-accuracy epoch is what the student learns from.
    """
    expected = plan.abstract_variables["teacher"]
    if config.teacher.checkpoint and torch_import.is_torch_file(config.teacher.checkpoint):
        variables = torch_import.load_torch_teacher(config.teacher.checkpoint, expected)
        logger.info("[teacher] imported from PyTorch %s", config.teacher.checkpoint)
        return variables, None
    if config.teacher.checkpoint:
        variables = load_variables(config.teacher.checkpoint)
        _check_teacher_shapes(config, variables, expected)
        logger.info("[teacher] loaded from %s", config.teacher.checkpoint)
        return variables, None
    result = train.fit(
        ctx,
        stage="teacher",
        model=plan.models["teacher"],
        variables=steps.init_variables(plan.models["teacher"], plan.info, config.seed),
        options=plan.fit_options["teacher"],
    )
    variables = load_variables(os.path.join(ctx.workdir, "teacher"))
    return variables, result.best_accuracy


def check_teacher_checkpoint(config: ml_collections.ConfigDict, plan: RunPlan) -> None:
    """ValueError unless `config.teacher.checkpoint` holds the teacher `config` describes.

    Reads only metadata: every tree path's shape and dtype against the model's (another
    architecture, width or class count names the first differing path and both shapes), then,
    when the checkpoint's run left its `config.json`, the model and width it was trained as
    (a spiking student's stage has the shapes of an ANN of its depth, but is not one). A
    PyTorch file is mapped onto the model (`torch_import`: errors name key, path and shapes).
    """
    path = config.teacher.checkpoint
    if torch_import.is_torch_file(path):
        torch_import.load_torch_teacher(path, plan.abstract_variables["teacher"])
        return
    _check_teacher_shapes(config, saved_shapes(path), plan.abstract_variables["teacher"])
    stage_dir, _ = locate(os.path.abspath(path))
    run_config = os.path.join(os.path.dirname(stage_dir), CONFIG_FILE)
    if not os.path.isfile(run_config):
        return
    with open(run_config) as f:
        run = json.load(f)
    role = "teacher" if os.path.basename(stage_dir) == "teacher" else "student"
    saved = {key: run.get(role, {}).get(key) for key in ("model", "width")}
    want = {key: config.teacher[key] for key in ("model", "width")}
    if None not in saved.values() and saved != want:
        raise ValueError(
            f"config.teacher.checkpoint={path!r} is the {os.path.basename(stage_dir)} stage of a "
            f"run of {role}.model={saved['model']!r}, {role}.width={saved['width']} "
            f"({run_config}), but config.teacher.model={want['model']!r}, "
            f"config.teacher.width={want['width']}"
        )


def _check_teacher_shapes(config: ml_collections.ConfigDict, variables: Any, expected: Any) -> None:
    """ValueError naming the first tree path whose shape or dtype differs from the model's,
    missing paths and extra ones (a deeper checkpoint) included, with both shapes."""
    got, want = dict(_shapes(variables)), dict(_shapes(expected))
    differ = [p for p in want if got.get(p) != want[p]] + [p for p in got if p not in want]
    if differ:
        first = min(differ, key=lambda p: p.startswith("batch_stats"))  # a kernel says more
        show = lambda s: "missing" if s is None else f"{s[0]} {s[1]}"
        n = len(differ) - 1
        more = f" ({n} more path{'s differ' if n > 1 else ' differs'})" if n else ""
        raise ValueError(
            f"config.teacher.checkpoint={config.teacher.checkpoint!r} does not hold a "
            f"{config.teacher.model!r} of width {config.teacher.width} for {config.dataset}: "
            f"{first} is {show(got.get(first))} in the checkpoint but {show(want.get(first))} "
            f"in the model{more}; teacher.model, teacher.width and dataset (its class count) "
            "must match it"
        )


def _shapes(tree: Any) -> list[tuple[str, tuple]]:
    """(path 'params/stem/conv/kernel', (shape, dtype)) of every leaf of `tree`."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [
        ("/".join(str(getattr(k, "key", k)) for k in p), (tuple(x.shape), str(x.dtype)))
        for p, x in leaves
    ]


# --- The workdir's config: resume only the run that is there --------------------------------------

CONFIG_FILE = "config.json"
# Keys that may change when a workdir is resumed: they decide where data is, what is logged or
# kept, and how evaluation is batched (exact counts either way), not the trained weights.
RESUME_FREE = frozenset(
    {
        "data_dir",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_keep",
        "checkpoint_every_epochs",
        "compare_baseline",  # adds (or skips) the baseline stage; the others are unchanged
        "steps_per_call",
        "energy",  # what evaluation counts, not what trains
    }
)
# Keys that may grow: a milestone at or after the old last epoch acts only after it, so the
# extended run equals one configured longer from the start. The teacher's only while no
# student stage has started from it (the student would have learned from another teacher).
RESUME_GROW = {"student.num_epochs": (), "teacher.num_epochs": ("student", "baseline")}
# Keys that may be lowered only to resume a run that stopped on a non-finite loss (it left
# DIVERGED_FILE): the epochs trained from then on use the new value, the saved ones keep
# theirs (each epoch's rate is in metrics.jsonl), so the run no longer equals a fresh run of
# either config; it is the one repair a diverged run needs without losing its epochs.
RESUME_AFTER_DIVERGENCE = frozenset({"optimizer.learning_rate"})
DIVERGED_FILE = "diverged.txt"


# Keys newer than some workdirs' config.json, with the value the runs of those had.
ADDED_KEYS = {
    "data_shards": 1,
    "label_smoothing": 0.0,
    "tet_weight": 0.0,
    "kd_per_step": False,
    "ema_decay": 0.0,
    "optimizer.schedule": "step",
    "optimizer.warmup_epochs": 0,
    "augment.cutout": 0,
    "augment.auto_augment": False,
}


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as the JSON-able nested dict `<workdir>/config.json` holds (tuples as lists),
    `data_shards=0` as the process count: the data order, which a resume must keep."""
    record = json.loads(config.to_json_best_effort())
    record["data_shards"] = data_shards(config)
    return record


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """ValueError naming every key (old -> new value) in which `config` differs from the run
    whose checkpoints `workdir` holds, beyond what a resume may change (`RESUME_FREE`,
    `RESUME_GROW`, `RESUME_AFTER_DIVERGENCE` when the workdir holds `DIVERGED_FILE`). Generic
    over the config tree: a key that only one side has differs too.
    Nothing to check when the workdir has no checkpoint or no `config.json` (a run of an
    older version: it is written now).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    started = sorted(
        name
        for name in (os.listdir(workdir) if os.path.isdir(workdir) else [])
        if has_checkpoint(os.path.join(workdir, name))
    )
    if not started:
        return
    if not os.path.isfile(path):
        logger.warning("%s has checkpoints but no %s to check them against", workdir, CONFIG_FILE)
        return
    with open(path) as f:
        old = ADDED_KEYS | flatten(json.load(f))
    new = flatten(config_record(config))
    absent = "<absent>"
    diverged = os.path.isfile(os.path.join(workdir, DIVERGED_FILE))
    diffs = []
    for key in sorted(old.keys() | new.keys()):
        was, now = old.get(key, absent), new.get(key, absent)
        if was == now or key in RESUME_FREE:
            continue
        grows = isinstance(was, int) and isinstance(now, int) and now > was
        if key in RESUME_GROW and grows and not set(RESUME_GROW[key]) & set(started):
            continue
        numbers = all(isinstance(v, int | float) for v in (was, now))
        if key in RESUME_AFTER_DIVERGENCE and diverged and numbers and now < was:
            logger.warning("%s: %r -> %r to resume the diverged run in %s", key, was, now, workdir)
            continue
        diffs.append(f"{key}: {was!r} -> {now!r}")
    if diffs:
        raise ValueError(
            f"{workdir} holds a run of another config ({path}; checkpoints of "
            f"{', '.join(started)}), refusing to resume it: {'; '.join(diffs)}. Use a new "
            "--workdir, rerun with the old values, or delete that config.json to resume anyway"
        )


def _write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `<workdir>/config.json`; the run it now records has not diverged (yet)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
            json.dump(config_record(config), f, indent=2)
            f.write("\n")
        if os.path.isfile(os.path.join(workdir, DIVERGED_FILE)):
            os.remove(os.path.join(workdir, DIVERGED_FILE))


def _student(
    ctx: train.RunContext,
    config: ml_collections.ConfigDict,
    plan: RunPlan,
    teacher_variables: Any,
    *,
    stage: str,
    init: bool,
    distill: bool,
) -> train.FitResult:
    """Stages 2 and 3 for one student: build, optionally initialize from the teacher, train.
    A stage that has checkpoints resumes from them: no transfer is redone or logged."""
    model = plan.models["student"]
    variables = steps.init_variables(model, plan.info, config.seed + 1)
    if init and not has_checkpoint(os.path.join(ctx.workdir, stage)):
        variables, report = init_snn_from_ann(
            teacher_variables,
            variables,
            block_map=config.block_map,
            copy_shortcut=config.copy_shortcut,
            return_report=True,
        )
        path = os.path.join(ctx.workdir, f"{stage}_transfer_report.txt")
        if jax.process_index() == 0:
            os.makedirs(ctx.workdir, exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{report}\n")
        logger.info(
            "[%s] initialized from the teacher (every leaf: %s):\n%s", stage, path, report.summary()
        )
        faults.point("transfer", stage, 1, 0)
    teacher = (plan.models["teacher"], teacher_variables) if distill else None
    return train.fit(
        ctx,
        stage=stage,
        model=model,
        variables=variables,
        options=plan.fit_options["student"],
        teacher=teacher,
    )


def create_context(
    config: ml_collections.ConfigDict, workdir: str
) -> tuple[train.RunContext, RunPlan]:
    """Builds and checks everything `config` describes (`plan.build_plan`), the workdir
    (`check_workdir`) and a given teacher checkpoint, loads this process's shards of both
    splits, then writes `<workdir>/config.json` and sets up the mesh and the metric writer.
    Every process calls it; only process 0 logs progress and writes files."""
    setup_logging()
    if jax.process_index():
        logger.setLevel(logging.WARNING)
    plan = build_plan(config)
    check_workdir(config, workdir)
    if plan.needs_teacher and config.teacher.checkpoint:
        check_teacher_checkpoint(config, plan)
    processes = jax.process_count()
    shards = data_shards(config)
    where = {"process_index": jax.process_index(), "process_count": processes}
    rows = {
        "train": functools.partial(input_pipeline.train_rows, num_shards=shards, **where),
        "test": functools.partial(input_pipeline.test_rows, **where),
    }
    train_split, test_split = (
        load_split(
            config.dataset,
            split,
            config.data_dir,
            max_examples=config[f"max_{split}_examples"],
            rows=rows[split],
        )
        for split in ("train", "test")
    )
    # A collective, so also a barrier: every process has checked the workdir before process 0
    # rewrites its config.json (and removes a DIVERGED_FILE).
    test_size = int(np.sum(multihost_utils.process_allgather(np.int32(len(test_split)))))
    logger.info(
        "%s: %d train (%d shard(s)) / %d test examples on %d device(s), %d process(es)",
        config.dataset,
        len(train_split) * processes,
        shards,
        test_size,
        jax.device_count(),
        processes,
    )
    _write_config(config, workdir)
    ctx = train.RunContext(
        workdir,
        train_split,
        test_split,
        plan.info,
        steps.create_mesh(),
        MetricLogger(workdir),
        data_shards=shards,
        test_size=test_size,
    )
    return ctx, plan


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the whole pipeline; returns and writes `summary.json`."""
    start = time.time()
    ctx, plan = create_context(config, workdir)
    summary: dict[str, Any] = {"dataset": config.dataset}
    teacher_variables = None
    students = [("student", config.init_from_teacher, config.distill)]
    if config.compare_baseline:
        students.append(("baseline", False, False))
    try:
        if plan.needs_teacher:
            teacher_variables, summary["teacher_best_accuracy"] = train_teacher(ctx, config, plan)
        for stage, init, distill in students:
            result = _student(
                ctx, config, plan, teacher_variables, stage=stage, init=init, distill=distill
            )
            summary[f"{stage}_best_accuracy"] = result.best_accuracy
            summary[f"{stage}_last_accuracy"] = result.last_accuracy
            summary[f"{stage}_epochs"] = len(result.history)
            if "test_ema_accuracy" in result.history[-1]:
                ema = [r["test_ema_accuracy"] for r in result.history]
                summary[f"{stage}_ema_best_accuracy"] = max(ema)
                summary[f"{stage}_ema_last_accuracy"] = ema[-1]
            if "test_energy_uj" in result.history[-1]:  # per test image, at the last epoch
                for key in ("energy_uj", "sops", "macs"):
                    summary[f"{stage}_{key}"] = result.history[-1][f"test_{key}"]
    except FloatingPointError as err:  # lets the resume lower the learning rate (check_workdir)
        if jax.process_index() == 0:
            with open(os.path.join(workdir, DIVERGED_FILE), "w") as f:
                f.write(f"{err}\n")
        raise
    finally:
        ctx.writer.close()
    summary["wall_seconds"] = time.time() - start
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.info("summary: %s", json.dumps(summary))
    return summary
