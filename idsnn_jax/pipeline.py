"""The three IDSNN stages: train the ANN teacher, initialize the SNN from it, distill.

`run(config, workdir)` is what the CLI and the notebooks call. Every stage checkpoints
under the workdir and a rerun of the same call resumes where it stopped, skipping
finished stages. The ablations of the paper are config switches alone:
baseline (`init_from_teacher=False, distill=False`), init only (`distill=False`),
KD only (`init_from_teacher=False`) and IDSNN (both, the default).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import ml_collections

from idsnn_jax import steps, train
from idsnn_jax.checkpoints import load_variables
from idsnn_jax.datasets import load_split
from idsnn_jax.logs import MetricLogger, logger, setup_logging
from idsnn_jax.plan import RunPlan, build_plan
from idsnn_jax.transfer import init_snn_from_ann


def train_teacher(
    ctx: train.RunContext, config: ml_collections.ConfigDict, plan: RunPlan
) -> tuple[dict[str, Any], float | None]:
    """Stage 1: (the teacher's variables as host arrays, its best test accuracy or None).

    Trains the teacher in `<workdir>/teacher` (resuming, or returning at once when done),
    or loads `config.teacher.checkpoint`. The best-accuracy epoch is what the student
    learns from.
    """
    expected = plan.abstract_variables["teacher"]
    if config.teacher.checkpoint:
        variables = load_variables(config.teacher.checkpoint)
        _check_teacher(config, variables, expected)
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


def _check_teacher(config: ml_collections.ConfigDict, variables: Any, expected: Any) -> None:
    """ValueError naming the first tree path whose shape or dtype differs from the model's."""
    got = dict(_shapes(variables))
    for path, want in _shapes(expected):
        if got.get(path) != want:
            raise ValueError(
                f"config.teacher.checkpoint={config.teacher.checkpoint!r} does not hold a "
                f"{config.teacher.model!r} of width {config.teacher.width} for this dataset: "
                f"{path} is {got.get(path, 'missing')} in the checkpoint, {want} in the model; "
                "set teacher.model / teacher.width to match it"
            )


def _shapes(tree: Any) -> list[tuple[str, tuple]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return [(jax.tree_util.keystr(p), (tuple(x.shape), str(x.dtype))) for p, x in leaves]


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
    """Stages 2 and 3 for one student: build, optionally initialize from the teacher, train."""
    model = plan.models["student"]
    variables = steps.init_variables(model, plan.info, config.seed + 1)
    if init:
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
    """Builds and checks everything `config` describes (`plan.build_plan`), then loads both
    splits and sets up the mesh and the metric writer."""
    setup_logging()
    plan = build_plan(config)
    train_split, test_split = (
        load_split(
            config.dataset, split, config.data_dir, max_examples=config[f"max_{split}_examples"]
        )
        for split in ("train", "test")
    )
    logger.info(
        "%s: %d train / %d test examples on %d device(s)",
        config.dataset,
        len(train_split),
        len(test_split),
        jax.device_count(),
    )
    ctx = train.RunContext(
        workdir, train_split, test_split, plan.info, steps.create_mesh(), MetricLogger(workdir)
    )
    return ctx, plan


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the whole pipeline; returns and writes `summary.json`."""
    start = time.time()
    ctx, plan = create_context(config, workdir)
    summary: dict[str, Any] = {"dataset": config.dataset}
    teacher_variables = None
    if plan.needs_teacher:
        teacher_variables, summary["teacher_best_accuracy"] = train_teacher(ctx, config, plan)
    students = [("student", config.init_from_teacher, config.distill)]
    if config.compare_baseline:
        students.append(("baseline", False, False))
    for stage, init, distill in students:
        result = _student(
            ctx, config, plan, teacher_variables, stage=stage, init=init, distill=distill
        )
        summary[f"{stage}_best_accuracy"] = result.best_accuracy
        summary[f"{stage}_last_accuracy"] = result.last_accuracy
        summary[f"{stage}_epochs"] = len(result.history)
    ctx.writer.close()
    summary["wall_seconds"] = time.time() - start
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
    logger.info("summary: %s", json.dumps(summary))
    return summary
