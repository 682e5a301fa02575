"""The loop layer: train one model (teacher or student) for some epochs, resumably.

`fit` runs the epoch loop over the jitted steps of `steps.py`: each process's training shards
placed on its devices once, each epoch's order drawn there, `steps_per_call` steps per host
dispatch, evaluation on the whole test split after every epoch, a NaN guard, metric
records, one checkpoint per saved epoch, and safe points where SIGTERM/SIGINT stop it
(`faults.point`). It reads a small frozen `FitOptions`, never the config:
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
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import energy, faults, input_pipeline, optim, sltt, steps
from idsnn_jax.checkpoints import StageCheckpoints, fingerprint
from idsnn_jax.checks import check_fields, is_int
from idsnn_jax.datasets import DatasetInfo, Split
from idsnn_jax.logs import MetricLogger, logger, progress
from idsnn_jax.losses import LossOptions


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How one stage trains. Invalid values raise ValueError naming the field."""

    num_epochs: int
    batch_size: int = 64  # global, over all devices
    eval_batch_size: int = 512
    seed: int = 0
    optimizer: optim.OptimizerOptions = optim.OptimizerOptions()
    loss: LossOptions = LossOptions()
    augment: input_pipeline.AugmentOptions = input_pipeline.AugmentOptions()
    # > 0: also keep an exponential moving average of the weights (`steps.ema_update`),
    # evaluated beside them every epoch (`test_ema_*`); the raw weights are what is selected.
    ema_decay: float = 0.0
    checkpoint_keep: int = 2  # newest saved epochs kept (the best one is kept besides)
    checkpoint_every_epochs: int = 1  # the last epoch and the best one are always saved
    log_every_steps: int = 50
    steps_per_call: int = 1  # train steps per host dispatch (a scan); results do not depend on it
    energy: str = ""  # an `energy.PRESETS` name: count SOPs/MACs in evaluation; "": none
    # "bptt" (exact) or "sltt" (online, memory independent of T: `sltt.py`), and the time
    # steps SLTT takes the gradient of (None: all).
    gradient: str = "bptt"
    sltt_k: int | None = None

    def __post_init__(self) -> None:
        positive = (
            "num_epochs",
            "batch_size",
            "eval_batch_size",
            "checkpoint_keep",
            "checkpoint_every_epochs",
            "log_every_steps",
            "steps_per_call",
        )
        counts = {name: getattr(self, name) for name in positive}
        checks = [(n, is_int(v) and v >= 1, "an integer >= 1") for n, v in counts.items()]
        checks.append(("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1) (0: no EMA)"))
        ok = self.energy in ("", *energy.PRESETS)
        checks.append(("energy", ok, f"'' (off) or one of {sorted(energy.PRESETS)}"))
        check_fields(self, checks)
        sltt.check_gradient_args(gradient=self.gradient, sltt_k=self.sltt_k)


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of a run shares: data, devices and outputs. With several processes,
    each holds its own splits: its training shards and its part of the test split."""

    workdir: str
    train_split: Split  # this process's `data_shards / process_count` training shards
    test_split: Split  # this process's part (`input_pipeline.test_rows`)
    info: DatasetInfo
    mesh: Mesh
    writer: MetricLogger
    data_shards: int = 1  # the training split's shards, in all processes together
    test_size: int | None = None  # the whole test split's; None: test_split is all of it
    data_fingerprint: str = ""  # of the whole training split (`checkpoints.fingerprint`)

    @property
    def train_size(self) -> int:
        """The examples of all training shards (every process holds as many)."""
        return len(self.train_split) * jax.process_count()


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
    Resumes from the newest checkpoint in `<workdir>/<stage>`, an epoch's or one saved
    midway through an epoch by a stop (same schedule, data order and RNG stream, so the
    result equals an uninterrupted run), and returns at once when the stage already
    finished. Raises FloatingPointError naming the step if the loss diverges (before that
    epoch is saved), and `faults.Preempted` at a safe point after SIGTERM/SIGINT, having
    saved there; either way a pending checkpoint save is finished first.
    """
    steps_per_epoch = input_pipeline.num_train_steps(ctx.train_size, options.batch_size)
    tx, schedule = optim.create_optimizer(options.optimizer, steps_per_epoch, options.num_epochs)
    seed = stage_seed(options.seed, stage)
    state = steps.create_train_state(variables, tx, seed, ema=options.ema_decay > 0)
    state = steps.replicate(state, ctx.mesh)
    ckpt = StageCheckpoints(os.path.join(ctx.workdir, stage), keep=options.checkpoint_keep)
    history: list[dict[str, float]] = []
    partial = _Partial()
    inputs = {
        "num_epochs": options.num_epochs,
        "data": ctx.data_fingerprint,
        "teacher": fingerprint(teacher[1]) if teacher else "",
    }
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        history = meta["history"]
        partial = _Partial(meta.get("steps_done", 0), meta.get("metrics", []))
        trained = len(history) * steps_per_epoch + partial.steps
        where = f"[{stage}] ({ckpt.directory})"
        _check_resume(where, meta, inputs, options, steps_per_epoch, trained)
    if len(history) >= options.num_epochs:
        ckpt.close()
        return _finished(stage, history, state, options)
    if history or partial.steps:
        logger.info(
            "[%s] resuming at epoch %d of %d%s",
            stage,
            len(history) + 1,
            options.num_epochs,
            f", step {partial.steps + 1}" if partial.steps else "",
        )
    train_fn, eval_fns = _compile(ctx, model, tx, options, teacher[0] if teacher else None)
    teacher_variables = steps.replicate(teacher[1] if teacher else {}, ctx.mesh)
    data = steps.device_data(ctx.train_split.images, ctx.train_split.labels, ctx.mesh)
    loop = _EpochLoop(ctx, stage, options, train_fn, data, teacher_variables, ckpt, inputs)
    try:
        for epoch in range(len(history), options.num_epochs):
            state, record = loop.run(epoch, state, history, partial)
            partial = _Partial()
            record["lr"] = float(schedule(epoch * steps_per_epoch))
            test = _test(ctx, eval_fns, state, options, stage, epoch)
            record.update({f"test_{k}" if "/" not in k else k: v for k, v in test.items()})
            history.append(record)
            ctx.writer.write(stage, epoch + 1, record)
            if _should_save(history, options):
                meta = {"epoch": epoch + 1, "history": history, **inputs}
                ckpt.save(epoch + 1, state, meta, record["test_accuracy"])
                _stop_after(faults.point("save"), stage, epoch + 1)  # while the save is written
    finally:
        ckpt.close()  # waits for a pending save, also when stopped by an exception
    _stop_after(faults.point("stage_end"), stage, len(history))
    return FitResult(state, history)


