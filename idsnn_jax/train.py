"""The loop layer: train one model (teacher or student) for some epochs, resumably.

`fit` runs the epoch loop over the jitted steps of `steps.py`: batches from the host,
evaluation on the whole test split after every epoch, a NaN guard, metric records and
one checkpoint per saved epoch. It reads a small frozen `FitOptions`, never the config:
only the pipeline reads the ConfigDict.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from idsnn_jax import input_pipeline, steps
from idsnn_jax.checkpoints import StageCheckpoints
from idsnn_jax.datasets import DatasetInfo, Split
from idsnn_jax.logs import MetricLogger, progress


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How one stage trains. Invalid values raise ValueError naming the field."""

    num_epochs: int
    batch_size: int = 64  # global, over all devices
    eval_batch_size: int = 512
    seed: int = 0
    optimizer: steps.OptimizerOptions = steps.OptimizerOptions()
    kd_alpha: float = 0.3
    kd_tau: float = 4.0
    crop_padding: int = 4
    flip: bool = True
    checkpoint_keep: int = 2  # newest saved epochs kept (the best one is kept besides)
    checkpoint_every_epochs: int = 1  # the last epoch and the best one are always saved
    log_every_steps: int = 50

    def __post_init__(self) -> None:
        positive = (
            "num_epochs",
            "batch_size",
            "eval_batch_size",
            "checkpoint_keep",
            "checkpoint_every_epochs",
            "log_every_steps",
        )
        counts = {name: getattr(self, name) for name in positive}
        checks = [(n, steps.is_int(v) and v >= 1, "an integer >= 1") for n, v in counts.items()]
        checks += [
            ("kd_alpha", self.kd_alpha >= 0, ">= 0"),
            ("kd_tau", self.kd_tau > 0, "> 0"),
            (
                "crop_padding",
                steps.is_int(self.crop_padding) and self.crop_padding >= 0,
                "an integer >= 0",
            ),
        ]
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r} is invalid: expected {expected}")


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of a run shares: data, devices and outputs."""

    workdir: str
    train_split: Split
    test_split: Split
    info: DatasetInfo
    mesh: Mesh
    writer: MetricLogger


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Outcome of `fit`: the final state (replicated on the mesh) and per-epoch records."""

    state: steps.TrainState
    history: list[dict[str, float]]

    @property
    def best_epoch(self) -> int:
        """1-based epoch of the best test accuracy (the earliest, on ties)."""
        accuracies = [r["test_accuracy"] for r in self.history]
        return accuracies.index(max(accuracies)) + 1

    @property
    def best_accuracy(self) -> float:
        return self.history[self.best_epoch - 1]["test_accuracy"]

    @property
    def last_accuracy(self) -> float:
        return self.history[-1]["test_accuracy"]


def stage_seed(seed: int, stage: str) -> int:
    """`seed` offset by a stable hash of the stage name: independent RNG streams per stage."""
    return seed + zlib.crc32(stage.encode()) % 2**16


def fit(
    ctx: RunContext,
    *,
    stage: str,
    model: nn.Module,
    variables: dict[str, Any],
    options: FitOptions,
    teacher: tuple[nn.Module, dict[str, Any]] | None = None,
) -> FitResult:
    """Trains `model` from `variables` for `options.num_epochs`, evaluating every epoch.

    With a `teacher` (model, variables) the loss distils from it (`steps.make_train_step`).
    Resumes from the newest checkpoint in `<workdir>/<stage>` (same schedule, data order
    and RNG stream, so the result equals an uninterrupted run) and returns at once when
    the stage already finished. Raises FloatingPointError naming the step if the loss
    diverges.
    """
    steps_per_epoch = input_pipeline.num_train_steps(len(ctx.train_split), options.batch_size)
    tx, schedule = steps.create_optimizer(options.optimizer, steps_per_epoch, options.num_epochs)
    state = steps.create_train_state(variables, tx, stage_seed(options.seed, stage))
    state = steps.replicate(state, ctx.mesh)
    ckpt = StageCheckpoints(os.path.join(ctx.workdir, stage), keep=options.checkpoint_keep)
    history: list[dict[str, float]] = []
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        history = meta["history"]
    if len(history) >= options.num_epochs:
        ckpt.close()
        return FitResult(state, history[: options.num_epochs])
    train_fn, eval_fn = _compile(ctx, model, tx, options, teacher[0] if teacher else None)
    teacher_variables = steps.replicate(teacher[1] if teacher else {}, ctx.mesh)
    try:
        for epoch in range(len(history), options.num_epochs):
            state, record = _train_epoch(
                ctx, stage, epoch, options, train_fn, state, teacher_variables
            )
            record["lr"] = float(schedule(epoch * steps_per_epoch))
            test = evaluate(eval_fn, state, ctx.test_split, options.eval_batch_size, ctx.mesh)
            record.update({f"test_{k}" if "/" not in k else k: v for k, v in test.items()})
            history.append(record)
            ctx.writer.write(stage, epoch + 1, record)
            if _should_save(history, options):
                meta = {"epoch": epoch + 1, "history": history}
                ckpt.save(epoch + 1, state, meta, record["test_accuracy"])
    finally:
        ckpt.close()
    return FitResult(state, history)


