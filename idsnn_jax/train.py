"""The loop layer: train one model (teacher or student) for some epochs, resumably.

`fit` builds a stage's optimizer and state, resumes it from its newest checkpoint (refusing
one trained with other data, another teacher or another learning rate), runs its epochs
(`epochs.py`: the jitted steps of `steps.py`, evaluation after each) and saves the epochs
worth keeping. It reads a small frozen `FitOptions`, never the config.
"""

from __future__ import annotations

import dataclasses
import os
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import optax
from jax.sharding import Mesh

from idsnn_jax import energy, epochs, faults, input_pipeline, optim, sltt, steps
from idsnn_jax.augment import AugmentOptions
from idsnn_jax.checkpoints import StageCheckpoints, fingerprint
from idsnn_jax.checks import check_fields, is_int
from idsnn_jax.datasets import DatasetInfo, Split
from idsnn_jax.logs import MetricLogger, logger
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
    augment: AugmentOptions = AugmentOptions()
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
    # Stage role ('teacher', 'student') -> (its training split, its fingerprint), for roles
    # whose budget differs from `train_split`'s (`plan.train_examples`); see `for_role`.
    role_data: Mapping[str, tuple[Split, str]] = dataclasses.field(default_factory=dict)

    @property
    def train_size(self) -> int:
        """The examples of all training shards (every process holds as many)."""
        return len(self.train_split) * jax.process_count()

    def for_role(self, role: str) -> RunContext:
        """This context with the training split (and its fingerprint) of stage `role`."""
        if role not in self.role_data:
            return self
        split, data_fingerprint = self.role_data[role]
        return dataclasses.replace(self, train_split=split, data_fingerprint=data_fingerprint)


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
    """Trains `model` from `variables` for `options.num_epochs`, distilling from `teacher`
    (model, variables) when given, and evaluates every epoch.

    Resumes from `<workdir>/<stage>`'s newest checkpoint (an epoch's, or one a stop saved
    mid-epoch) exactly as an uninterrupted run; returns at once when the stage finished.
    Raises FloatingPointError naming the step on divergence (before that epoch is saved) and
    `faults.Preempted` after SIGTERM/SIGINT, having saved; a pending save finishes first."""
    steps_per_epoch = input_pipeline.num_train_steps(ctx.train_size, options.batch_size)
    tx, schedule = optim.create_optimizer(options.optimizer, steps_per_epoch, options.num_epochs)
    seed, ema = stage_seed(options.seed, stage), options.ema_decay > 0
    state = steps.create_train_state(variables, tx, seed, ema=ema)
    ckpt = StageCheckpoints(os.path.join(ctx.workdir, stage), keep=options.checkpoint_keep)
    teacher_model, teacher_variables = teacher or (None, {})
    inputs = {"num_epochs": options.num_epochs, "data": ctx.data_fingerprint}
    inputs["teacher"] = fingerprint(teacher_variables) if teacher else ""
    state, history, partial = _restore(
        ckpt, steps.replicate(state, ctx.mesh), stage, inputs, options, steps_per_epoch
    )
    if len(history) >= options.num_epochs:
        ckpt.close()
        return _finished(stage, history, state, options)
    train_fn, eval_fns = _compile(ctx, model, tx, options, teacher_model)
    loop = epochs.EpochLoop(
        ctx, stage, options, train_fn, teacher_variables, ckpt, inputs, schedule
    )
    try:
        for epoch in range(len(history), options.num_epochs):
            state, record = loop.run(epoch, state, history, partial)
            partial = epochs.Partial()
            record |= epochs.test_epoch(ctx, eval_fns, state, options, stage, epoch)
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


def _restore(
    ckpt: StageCheckpoints,
    state: steps.TrainState,
    stage: str,
    inputs: dict[str, Any],
    options: FitOptions,
    steps_per_epoch: int,
) -> tuple[steps.TrainState, list[dict[str, float]], epochs.Partial]:
    """The stage's newest checkpoint (state, finished epochs' records, the epoch in progress),
    checked against what the stage trains with now; `state` and nothing done when none."""
    restored = ckpt.restore_latest(state)
    if restored is None:
        return state, [], epochs.Partial()
    state, meta = restored
    history = meta["history"]
    partial = epochs.Partial(meta.get("steps_done", 0), meta.get("metrics", []))
    trained = len(history) * steps_per_epoch + partial.steps
    _check_resume(f"[{stage}] ({ckpt.directory})", meta, inputs, options, steps_per_epoch, trained)
    if len(history) < options.num_epochs:
        at_step = f", step {partial.steps + 1}" if partial.steps else ""
        epoch = f"{len(history) + 1} of {options.num_epochs}"
        logger.info("[%s] resuming at epoch %s%s", stage, epoch, at_step)
    return state, history, partial


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
    same = optim.same_rates(options.optimizer, steps_per_epoch, trained, (old, options.num_epochs))
    if old != options.num_epochs and not same:
        raise ValueError(
            f"{stage} num_epochs {old} -> {options.num_epochs} changes the learning rate of the "
            f"{trained} steps already trained (schedule={options.optimizer.schedule!r}, "
            f"warmup_epochs={options.optimizer.warmup_epochs}), so the run would not equal one "
            f"configured for {options.num_epochs} epochs from the start: keep num_epochs={old}, "
            f"{fix}"
        )


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


def _should_save(history: list[dict[str, float]], options: FitOptions) -> bool:
    """Every `checkpoint_every_epochs`, the last epoch, and a new best epoch."""
    epoch = len(history)
    *before, record = history
    is_best = all(record["test_accuracy"] > r["test_accuracy"] for r in before)
    return epoch % options.checkpoint_every_epochs == 0 or epoch == options.num_epochs or is_best
