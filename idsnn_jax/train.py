"""Data-parallel training and evaluation of one model (teacher or student).

The steps are written per device, pmap-style, with explicit collectives over the mesh
axis `batch`, and run with `jax.shard_map` over a 1-D mesh of all devices (what
`jax.pmap` itself is built on now). Gradients, metrics and BatchNorm statistics are
averaged over devices, so N devices match one device with the same global batch.

`shard_map` runs with `check_vma=False`: with it on, the gradient of a per-device loss
with respect to replicated parameters comes back already summed over devices, and the
explicit `pmean` would then scale it by N.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
import zlib
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import input_pipeline
from idsnn_jax.checkpoints import StageCheckpoints
from idsnn_jax.logs import MetricLogger, progress
from idsnn_jax.losses import cross_entropy, idsnn_loss
from idsnn_jax.models import firing_rates

AXIS = "batch"
MODES = ("ann", "snn", "idsnn")


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; the optimizer itself is static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, folded with the step inside the train step


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """1-D mesh over `devices` (default: all), axis `batch`, Auto axis type."""
    devices = jax.devices() if devices is None else devices
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def lr_milestones(opt: ml_collections.ConfigDict, num_epochs: int) -> list[int]:
    """Epochs at which the learning rate is multiplied by `lr_gamma`.

    `optimizer.lr_interval > 0` (every k epochs) takes precedence over the explicit
    `optimizer.lr_milestones` list.
    """
    if opt.get("lr_interval", 0):
        return list(range(opt.lr_interval, num_epochs, opt.lr_interval))
    return [int(m) for m in opt.lr_milestones if 0 < int(m) < num_epochs]


def create_optimizer(
    opt: ml_collections.ConfigDict, steps_per_epoch: int, num_epochs: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum, PyTorch semantics: weight decay added to the gradient (of every
    parameter) before momentum; learning rate stepped by `lr_gamma` at epoch milestones."""
    schedule = optax.piecewise_constant_schedule(
        opt.learning_rate,
        {m * steps_per_epoch: opt.lr_gamma for m in lr_milestones(opt, num_epochs)},
    )
    tx = optax.chain(
        optax.add_decayed_weights(opt.weight_decay),
        optax.sgd(schedule, momentum=opt.momentum),
    )
    return tx, schedule


def create_train_state(variables: Any, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """Fresh state from model `variables` ({'params', 'batch_stats'}).

    The state gets its own copies: it is donated to the train step, so it must not share
    buffers with the caller's trees (leaves that `init_snn_from_ann` copied unchanged from
    the teacher would otherwise be donated and read in the same call).
    """
    params = jax.tree.map(jnp.array, variables["params"])
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=jax.tree.map(jnp.array, variables.get("batch_stats", {})),
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
    )


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    info: input_pipeline.DatasetInfo,
    *,
    mode: str,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.3,
    kd_tau: float = 4.0,
    crop_padding: int = 4,
    flip: bool = True,
) -> Callable[[TrainState, dict[str, jax.Array], Any], tuple[TrainState, dict[str, jax.Array]]]:
    """Per-device train step `(state, batch, teacher_variables) -> (state, metrics)`.

    `batch` holds this device's uint8 images `(b, H, W, C)` and int labels `(b,)`;
    augmentation runs here, each example's draw folded from (state.rng, step, its index in
    the global batch): a resumed run, or the same run on another number of devices, draws
    the same augmentations. `mode`: 'ann' and 'snn' train on
    cross-entropy, 'idsnn' adds `kd_alpha * kd_loss` against `teacher` run in eval mode.
    Must run inside a mapped axis named `batch`.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown; choose one of {MODES}")
    if mode == "idsnn" and teacher is None:
        raise ValueError("mode='idsnn' needs a teacher model")

    def train_step(state: TrainState, batch: dict[str, jax.Array], teacher_variables: Any):
        local_batch = batch["label"].shape[0]
        images = input_pipeline.preprocess(
            jax.random.fold_in(state.rng, state.step),
            batch["image"],
            info,
            train=True,
            crop_padding=crop_padding,
            flip=flip,
            example_offset=jax.lax.axis_index(AXIS) * local_batch,
        )
        labels = batch["label"]

        def loss_fn(params):
            variables = {"params": params, "batch_stats": state.batch_stats}
            logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
            if mode == "idsnn":
                teacher_logits = teacher.apply(teacher_variables, images, train=False)
                loss = idsnn_loss(logits, teacher_logits, labels, kd_alpha, kd_tau)
            else:
                loss = cross_entropy(logits, labels)
            return loss, (logits, updates["batch_stats"])

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, (logits, batch_stats)), grads = grad_fn(state.params)
        grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            batch_stats=batch_stats,
            opt_state=opt_state,
        )
        accuracy = jnp.mean((jnp.argmax(logits, -1) == labels).astype(jnp.float32))
        metrics = jax.lax.pmean({"loss": loss, "accuracy": accuracy}, AXIS)
        return new_state, metrics

    return train_step


def make_eval_step(
    model: nn.Module, info: input_pipeline.DatasetInfo
) -> Callable[[TrainState, dict[str, jax.Array]], dict[str, jax.Array]]:
    """Per-device eval step -> sums over the global batch of loss, correct, count, and
    (for spiking models) firing rate per layer; padded examples (`mask == 0`) count 0."""

    def eval_step(state: TrainState, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        images = input_pipeline.normalize(batch["image"], info)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits, inter = model.apply(variables, images, train=False, mutable=["intermediates"])
        mask = batch["mask"]
        sums = {
            "loss": cross_entropy(logits, batch["label"], weights=mask) * jnp.sum(mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
        }
        rates = firing_rates(inter.get("intermediates", {}))
        sums.update({f"firing_rate/{k}": jnp.sum(v * mask) for k, v in rates.items()})
        return jax.lax.psum(sums, AXIS)

    return eval_step


def shard(fn: Callable, mesh: Mesh, in_specs: tuple, donate: tuple[int, ...] = ()) -> Callable:
    """jit(shard_map(fn)) with replicated outputs; `in_specs` per argument."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)