def _check_resume(
    stage: str,
    meta: dict[str, Any],
    inputs: dict[str, Any],
    options: FitOptions,
    steps_per_epoch: int,
    trained: int,
) -> None:
    """ValueError unless a stage resumes with what its checkpoint (`meta`) was trained with:
    the same data and teacher (by content), and a learning rate that, over the `trained`
    steps, does not depend on a changed `num_epochs` (a cosine schedule, or a warm-up as long
    as the run, does). Checkpoints older than these records are not checked."""
    fix = "or use a new --workdir"
    if meta.get("data", inputs["data"]) != inputs["data"]:
        raise ValueError(
            f"{stage} was trained on other data (fingerprint {meta['data']} -> "
            f"{inputs['data']}): give it the data it was trained on (data_dir), {fix}"
        )
    if meta.get("teacher", inputs["teacher"]) != inputs["teacher"]:
        raise ValueError(
            f"{stage} distilled from another teacher (variables' fingerprint {meta['teacher']} "
            f"-> {inputs['teacher']}): give it that teacher (teacher.checkpoint), {fix}"
        )
    old = meta.get("num_epochs", options.num_epochs)
    if old != options.num_epochs and not _same_rates(options, steps_per_epoch, trained, old):
        raise ValueError(
            f"{stage} num_epochs {old} -> {options.num_epochs} changes the learning rate of the "
            f"{trained} steps already trained (schedule={options.optimizer.schedule!r}, "
            f"warmup_epochs={options.optimizer.warmup_epochs}), so the run would not equal one "
            f"configured for {options.num_epochs} epochs from the start: keep num_epochs={old}, "
            f"{fix}"
        )


def _same_rates(options: FitOptions, steps_per_epoch: int, trained: int, old: int) -> bool:
    """Whether the learning rate of steps 0 .. trained - 1 is the same for a run of `old`
    epochs as for one of `options.num_epochs` (up to the rate itself, which a diverged run
    may lower)."""
    shape = dataclasses.replace(options.optimizer, learning_rate=1.0)
    steps = np.arange(trained)
    epochs = (old, options.num_epochs)
    rates = [
        np.broadcast_to(optim.lr_schedule(shape, steps_per_epoch, n)(steps), steps.shape)
        for n in epochs
    ]
    return bool(np.array_equal(*rates))


@dataclasses.dataclass(frozen=True)
class _Partial:
    """How far the epoch in progress got: steps done and their per-step metrics."""

    steps: int = 0
    metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _finished(
    stage: str, history: list[dict[str, float]], state: steps.TrainState, options: FitOptions
) -> FitResult:
    """The result of a stage that finished earlier."""
    result = FitResult(state, history[: options.num_epochs])
    logger.info(
        "[%s] finished earlier (best %.2f%% at epoch %d of %d), skipping",
        stage,
        100 * result.best_accuracy,
        result.best_epoch,
        options.num_epochs,
    )
    return result


