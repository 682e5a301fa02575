"""The step layer: train state (with an optional EMA of the weights) and data-parallel steps.

Per-device steps with explicit collectives over the mesh axis `batch`, run by `jax.shard_map`
over a 1-D mesh of all devices of all processes. Gradients, metrics and BatchNorm statistics
are averaged over devices, so N devices match one device with the same global batch.

`shard_map` runs with `check_vma=False`: with it on, the gradient of a per-device loss
with respect to replicated parameters comes back already summed over devices, and the
explicit `pmean` would then scale it by N.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import energy, input_pipeline, sltt
from idsnn_jax.augment import AugmentOptions, preprocess
from idsnn_jax.datasets import DatasetInfo
from idsnn_jax.losses import LossOptions, cross_entropy, objective, teacher_logits
from idsnn_jax.models import AXIS, firing_rates

_SLTT_STREAM = 2**31 - 3  # of the step key; not an example index nor an `augment._STREAMS`
Batch = dict[str, jax.Array]
TrainStep = Callable[[Any, Batch, Any], tuple[Any, Batch]]
TrainLoop = Callable[[Any, Batch, jax.Array, jax.Array, Any], tuple[Any, Batch]]


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; the optimizer itself is static."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    rng: jax.Array  # raw uint32 key, folded with the step inside the train step
    # {'params', 'batch_stats'} averaged over the steps (`ema_update`), or None: no EMA. Last,
    # so a state without EMA has the structure of the checkpoints made before EMA existed.
    ema: Any = None


def create_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """1-D mesh over `devices` (default: all, of every process), axis `batch`, Auto axis type.

    ValueError unless the devices come process by process, the same number from each: each
    process's slice of a global batch is then one contiguous block (its data shards).
    """
    devices = jax.devices() if devices is None else devices
    owners = [d.process_index for d in devices]
    if owners != sorted(owners) or len(set(collections.Counter(owners).values())) > 1:
        raise ValueError(f"every process must bring as many devices, in order; got {owners}")
    return Mesh(np.asarray(devices), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def create_train_state(
    variables: Any, tx: optax.GradientTransformation, seed: int, *, ema: bool = False
) -> TrainState:
    """Fresh state from model `variables` ({'params', 'batch_stats'}); with `ema`, the
    averaged copy starts as the variables themselves.

    The state gets its own copies: it is donated to the train step, so it must not share
    buffers with the caller's trees (leaves that `init_snn_from_ann` copied unchanged from
    the teacher would otherwise be donated and read in the same call).
    """
    params = jax.tree.map(jnp.array, variables["params"])
    batch_stats = jax.tree.map(jnp.array, variables.get("batch_stats", {}))
    average = {"params": params, "batch_stats": batch_stats}
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=tx.init(params),
        rng=jax.random.PRNGKey(seed),
        ema=jax.tree.map(jnp.array, average) if ema else None,
    )


def ema_update(ema: Any, variables: Any, step: jax.Array, decay: float) -> Any:
    """`d * ema + (1 - d) * variables` per leaf, d = min(decay, (1 + step) / (10 + step)) with
    `step` the updates made before this one (TensorFlow's `num_updates` rule: early on, when
    the average would still be mostly the initial weights, it follows the weights closely)."""
    d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
    return jax.tree.map(lambda e, x: d * e + (1 - d) * x, ema, variables)


def _loss(
    model: nn.Module,
    teacher: nn.Module | None,
    options: LossOptions,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    labels: jax.Array,
    teacher_variables: Any,
    key: jax.Array | None = None,  # unused: the signature of `sltt.loss_value_and_grad`
) -> tuple[jax.Array, tuple[jax.Array, Any]]:
    """(loss, (student time-mean logits, new batch_stats)): `losses.objective` of the student,
    against the teacher run in eval mode (running BN statistics, no gradient) on the same
    images when there is one; per-step logits only when the options need them."""
    variables = {"params": params, "batch_stats": batch_stats}
    kwargs = {"per_step": True} if options.per_step else {}
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"], **kwargs)
    loss = objective(logits, labels, options, teacher_logits(teacher, teacher_variables, images))
    if options.per_step:
        logits = jnp.mean(logits, axis=0)
    return loss, (logits, updates["batch_stats"])


def _apply_grads(
    state: TrainState,
    grads: Any,
    batch_stats: Any,
    tx: optax.GradientTransformation,
    ema_decay: float,
) -> TrainState:
    """The state after one optimizer step: parameters, BN statistics, the step count and,
    with `ema_decay` > 0, the moving average."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_state = state.replace(
        step=state.step + 1,
        params=optax.apply_updates(state.params, updates),
        batch_stats=batch_stats,
        opt_state=opt_state,
    )
    if not ema_decay:
        return new_state
    now = {"params": new_state.params, "batch_stats": batch_stats}
    return new_state.replace(ema=ema_update(state.ema, now, state.step, ema_decay))


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    info: DatasetInfo,
    *,
    teacher: nn.Module | None = None,
    loss: LossOptions = LossOptions(),
    augment: AugmentOptions = AugmentOptions(),
    ema_decay: float = 0.0,
    gradient: str = "bptt",
    sltt_k: int | None = None,
) -> TrainStep:
    """Per-device train step `(state, batch, teacher_variables) -> (state, metrics)`, inside a
    mapped axis named `batch`; `batch`: this device's uint8 images (b, H, W, C), labels (b,).

    Augmentation draws per example from (state.rng, step, its index in the global batch), so
    a resumed run, or one on other devices, draws the same. The loss is `losses.objective`
    (KD from `teacher`'s frozen `teacher_variables` when given); `ema_decay` > 0 updates
    `state.ema`. `gradient="sltt"`: SLTT's online gradient (`sltt`; same forward, loss and
    BN statistics) through `sltt_k` time steps drawn from the step's key (None: all)."""
    sltt.check_gradient_args(gradient=gradient, sltt_k=sltt_k)
    grad_fn = jax.value_and_grad(functools.partial(_loss, model, teacher, loss), has_aux=True)
    if gradient == "sltt":
        grad_fn = functools.partial(sltt.loss_value_and_grad, model, teacher, loss, sltt_k)

    def train_step(state: TrainState, batch: Batch, teacher_variables: Any):
        images = preprocess(
            jax.random.fold_in(state.rng, state.step),
            batch["image"],
            info,
            train=True,
            options=augment,
            example_offset=jax.lax.axis_index(AXIS) * batch["label"].shape[0],
        )
        (value, (logits, batch_stats)), grads = grad_fn(
            state.params,
            state.batch_stats,
            images,
            batch["label"],
            teacher_variables,
            # One draw of SLTT's time steps on every device: N devices equal one.
            key=jax.random.fold_in(jax.random.fold_in(state.rng, state.step), _SLTT_STREAM),
        )
        new_state = _apply_grads(state, jax.lax.pmean(grads, AXIS), batch_stats, tx, ema_decay)
        correct = jnp.argmax(logits, -1) == batch["label"]
        metrics = {"loss": value, "accuracy": jnp.mean(correct.astype(jnp.float32))}
        return new_state, jax.lax.pmean(metrics, AXIS)

    return train_step