def _compile(
    ctx: RunContext,
    model: nn.Module,
    tx: optax.GradientTransformation,
    options: FitOptions,
    teacher: nn.Module | None,
) -> tuple[steps.TrainStep, Callable]:
    """The jitted, sharded train and eval steps of `model` (distilling from `teacher`)."""
    train_step = steps.make_train_step(
        model,
        tx,
        ctx.info,
        teacher=teacher,
        kd_alpha=options.kd_alpha,
        kd_tau=options.kd_tau,
        crop_padding=options.crop_padding,
        flip=options.flip,
    )
    eval_step = steps.make_eval_step(model, ctx.info)
    return (
        steps.compile_train_step(ctx.mesh, train_step),
        steps.compile_eval_step(ctx.mesh, eval_step),
    )


def _should_save(history: list[dict[str, float]], options: FitOptions) -> bool:
    """Every `checkpoint_every_epochs`, the last epoch, and a new best epoch."""
    epoch = len(history)
    *before, record = history
    is_best = all(record["test_accuracy"] > r["test_accuracy"] for r in before)
    return epoch % options.checkpoint_every_epochs == 0 or epoch == options.num_epochs or is_best


def evaluate(
    eval_fn: Callable, state: steps.TrainState, split: Split, batch_size: int, mesh: Mesh
) -> dict[str, float]:
    """Top-1 accuracy, mean loss and mean firing rates over every example of `split`."""
    totals: dict[str, jax.Array] = {}
    batches = input_pipeline.eval_batches(
        split,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    for batch in batches:
        sums = eval_fn(state, steps.shard_batch(batch, mesh))
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    out = {"accuracy": float(totals.pop("correct")) / count}
    out.update({k: float(v) / count for k, v in totals.items()})
    return out


def _train_epoch(
    ctx: RunContext,
    stage: str,
    epoch: int,
    options: FitOptions,
    train_fn: steps.TrainStep,
    state: steps.TrainState,
    teacher_variables: Any,
) -> tuple[steps.TrainState, dict[str, float]]:
    """One pass over the shuffled training split; returns the new state and mean metrics."""
    steps_per_epoch = input_pipeline.num_train_steps(len(ctx.train_split), options.batch_size)
    batches = input_pipeline.train_batches(
        ctx.train_split,
        global_batch_size=options.batch_size,
        seed=options.seed,
        epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    bar = progress(
        batches,
        total=steps_per_epoch,
        desc=f"{stage} epoch {epoch + 1}",
        images_per_item=options.batch_size,
    )
    start = time.perf_counter()
    pending: list[dict[str, jax.Array]] = []
    fetched: list[dict[str, float]] = []
    for i, batch in enumerate(bar):
        state, metrics = train_fn(state, steps.shard_batch(batch, ctx.mesh), teacher_variables)
        pending.append(metrics)
        if (i + 1) % options.log_every_steps == 0 or i + 1 == steps_per_epoch:
            fetched.extend(_check_finite(jax.device_get(pending), stage, epoch, len(fetched)))
            pending = []
            bar.set_postfix(loss=f"{fetched[-1]['loss']:.4f}")
    seconds = time.perf_counter() - start
    return state, {
        "train_loss": float(np.mean([m["loss"] for m in fetched])),
        "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
        "images_per_sec": steps_per_epoch * options.batch_size / seconds,
        "epoch_seconds": seconds,
    }


def _check_finite(
    metrics: list[dict[str, Any]], stage: str, epoch: int, offset: int
) -> list[dict[str, float]]:
    """`metrics` as floats; FloatingPointError naming stage, epoch and step on a NaN loss."""
    out = [{k: float(v) for k, v in m.items()} for m in metrics]
    for i, m in enumerate(out):
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(
                f"[{stage}] training loss is {m['loss']} at epoch {epoch + 1}, step "
                f"{offset + i + 1} of the epoch; lower optimizer.learning_rate or check the data"
            )
    return out
