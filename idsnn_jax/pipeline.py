"""The three IDSNN stages: train the ANN teacher, initialize the SNN from it, distill.

`run(config, workdir)` is what the CLI and the notebooks call. Every stage checkpoints
under the workdir and a rerun of the same call resumes where it stopped, skipping
finished stages. The ablations of the paper are config switches alone:
baseline (`init_from_teacher=False, distill=False`), init only (`distill=False`),
KD only (`init_from_teacher=False`) and IDSNN (both, the default).

Bad input fails before any work and touches no checkpoint: the config (`plan.build_plan`),
a workdir that holds a run of another config (`resume.check_workdir`, against the
`<workdir>/config.json` every run writes), a `teacher.checkpoint` of another architecture,
width or class count (`check_teacher_checkpoint`), then the data files (`datasets`). A run
that stops on a non-finite loss leaves `DIVERGED_FILE`, after which (only) a resume may
lower the learning rate (`resume.RESUME_AFTER_DIVERGENCE`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from idsnn_jax import faults, files, input_pipeline, report, steps, torch_import, train
from idsnn_jax.checkpoints import (
    fingerprint,
    has_checkpoint,
    load_variables,
    locate,
    saved_shapes,
)
from idsnn_jax.datasets import Split, load_split
from idsnn_jax.logs import MetricLogger, logger, read_records, setup_logging
from idsnn_jax.plan import RunPlan, build_plan, data_shards
from idsnn_jax.resume import CONFIG_FILE, DIVERGED_FILE, check_workdir, write_config
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
        ctx.for_role("teacher"),
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
    run = files.read_json(run_config, "it says what the teacher checkpoint is: restore it")
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
            files.write_text(path, f"{report}\n")
        logger.info(
            "[%s] initialized from the teacher (every leaf: %s):\n%s", stage, path, report.summary()
        )
        signum = faults.point("transfer")
        if signum is not None:
            raise faults.stopped(signum, stage, "after the transfer", "restart the stage")
    teacher = (plan.models["teacher"], teacher_variables) if distill else None
    return train.fit(
        ctx.for_role("student"),
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
    logger.info("%s", report.config_line(config, workdir))
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
    # One training split per distinct stage budget (the first n examples, then sharded),
    # the student's first: a stage trains on exactly what a run of that global budget would.
    budgets = plan.train_examples or {"student": config.max_train_examples}
    loaded = {
        n: load_split(config.dataset, "train", config.data_dir, max_examples=n, rows=rows["train"])
        for n in dict.fromkeys(budgets.values())
    }
    loaded = {n: (split, _data_fingerprint(split)) for n, split in loaded.items()}
    role_data = {role: loaded[n] for role, n in budgets.items()}
    test_split = load_split(
        config.dataset,
        "test",
        config.data_dir,
        max_examples=config.max_test_examples,
        rows=rows["test"],
    )
    # A collective, so also a barrier: every process has checked the workdir before process 0
    # rewrites its config.json (and removes a DIVERGED_FILE).
    test_size = int(np.sum(multihost_utils.process_allgather(np.int32(len(test_split)))))
    sizes = {role: len(split) * processes for role, (split, _) in role_data.items()}
    train_text = f"{sizes['student']} train"
    if len(set(sizes.values())) > 1:
        train_text = f"{sizes['teacher']} train for the teacher, {sizes['student']} for students"
    logger.info(
        "%s: %s (%d shard(s)) / %d test examples on %d device(s), %d process(es)",
        config.dataset,
        train_text,
        shards,
        test_size,
        jax.device_count(),
        processes,
    )
    write_config(config, workdir)
    train_split, data_fingerprint = role_data["student"]
    ctx = train.RunContext(
        workdir,
        train_split,
        test_split,
        plan.info,
        steps.create_mesh(),
        MetricLogger(workdir),
        data_shards=shards,
        test_size=test_size,
        data_fingerprint=data_fingerprint,
        role_data=role_data,
    )
    return ctx, plan


def _data_fingerprint(split: Split) -> str:
    """`checkpoints.fingerprint` of the training split: of every process's shards together."""
    local = fingerprint({"image": split.images, "label": split.labels})
    if jax.process_count() == 1:
        return local
    digests = multihost_utils.process_allgather(np.frombuffer(bytes.fromhex(local), np.uint8))
    return fingerprint(np.asarray(digests))


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
            files.write_text(os.path.join(workdir, DIVERGED_FILE), f"{err}\n")
        raise
    finally:
        ctx.writer.close()
    summary["wall_seconds"] = time.time() - start
    if jax.process_index() == 0:
        files.write_json(os.path.join(workdir, "summary.json"), summary)
        rows = report.stage_rows(read_records(workdir))
        logger.info("summary: what each stage reached\n%s", report.format_rows(rows))
    return summary