def _stop_after(signum: int | None, stage: str, epoch: int) -> None:
    """Raises `faults.Preempted` for a stop once `epoch` (1-based) was saved."""
    if signum is not None:
        where, resume = f"after epoch {epoch}", f"resume after epoch {epoch}"
        raise faults.stopped(signum, stage, where, resume)


def _compile(
    ctx: RunContext,
    model: nn.Module,
    tx: optax.GradientTransformation,
    options: FitOptions,
    teacher: nn.Module | None,
) -> tuple[steps.TrainLoop, tuple[Callable, Callable]]:
    """The jitted, sharded train loop of `model` (distilling from `teacher`) and its eval
    steps: (counting operations if `options.energy`, never counting: for the EMA weights).
    Each compiles on its first call, so an unused one costs nothing."""
    train_step = steps.make_train_step(
        model,
        tx,
        ctx.info,
        teacher=teacher,
        loss=options.loss,
        augment=options.augment,
        ema_decay=options.ema_decay,
        gradient=options.gradient,
        sltt_k=options.sltt_k,
    )
    eval_fn = lambda count: steps.compile_eval_step(
        ctx.mesh, steps.make_eval_step(model, ctx.info, count_ops=count)
    )
    plain = eval_fn(False)
    counting = eval_fn(True) if options.energy else plain
    return steps.compile_train_loop(ctx.mesh, steps.make_train_loop(train_step)), (counting, plain)


def _test(
    ctx: RunContext,
    eval_fns: tuple[Callable, Callable],
    state: steps.TrainState,
    options: FitOptions,
    stage: str,
    epoch: int,
) -> dict[str, float]:
    """The epoch's evaluation on the whole test split: `evaluate`'s means, the energy of
    `options.energy`, and the EMA weights' accuracy and loss (`ema_*`, not counted again)
    when kept. FloatingPointError when the test loss is not finite (a last step that broke
    the weights). `eval_fns`: (the eval step counting operations if asked, one never)."""
    evaluate_on = lambda s, fn: evaluate(
        fn, s, ctx.test_split, options.eval_batch_size, ctx.mesh, ctx.test_size
    )
    test = evaluate_on(state, eval_fns[0])
    if not math.isfinite(test["loss"]):
        raise FloatingPointError(
            f"[{stage}] test loss is {test['loss']} after epoch {epoch + 1}; lower "
            "optimizer.learning_rate or check the data"
        )
    if options.energy:
        costs = energy.PRESETS[options.energy]
        test["energy_uj"] = energy.energy_uj(test["macs"], test["sops"], costs)
    if state.ema is not None:
        averaged = evaluate_on(state.replace(**state.ema), eval_fns[1])
        test |= {"ema_accuracy": averaged["accuracy"], "ema_loss": averaged["loss"]}
    return test


def _should_save(history: list[dict[str, float]], options: FitOptions) -> bool:
    """Every `checkpoint_every_epochs`, the last epoch, and a new best epoch."""
    epoch = len(history)
    *before, record = history
    is_best = all(record["test_accuracy"] > r["test_accuracy"] for r in before)
    return epoch % options.checkpoint_every_epochs == 0 or epoch == options.num_epochs or is_best


def evaluate(
    eval_fn: Callable,
    state: steps.TrainState,
    split: Split,
    batch_size: int,
    mesh: Mesh,
    total: int | None = None,
) -> dict[str, float]:
    """Top-1 accuracy, mean loss and mean firing rates over every example of a split of
    `total` examples, of which this process holds `split` (default: all of it); the sums of
    all processes are combined in the eval step.

    Each batch's sums come to the host and add up there in float64: an eager `jnp.add` on
    the device outputs, dispatched asynchronously between the eval steps' all-reduces,
    deadlocks XLA:CPU with several devices (3 of 4 wait in the all-reduce forever)."""
    totals: dict[str, np.ndarray] = {}
    batches = input_pipeline.eval_batches(
        split, global_batch_size=batch_size, total=total, process_count=jax.process_count()
    )
    for batch in batches:
        sums = jax.device_get(eval_fn(state, steps.shard_batch(batch, mesh)))
        sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
        totals = sums if not totals else {k: totals[k] + v for k, v in sums.items()}
    count = float(totals.pop("count"))
    out = {"accuracy": float(totals.pop("correct")) / count}
    out.update({k: float(v) / count for k, v in totals.items()})
    return out