def make_eval_step(
    model: nn.Module, info: DatasetInfo, *, count_ops: bool = False
) -> Callable[[TrainState, Batch], Batch]:
    """Per-device eval step -> sums over the global batch of loss, correct, count, and
    (for spiking models) firing rate per layer; padded examples (`mask == 0`) count 0.

    With `count_ops`, also each layer's SOPs and MACs and their totals (`energy.py`); the
    model runs without rematerialization there (the forward is the same).
    """
    counted = model.clone(remat=False) if count_ops else model

    def apply(variables: Any, images: jax.Array) -> tuple[jax.Array, Any, Batch]:
        kwargs = dict(train=False, mutable=["intermediates"])
        if not count_ops:
            return (*model.apply(variables, images, **kwargs), {})
        (logits, inter), counts = energy.counted_apply(counted, variables, images, **kwargs)
        return logits, inter, {**counts, **energy.totals(counts)}

    def eval_step(state: TrainState, batch: Batch) -> Batch:
        images = input_pipeline.normalize(batch["image"], info)
        variables = {"params": state.params, "batch_stats": state.batch_stats}
        logits, inter, counts = apply(variables, images)
        mask = batch["mask"]
        sums = {
            "loss": cross_entropy(logits, batch["label"], weights=mask) * jnp.sum(mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
        }
        rates = firing_rates(inter.get("intermediates", {}))
        sums.update({f"firing_rate/{k}": jnp.sum(v * mask) for k, v in rates.items()})
        sums.update({k: jnp.sum(v * mask) for k, v in counts.items()})
        return jax.lax.psum(sums, AXIS)

    return eval_step


def shard(fn: Callable, mesh: Mesh, in_specs: tuple, donate: tuple[int, ...] = ()) -> Callable:
    """jit(shard_map(fn)) with replicated outputs; `in_specs` per argument."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=P(), check_vma=False)
    return jax.jit(mapped, donate_argnums=donate)


def make_train_loop(train_step: TrainStep) -> TrainLoop:
    """Per-device loop of up to k train steps `(state, data, indices, valid, teacher_variables)
    -> (state, metrics)`, one host dispatch for k steps.

    `data` holds this process's training shards on this device ('image' uint8 (L, H, W, C),
    'label' int (L,), `device_data`); `indices` int32 (k, b) are the rows there of this
    device's slice of each of the k global batches, gathered here; `valid` bool (k,) skips
    the padding steps of an epoch's last call (their metrics are zeros). Metrics come back per
    step, each (k,). With k = 1 the step runs without a loop around it: XLA:CPU runs a train
    step inside a while loop far slower (README, "Design notes").
    """

    def gather(data: Batch, idx: jax.Array) -> Batch:
        return {"image": data["image"][idx], "label": data["label"][idx]}

    def body(state: TrainState, xs: tuple[jax.Array, jax.Array], data: Batch, teacher: Any):
        idx, ok = xs
        step = lambda s: train_step(s, gather(data, idx), teacher)
        zeros = jax.tree.map(lambda m: jnp.zeros(m.shape, m.dtype), jax.eval_shape(step, state)[1])
        return jax.lax.cond(ok, step, lambda s: (s, zeros), state)

    def loop(state, data, indices, valid, teacher_variables):
        if indices.shape[0] == 1:  # k = 1 is never padding: one plain step
            state, metrics = train_step(state, gather(data, indices[0]), teacher_variables)
            return state, jax.tree.map(lambda m: m[None], metrics)
        step = functools.partial(body, data=data, teacher=teacher_variables)
        return jax.lax.scan(step, state, (indices, valid))

    return loop


def compile_train_loop(mesh: Mesh, train_loop: TrainLoop) -> TrainLoop:
    """The train loop over `mesh`: indices split on `batch` (axis 1), data one block per
    device (`device_data`), state and teacher replicated; the state is donated."""
    return shard(train_loop, mesh, (P(), P(AXIS), P(None, AXIS), P(), P()), donate=(0,))


def compile_eval_step(mesh: Mesh, eval_step: Callable) -> Callable:
    """The eval step over `mesh`: batch split on `batch`, state replicated."""
    return shard(eval_step, mesh, (P(), P(AXIS)))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree of host arrays, or of arrays on this process's devices, fully replicated
    on `mesh`, which may span processes (each process passes the same values)."""
    sharding = NamedSharding(mesh, P())
    place = lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x))
    return jax.tree.map(place, tree)


def device_data(images: np.ndarray, labels: np.ndarray, mesh: Mesh) -> Batch:
    """This process's training rows on each of its devices: 'image' (L, H, W, C) as stored
    (uint8), 'label' int32 (L,), as global arrays of mesh.size * L rows split over `batch`, so
    device d's block is the data of d's process (what `compile_train_loop` expects)."""
    sharding = NamedSharding(mesh, P(AXIS))
    place = lambda x: jax.make_array_from_callback(
        (mesh.size * len(x), *x.shape[1:]), sharding, lambda _: x
    )
    return {"image": place(images), "label": place(labels.astype(np.int32))}


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> Batch:
    """Global array from this process's slice of the batch, split over `batch`."""
    sharding = NamedSharding(mesh, P(AXIS))
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