def compile_steps(
    mesh: Mesh, train_step: Callable, eval_step: Callable
) -> tuple[Callable, Callable]:
    """The per-device steps sharded over `mesh`: batch split on `batch`, rest replicated."""
    train = shard(train_step, mesh, (P(), P(AXIS), P()), donate=(0,))
    evaluate = shard(eval_step, mesh, (P(), P(AXIS)))
    return train, evaluate


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a host or device pytree fully replicated on `mesh`."""
    return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Global array from this process's slice of the batch, split over `batch`."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def evaluate(
    eval_fn: Callable, state: TrainState, split: input_pipeline.Split, batch_size: int, mesh: Mesh
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
        sums = eval_fn(state, shard_batch(batch, mesh))
        totals = sums if not totals else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    count = float(totals.pop("count"))
    out = {"accuracy": float(totals.pop("correct")) / count}
    out.update({k: float(v) / count for k, v in totals.items()})
    return out


def init_variables(model: nn.Module, info: input_pipeline.DatasetInfo, seed: int) -> dict[str, Any]:
    """Model variables {'params', 'batch_stats'} for a batch of `info`-shaped images."""
    dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.PRNGKey(seed), dummy)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


@dataclasses.dataclass(frozen=True)
class RunContext:
    """What every stage of a run shares: config, data, devices and outputs."""

    config: ml_collections.ConfigDict
    workdir: str
    train_split: input_pipeline.Split
    test_split: input_pipeline.Split
    info: input_pipeline.DatasetInfo
    mesh: Mesh
    writer: MetricLogger


@dataclasses.dataclass(frozen=True)
class FitResult:
    """Outcome of `fit`: the final state (replicated on the mesh) and per-epoch records."""

    state: TrainState
    history: list[dict[str, float]]

    @property
    def best_accuracy(self) -> float:
        return max(r["test_accuracy"] for r in self.history)

    @property
    def last_accuracy(self) -> float:
        return self.history[-1]["test_accuracy"]


def fit(
    ctx: RunContext,
    *,
    stage: str,
    model: nn.Module,
    variables: dict[str, Any],
    mode: str,
    num_epochs: int,
    teacher: tuple[nn.Module, dict[str, Any]] | None = None,
) -> FitResult:
    """Trains `model` from `variables` for `num_epochs`, evaluating after every epoch.

    Resumes from `<workdir>/<stage>/last` when it holds a checkpoint (same schedule, data
    order and RNG stream, so the result equals an uninterrupted run) and returns at once
    when the stage already finished. Uses `config.batch_size` (global), `seed`,
    `optimizer`, `augment`, `kd_alpha`, `kd_tau`, `eval_batch_size`, `checkpoint_keep`,
    `checkpoint_every_epochs`, `log_every_steps`. Raises FloatingPointError naming the step
    if the loss diverges.
    """
    config, mesh, info = ctx.config, ctx.mesh, ctx.info
    steps_per_epoch = input_pipeline.num_train_steps(len(ctx.train_split), config.batch_size)
    tx, schedule = create_optimizer(config.optimizer, steps_per_epoch, num_epochs)
    seed = _stage_seed(config.seed, stage)
    state = replicate(create_train_state(variables, tx, seed), mesh)
    ckpt = StageCheckpoints(os.path.join(ctx.workdir, stage), keep=config.checkpoint_keep)
    history: list[dict[str, float]] = []
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        history = meta["history"]
    if len(history) >= num_epochs:
        ckpt.close()
        return FitResult(state, history[:num_epochs])

    teacher_model, teacher_variables = teacher if teacher is not None else (None, {})
    train_step = make_train_step(
        model,
        tx,
        info,
        mode=mode,
        teacher=teacher_model,
        kd_alpha=config.kd_alpha,
        kd_tau=config.kd_tau,
        crop_padding=config.augment.crop_padding,
        flip=config.augment.flip,
    )
    train_fn, eval_fn = compile_steps(mesh, train_step, make_eval_step(model, info))
    teacher_variables = replicate(teacher_variables, mesh)
    try:
        for epoch in range(len(history), num_epochs):
            record = _train_epoch(
                ctx, stage, epoch, train_fn, state, teacher_variables, steps_per_epoch
            )
            state = record.pop("state")
            record["lr"] = float(schedule(epoch * steps_per_epoch))
            test = evaluate(eval_fn, state, ctx.test_split, config.eval_batch_size, mesh)
            record.update({f"test_{k}" if "/" not in k else k: v for k, v in test.items()})
            is_best = all(record["test_accuracy"] > r["test_accuracy"] for r in history)
            history.append(record)
            ctx.writer.write(stage, epoch + 1, record)
            periodic = (epoch + 1) % config.checkpoint_every_epochs == 0
            ckpt.save(
                epoch + 1,
                state,
                {"epoch": epoch + 1, "history": history},
                last=periodic or epoch + 1 == num_epochs,
                best=is_best,
            )
    finally:
        ckpt.close()
    return FitResult(state, history)


def _train_epoch(
    ctx: RunContext,
    stage: str,
    epoch: int,
    train_fn: Callable,
    state: TrainState,
    teacher_variables: Any,
    steps_per_epoch: int,
) -> dict[str, Any]:
    """One pass over the shuffled training split; returns the new state and mean metrics."""
    config = ctx.config
    batches = input_pipeline.train_batches(
        ctx.train_split,
        global_batch_size=config.batch_size,
        seed=config.seed,
        epoch=epoch,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    bar = progress(
        batches,
        total=steps_per_epoch,
        desc=f"{stage} epoch {epoch + 1}",
        images_per_item=config.batch_size,
    )
    start = time.perf_counter()
    pending: list[dict[str, jax.Array]] = []
    fetched: list[dict[str, float]] = []
    for i, batch in enumerate(bar):
        state, metrics = train_fn(state, shard_batch(batch, ctx.mesh), teacher_variables)
        pending.append(metrics)
        if (i + 1) % config.log_every_steps == 0 or i + 1 == steps_per_epoch:
            fetched.extend(_check_finite(jax.device_get(pending), stage, epoch, len(fetched)))
            pending = []
            bar.set_postfix(loss=f"{fetched[-1]['loss']:.4f}")
    seconds = time.perf_counter() - start
    return {
        "state": state,
        "train_loss": float(np.mean([m["loss"] for m in fetched])),
        "train_accuracy": float(np.mean([m["accuracy"] for m in fetched])),
        "images_per_sec": steps_per_epoch * config.batch_size / seconds,
        "epoch_seconds": seconds,
    }


def _check_finite(
    metrics: list[dict[str, Any]], stage: str, epoch: int, offset: int
) -> list[dict[str, float]]:
    out = [{k: float(v) for k, v in m.items()} for m in metrics]
    for i, m in enumerate(out):
        if not math.isfinite(m["loss"]):
            raise FloatingPointError(
                f"[{stage}] training loss is {m['loss']} at epoch {epoch + 1}, step "
                f"{offset + i + 1} of the epoch; lower optimizer.learning_rate or check the data"
            )
    return out


def _stage_seed(seed: int, stage: str) -> int:
    """`seed` offset by a stable hash of the stage name: independent RNG streams per stage."""
    return seed + zlib.crc32(stage.encode()) % 2**16
