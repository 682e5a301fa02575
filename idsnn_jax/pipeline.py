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
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from idsnn_jax import input_pipeline, train
from idsnn_jax.checkpoints import load_variables
from idsnn_jax.logs import MetricLogger, logger, setup_logging
from idsnn_jax.models import MODELS, create_model, is_spiking
from idsnn_jax.transfer import init_snn_from_ann

DATASETS = ("cifar10", "cifar100", "fashion_mnist")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _check(
    config: ml_collections.ConfigDict, key: str, ok: Callable[[Any], bool], expected: str
) -> None:
    """Raises ValueError naming the dotted `key` unless `ok(config.<key>)`."""
    value = config
    for name in key.split("."):
        value = value[name]
    if not ok(value):
        raise ValueError(f"config.{key}={value!r} is invalid: expected {expected}")


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _increasing_epochs(values: Any) -> bool:
    values = list(values)
    return all(isinstance(m, int) and m > 0 for m in values) and values == sorted(values)


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every value `run` uses before any work; a ValueError names the bad key."""
    devices = jax.device_count()
    _check(config, "dataset", lambda v: v in DATASETS, f"one of {DATASETS}")
    for key in ("batch_size", "eval_batch_size"):
        _check(config, key, _positive_int, "an integer >= 1")
        _check(config, key, lambda v: v % devices == 0, f"a multiple of the {devices} devices")
    _check(
        config,
        "max_train_examples",
        lambda v: v is None or v >= config.batch_size,
        "None or >= batch_size",
    )
    _check(
        config,
        "max_test_examples",
        lambda v: v is None or _positive_int(v),
        "None or an integer >= 1",
    )
    _check(config, "dtype", lambda v: v in DTYPES, f"one of {sorted(DTYPES)}")
    for role in ("teacher", "student"):
        _check(config, f"{role}.model", lambda v: v in MODELS, f"one of {sorted(MODELS)}")
        _check(config, f"{role}.width", lambda v: v > 0, "> 0")
        _check(
            config,
            f"{role}.num_epochs",
            lambda v: isinstance(v, int) and v >= 0,
            "an integer >= 0",
        )
    _check(config, "teacher.model", lambda v: not is_spiking(v), "an ANN (resnet*)")
    _check(config, "student.model", is_spiking, "a spiking model (spiking_* or sew_*)")
    _check(config, "student.time_steps", _positive_int, "an integer >= 1")
    _check(config, "student.num_epochs", lambda v: v >= 1, ">= 1")
    if config.init_from_teacher or config.distill:
        if config.teacher.checkpoint:
            _check(config, "teacher.checkpoint", os.path.exists, "an existing path")
        else:
            _check(
                config, "teacher.num_epochs", lambda v: v >= 1, ">= 1 (or set teacher.checkpoint)"
            )
    _check(config, "block_map", lambda v: v in ("first", "uniform"), "'first' or 'uniform'")
    _check(config, "kd_alpha", lambda v: v >= 0, ">= 0")
    _check(config, "kd_tau", lambda v: v > 0, "> 0")
    _check(config, "optimizer.learning_rate", lambda v: v > 0, "> 0")
    _check(config, "optimizer.momentum", lambda v: 0 <= v < 1, "in [0, 1)")
    _check(config, "optimizer.weight_decay", lambda v: v >= 0, ">= 0")
    _check(config, "optimizer.lr_gamma", lambda v: 0 < v <= 1, "in (0, 1]")
    _check(
        config,
        "optimizer.lr_interval",
        lambda v: isinstance(v, int) and v >= 0,
        "an integer >= 0 (0: use lr_milestones)",
    )
    _check(config, "optimizer.lr_milestones", _increasing_epochs, "increasing positive epochs")
    _check(config, "augment.crop_padding", lambda v: v >= 0, ">= 0")
    for key in ("checkpoint_every_epochs", "checkpoint_keep", "log_every_steps"):
        _check(config, key, _positive_int, "an integer >= 1")


def _model(config: ml_collections.ConfigDict, role: str, num_classes: int):
    cfg = config[role]
    kwargs = dict(
        num_classes=num_classes,
        width=cfg.width,
        dtype=DTYPES[config.dtype],
        bn_axis_name=train.AXIS,
    )
    if is_spiking(cfg.model):
        kwargs.update(
            time_steps=cfg.time_steps, stem_padding=cfg.stem_padding, **cfg.neuron.to_dict()
        )
    return create_model(cfg.model, **kwargs)


def train_teacher(ctx: train.RunContext) -> tuple[Any, dict[str, Any], float | None]:
    """Stage 1: (teacher model, its variables on host, its best test accuracy or None).

    Trains the teacher in `<workdir>/teacher` (resuming, or returning at once when done),
    or loads `config.teacher.checkpoint`. The best-accuracy checkpoint is what the student
    learns from.
    """
    config, info = ctx.config, ctx.info
    model = _model(config, "teacher", info.num_classes)
    if config.teacher.checkpoint:
        variables = load_variables(config.teacher.checkpoint)
        expected = jax.eval_shape(lambda: train.init_variables(model, info, config.seed))
        got = jax.tree.map(lambda x: (x.shape, x.dtype), variables)
        want = jax.tree.map(lambda x: (x.shape, x.dtype), expected)
        if got != want:
            raise ValueError(
                f"config.teacher.checkpoint={config.teacher.checkpoint!r} does not hold a "
                f"{config.teacher.model!r} of width {config.teacher.width} for "
                f"{info.num_classes} classes: set teacher.model / teacher.width to match it"
            )
        logger.info("[teacher] loaded from %s", config.teacher.checkpoint)
        return model, variables, None
    result = train.fit(
        ctx,
        stage="teacher",
        model=model,
        mode="ann",
        variables=train.init_variables(model, info, config.seed),
        num_epochs=config.teacher.num_epochs,
    )
    variables = load_variables(os.path.join(ctx.workdir, "teacher"))
    return model, variables, result.best_accuracy


def _student(
    ctx: train.RunContext, teacher: Any, *, stage: str, init: bool, distill: bool
) -> train.FitResult:
    """Stages 2 and 3 for one student: build, optionally initialize from the teacher, train."""
    config = ctx.config
    model = _model(config, "student", ctx.info.num_classes)
    variables = train.init_variables(model, ctx.info, config.seed + 1)
    if init:
        variables, report = init_snn_from_ann(
            teacher[1],
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
    return train.fit(
        ctx,
        stage=stage,
        model=model,
        variables=variables,
        mode="idsnn" if distill else "snn",
        num_epochs=config.student.num_epochs,
        teacher=teacher if distill else None,
    )


def create_context(config: ml_collections.ConfigDict, workdir: str) -> train.RunContext:
    """Validates `config`, loads both splits and sets up the mesh and the metric writer."""
    setup_logging()
    validate_config(config)
    info = input_pipeline.dataset_info(config.dataset)
    train_split, test_split = (
        input_pipeline.load_split(
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
    return train.RunContext(
        config, workdir, train_split, test_split, info, train.create_mesh(), MetricLogger(workdir)
    )


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) the whole pipeline; returns and writes `summary.json`."""
    start = time.time()
    ctx = create_context(config, workdir)
    summary: dict[str, Any] = {"dataset": config.dataset}
    teacher = None
    if config.init_from_teacher or config.distill:
        *teacher, summary["teacher_best_accuracy"] = train_teacher(ctx)
    students = [("student", config.init_from_teacher, config.distill)]
    if config.compare_baseline:
        students.append(("baseline", False, False))
    for stage, init, distill in students:
        result = _student(ctx, teacher, stage=stage, init=init, distill=distill)
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
