"""One stage's epochs: the passes over the training split and the evaluation after each.

`EpochLoop.run` dispatches an epoch's jitted steps (`steps_per_call` per host call), fetches
their metrics every `log_every_steps`, stops on a NaN loss naming the step, and at a stop
signal (`faults.point`) saves the state after the last dispatch and raises
`faults.Preempted`. `test_epoch` evaluates on the whole test split (energy and EMA weights
when asked). Used by `train.fit`.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import energy, faults, input_pipeline, steps
from idsnn_jax.checkpoints import StageCheckpoints
from idsnn_jax.datasets import Split
from idsnn_jax.logs import progress

if TYPE_CHECKING:
    from idsnn_jax.train import FitOptions, RunContext


@dataclasses.dataclass(frozen=True)
class Partial:
    """How far the epoch in progress got: steps done and their per-step metrics."""

    steps: int = 0
    metrics: list[dict[str, float]] = dataclasses.field(default_factory=list)


class EpochLoop:
    """One stage's passes over the training split (placed on the devices once, with the
    teacher's variables), stoppable after any dispatch: a stop signal (`faults.point`) saves
    the state there (`StageCheckpoints.save_partial`) and ends the run with
    `faults.Preempted`. `lr`: the schedule (step -> rate), recorded per epoch."""

    def __init__(
        self,
        ctx: RunContext,
        stage: str,
        options: FitOptions,
        train_fn: steps.TrainLoop,
        teacher_variables: Any,
        ckpt: StageCheckpoints,
        inputs: dict[str, Any],
        lr: Callable[[int], Any],
    ) -> None:
        self.ctx, self.stage, self.options, self.ckpt, self.lr = ctx, stage, options, ckpt, lr
        self.inputs = inputs  # what the stage trains with, saved beside a stopped epoch
        data = steps.device_data(ctx.train_split.images, ctx.train_split.labels, ctx.mesh)
        teacher = steps.replicate(teacher_variables, ctx.mesh)
        self.step = lambda state, idx, valid: train_fn(state, data, idx, valid, teacher)

    def run(
        self, epoch: int, state: steps.TrainState, history: list[dict], partial: Partial
    ) -> tuple[steps.TrainState, dict[str, float]]:
        """Epoch `epoch` (0-based) from `partial` on; returns the new state and mean
        metrics (`history`: the finished epochs, saved with a stop)."""
        options = self.options
        num_steps = input_pipeline.num_train_steps(self.ctx.train_size, options.batch_size)
        calls = epoch_calls(self.ctx, epoch, options, partial.steps)
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
                self._stop(signum, state, epoch, history, Partial(done, fetched), num_steps)
        seconds = time.perf_counter() - start
        return state, {
            "train_loss": float(np.mean([m["loss"] for m in fetched])),
            "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
            "images_per_sec": (num_steps - partial.steps) * options.batch_size / seconds,
            "epoch_seconds": seconds,
            "lr": float(self.lr(epoch * num_steps)),
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
        partial: Partial,
        num_steps: int,
    ) -> None:
        """Saves the state after `partial.steps` of epoch `epoch` and raises `Preempted`."""
        meta = {"history": history, "steps_done": partial.steps, "metrics": partial.metrics}
        meta |= self.inputs
        self.ckpt.save_partial(state, meta)
        where = f"epoch {epoch + 1}, step {partial.steps} of {num_steps} (saved there)"
        raise faults.stopped(signum, self.stage, where, "resume from that step")


def epoch_calls(
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


def test_epoch(
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
    return {f"test_{k}" if "/" not in k else k: v for k, v in test.items()}


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
