"""The three IDSNN stages: train the ANN teacher, initialize the SNN from it, distill.

`run(config, workdir)` is what the CLI and the notebooks call. Every stage checkpoints
under the workdir and a rerun of the same call resumes where it stopped, skipping
finished stages. The ablations of the paper are config switches alone:
baseline (`init_from_teacher=False, distill=False`), init only (`distill=False`),
KD only (`init_from_teacher=False`) and IDSNN (both, the default).

Bad input fails before any work and touches no checkpoint: the config (`plan.build_plan`),
a workdir that holds a run of another config (`resume.check_workdir`, against the
`<workdir>/config.json` every run writes), a `teacher.checkpoint` of another architecture,
width or class count (`teacher.check_checkpoint`), then the data files (`datasets`). A run
that stops on a non-finite loss leaves `DIVERGED_FILE`, after which (only) a resume may
lower the learning rate (`resume.RESUME_AFTER_DIVERGENCE`).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from dataclasses import fields
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from idsnn_jax import faults, files, input_pipeline, report, steps, teacher, train
from idsnn_jax.checkpoints import (
    fingerprint,
    has_checkpoint,
    load_variables,
)
from idsnn_jax.datasets import Split, load_split
from idsnn_jax.logs import MetricLogger, logger, read_records, setup_logging
from idsnn_jax.models import init_variables
from idsnn_jax.plan import RunPlan, build_plan
from idsnn_jax.resume import DIVERGED_FILE, check_workdir, write_config
from idsnn_jax.transfer import init_snn_from_ann


def _teacher(ctx: train.RunContext, plan: RunPlan) -> tuple[dict[str, Any], float | None]:
    """Stage 1: (the teacher's variables as host arrays, its best test accuracy or None).

    Loads `plan.teacher.checkpoint` when given (`teacher.load`), else trains the teacher in
    `<workdir>/teacher` (resuming, or returning at once when done); the student learns from
    its best-accuracy epoch.
    """
    expected = plan.abstract_variables["teacher"]
    if plan.teacher.checkpoint:
        return teacher.load(plan.teacher, plan.data.dataset, expected), None
    result = train.fit(
        ctx.for_role("teacher"),
        stage="teacher",
        model=plan.models["teacher"],
        variables=init_variables(plan.models["teacher"], plan.info, plan.seed),
        options=plan.fit_options["teacher"],
    )
    return load_variables(os.path.join(ctx.workdir, "teacher")), result.best_accuracy


def train_teacher(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Stage 1 of `run` alone, in `workdir` (resumes; returns at once when done): the
    teacher's checkpoints in `<workdir>/teacher`, its metrics in `<workdir>/metrics.jsonl`."""
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.teacher.checkpoint = ""
        config.init_from_teacher = True  # validate as a run that trains a teacher
    ctx, plan = create_context(config, workdir)
    try:
        _teacher(ctx, plan)
    finally:
        ctx.writer.close()


def _student(
    ctx: train.RunContext,
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
    variables = init_variables(model, plan.info, plan.seed + 1)
    if init and not has_checkpoint(os.path.join(ctx.workdir, stage)):
        options = {f.name: getattr(plan.transfer, f.name) for f in fields(plan.transfer)}
        variables, mapped = init_snn_from_ann(
            teacher_variables, variables, **options, return_report=True
        )
        path = os.path.join(ctx.workdir, f"{stage}_transfer_report.txt")
        if jax.process_index() == 0:
            os.makedirs(ctx.workdir, exist_ok=True)
            files.write_text(path, f"{mapped}\n")
        logger.info(
            "[%s] initialized from the teacher (every leaf: %s):\n%s", stage, path, mapped.summary()
        )
        signum = faults.point("transfer")
        if signum is not None:
            raise faults.stopped(signum, stage, "after the transfer", "restart the stage")
    distill_from = (plan.models["teacher"], teacher_variables) if distill else None
    return train.fit(
        ctx.for_role("student"),
        stage=stage,
        model=model,
        variables=variables,
        options=plan.fit_options["student"],
        teacher=distill_from,
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
    if plan.needs_teacher and plan.teacher.checkpoint:
        expected = plan.abstract_variables["teacher"]
        teacher.check_checkpoint(plan.teacher, plan.data.dataset, expected)
    role_data, test_split = _load_data(plan)
    # A collective, so also a barrier: every process has checked the workdir before process 0
    # rewrites its config.json (and removes a DIVERGED_FILE).
    test_size = int(np.sum(multihost_utils.process_allgather(np.int32(len(test_split)))))
    _log_data(plan, role_data, test_size)
    write_config(config, workdir)
    train_split, data_fingerprint = role_data["student"]
    ctx = train.RunContext(
        workdir,
        train_split,
        test_split,
        plan.info,
        steps.create_mesh(),
        MetricLogger(workdir),
        data_shards=plan.data.shards,
        test_size=test_size,
        data_fingerprint=data_fingerprint,
        role_data=role_data,
    )
    return ctx, plan


def _load_data(plan: RunPlan) -> tuple[dict[str, tuple[Split, str]], Split]:
    """This process's shards: per role, its training split and that split's fingerprint (one
    load per distinct budget: the first n examples, then sharded, so a stage trains on exactly
    what a run of that global budget would), and its part of the test split."""
    data, where = plan.data, {"process_index": jax.process_index()}
    where["process_count"] = jax.process_count()
    train_rows = functools.partial(input_pipeline.train_rows, num_shards=data.shards, **where)
    load = functools.partial(load_split, data.dataset, data_dir=data.data_dir)
    budgets = plan.train_examples  # every role that trains; the student always
    loaded = {
        n: load("train", max_examples=n, rows=train_rows) for n in dict.fromkeys(budgets.values())
    }
    loaded = {n: (split, _data_fingerprint(split)) for n, split in loaded.items()}
    test_rows = functools.partial(input_pipeline.test_rows, **where)
    test_split = load("test", max_examples=data.max_test_examples, rows=test_rows)
    return {role: loaded[n] for role, n in budgets.items()}, test_split


def _log_data(plan: RunPlan, role_data: dict[str, tuple[Split, str]], test_size: int) -> None:
    """One line: the examples each stage trains on, the test examples, devices, processes."""
    processes = jax.process_count()
    sizes = {role: len(split) * processes for role, (split, _) in role_data.items()}
    train_text = f"{sizes['student']} train"
    if len(set(sizes.values())) > 1:
        train_text = f"{sizes['teacher']} train for the teacher, {sizes['student']} for students"
    logger.info(
        "%s: %s (%d shard(s)) / %d test examples on %d device(s), %d process(es)",
        plan.data.dataset,
        train_text,
        plan.data.shards,
        test_size,
        jax.device_count(),
        processes,
    )


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
    summary: dict[str, Any] = {"dataset": plan.data.dataset}
    teacher_variables = None
    try:
        if plan.needs_teacher:
            teacher_variables, summary["teacher_best_accuracy"] = _teacher(ctx, plan)
        for stage, init, distill in plan.students:
            result = _student(ctx, plan, teacher_variables, stage=stage, init=init, distill=distill)
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