class _EpochLoop:
    """One stage's passes over the training split, stoppable after any dispatch: a stop
    signal (`faults.point`) saves the state there (`StageCheckpoints.save_partial`) and ends
    the run with `faults.Preempted`."""

    def __init__(
        self,
        ctx: RunContext,
        stage: str,
        options: FitOptions,
        train_fn: steps.TrainLoop,
        data: steps.Batch,
        teacher_variables: Any,
        ckpt: StageCheckpoints,
        inputs: dict[str, Any],
    ) -> None:
        self.ctx, self.stage, self.options, self.ckpt = ctx, stage, options, ckpt
        self.inputs = inputs  # what the stage trains with, saved beside a stopped epoch
        self.step = lambda state, idx, valid: train_fn(state, data, idx, valid, teacher_variables)

    def run(
        self, epoch: int, state: steps.TrainState, history: list[dict], partial: _Partial
    ) -> tuple[steps.TrainState, dict[str, float]]:
        """Epoch `epoch` (0-based) from `partial` on; returns the new state and mean
        metrics (`history`: the finished epochs, saved with a stop)."""
        options = self.options
        num_steps = input_pipeline.num_train_steps(self.ctx.train_size, options.batch_size)
        calls = _epoch_calls(self.ctx, epoch, options, partial.steps)
        bar = progress(
            calls,
            total=len(calls),
            desc=f"{self.stage} epoch {epoch + 1}",
            images_per_item=options.steps_per_call * options.batch_size,
        )
        start = time.perf_counter()
        pending: list[dict[str, jax.Array]] = []
        fetched, done = list(partial.metrics), partial.steps
        for indices, valid in bar:
            state, metrics = self.step(state, indices, valid)
            pending.append(metrics)
            before, done = done, done + int(np.sum(valid))
            signum = faults.point("train_call")
            every = options.log_every_steps
            if signum is not None or done // every > before // every or done == num_steps:
                fetched += self._fetch(pending, num_steps - len(fetched), epoch, len(fetched))
                pending = []
                bar.set_postfix(loss=f"{fetched[-1]['loss']:.4f}")
            if signum is not None:
                self._stop(signum, state, epoch, history, _Partial(done, fetched), num_steps)
        seconds = time.perf_counter() - start
        return state, {
            "train_loss": float(np.mean([m["loss"] for m in fetched])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
            "images_per_sec": (num_steps - partial.steps) * options.batch_size / seconds,
            "epoch_seconds": seconds,
        }

    def _fetch(self, pending: list, limit: int, epoch: int, offset: int) -> list[dict]:
        per_step = _per_step(jax.device_get(pending), limit)
        return _check_finite(per_step, self.stage, epoch, offset)

    def _stop(
        self,
        signum: int,
        state: steps.TrainState,
        epoch: int,
        history: list[dict],
        partial: _Partial,
        num_steps: int,
    ) -> None:
        """Saves the state after `partial.steps` of epoch `epoch` and raises `Preempted`."""
        meta = {"history": history, "steps_done": partial.steps, "metrics": partial.metrics}
        meta |= self.inputs
        self.ckpt.save_partial(state, meta)
        where = f"epoch {epoch + 1}, step {partial.steps} of {num_steps} (saved there)"
        raise faults.stopped(signum, self.stage, where, "resume from that step")


def _epoch_calls(
    ctx: RunContext, epoch: int, options: FitOptions, first_step: int = 0
) -> list[tuple[jax.Array, np.ndarray]]:
    """The epoch's (indices (k, B) on device, valid (k,)) per dispatch from step `first_step`
    on, k = steps_per_call (or fewer, for a short epoch); the last call is padded with invalid
    steps, so every call has one shape and the loop compiles once."""
    num_steps = input_pipeline.num_train_steps(ctx.train_size, options.batch_size)
    k = min(options.steps_per_call, num_steps)
    indices = input_pipeline.epoch_indices(
        ctx.train_size,
        options.batch_size,
        seed=options.seed,
        epoch=epoch,
        num_shards=ctx.data_shards,
        process_count=jax.process_count(),
        first_step=first_step,
        steps_multiple=k,
        sharding=NamedSharding(ctx.mesh, P(None, steps.AXIS)),
    )
    valid = np.arange(indices.shape[0]) < num_steps - first_step
    calls = [(indices[s : s + k], valid[s : s + k]) for s in range(0, indices.shape[0], k)]
    # Ready before the first step, a precaution: eager device ops in flight beside the steps'
    # all-reduces are the pattern that deadlocked XLA:CPU in `evaluate` (not seen here).
    return jax.block_until_ready(calls)


def _per_step(metrics: list[dict[str, np.ndarray]], limit: int) -> list[dict[str, Any]]:
    """Per-call metrics (each (k,)) as one dict per step, at most `limit` (padding dropped)."""
    out = [{k: v[i] for k, v in m.items()} for m in metrics for i in range(len(m["loss"]))]
    return out[:limit]


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
