"""SLTT: an online gradient whose training memory does not grow with the time steps T.

Spatial Learning Through Time (Meng et al., ICCV 2023) cuts the temporal path of the
membrane from the gradient: `u[t] = decay * u[t-1] * (1 - s[t-1]) + x[t]` is differentiated
as if `u[t-1]` were a constant (through the reset too), so every time step's gradient flows
only through the layers of that step (the spatial path) and the steps' gradients add up.
Then the backward never needs more than one step's activations:

1. Pass 1, without gradient: the default train-mode forward over all T (the same function
   as the BPTT step: same spikes, logits, loss and new BatchNorm running statistics), run
   with BatchNorm momentum 0 so that it also returns each layer's batch statistics (over
   T * B, and over devices). The loss's cotangent of every step's logits follows: the
   student's logits are the time-mean of its per-step logits (the head is affine), so
   step t's cotangent is `dL/dlogits / T` (or `dL/dlogits[t]` for per-step losses).
2. Pass 2: a loop over t runs the network one step at a time (`LIF.one_step`, the
   membranes of all LIF layers in the carry), BatchNorm normalizing with pass 1's
   statistics, and takes each step's VJP with respect to the parameters; the loop adds
   them up, so XLA keeps one step's activations, not T.

What grows with T is pass 1: a forward without gradient keeps nothing for a backward, but
holds the current layer's float32 currents for all T * B at once (every layer's statistics
need all T steps of its input before any step of the next layer can run). Two things keep
that below pass 2's one-step activations, so that the peak is about flat in T (README
"Training memory"): pass 2 starts only once pass 1 is over (a fence on the cotangents; else
XLA runs pass 2's first layers alongside pass 1), and pass 1 runs the packed LIFs
(`lif_scan(packed=True)`: the same spikes, built as bits step by step), so no float32 spike
tensor for all T sits beside the currents.

BatchNorm under SLTT: the batch statistics (over all T * B) are constants of the gradient
(as in SLTT implementations with BatchNorm, which normalize each step on its own); the
gradient reaches scale, bias and the input through the normalization only. BPTT
differentiates them, so with BatchNorm SLTT differs from BPTT even at T = 1.

With `k` < T only k distinct time steps, drawn uniformly from the step's key, run their
VJP (the others run forward only, to carry the membranes), and their sum is scaled by T / k
so that its expectation is the full SLTT gradient (a choice of this implementation).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idsnn_jax.checks import is_int
from idsnn_jax.losses import LossOptions, objective, teacher_logits
from idsnn_jax.models.memory import fence
from idsnn_jax.models.spiking_resnet import MEMBRANE

GRADIENTS = ("bptt", "sltt")


def check_gradient_args(*, gradient: str, sltt_k: int | None) -> None:
    """ValueError, naming the argument, for an unknown gradient or a bad `sltt_k`."""
    if gradient not in GRADIENTS:
        raise ValueError(f"gradient={gradient!r} is invalid: expected one of {list(GRADIENTS)}")
    if not (sltt_k is None or (is_int(sltt_k) and sltt_k >= 1)):
        expected = "None (all time steps) or an integer >= 1"
        raise ValueError(f"sltt_k={sltt_k!r} is invalid: expected {expected}")
    if sltt_k is not None and gradient != "sltt":
        raise ValueError(f"sltt_k={sltt_k!r} is invalid: expected None with gradient={gradient!r}")


def chosen_steps(key: jax.Array, time_steps: int, k: int | None) -> jax.Array:
    """bool (T,): the time steps whose VJP runs; all of them when k is None or >= T."""
    if k is None or k >= time_steps:
        return jnp.ones((time_steps,), jnp.bool_)
    picked = jax.random.permutation(key, time_steps)[:k]
    return jnp.zeros((time_steps,), jnp.bool_).at[picked].set(True)


def value_and_grad(
    model: nn.Module,
    objective: Callable[[jax.Array], jax.Array],
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    *,
    per_step: bool = False,
    key: jax.Array | None = None,
    k: int | None = None,
    unroll: bool = True,
) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], Any]:
    """SLTT's `((loss, (logits, new batch_stats)), grads)` of `objective(model(images))`.

    Args:
      model: a spiking network over `model.time_steps` steps with the `ResNet` interface:
        `apply(variables, images, train, per_step)`, fields `time_steps`, `bn_momentum` and
        `act` (the `LIF` module, which runs one step with `online=True`).
      objective: student logits -> scalar loss; logits (B, C), or (T, B, C) with `per_step`.
      params, batch_stats: the student's variables.
      images: the batch (B, H, W, C), repeated over T by the model (direct encoding).
      key: the draw of the k time steps (needed only when k < T).
      k: time steps whose gradient is taken (None: all T).
      unroll: pass 2 as straight-line code, one step after the other (a data dependence
        orders them), rather than a `lax.scan`. Same result; XLA:CPU runs convolutions
        inside a while loop many times slower (`experiments/memory_bptt.py`).

    Returns:
      the loss, the student's time-mean logits (B, C) and new running statistics of the
      default forward, and the gradient with respect to `params`.
    """
    if getattr(model, "remat", False):
        # A rematerialized block's backward would rerun its LIFs without their membranes.
        raise ValueError("remat=True is invalid: expected False with SLTT (it keeps one step)")
    steps = model.time_steps
    value, mean_logits, new_stats, stats, cotangents = _pass1(
        model, objective, params, batch_stats, images, per_step
    )
    chosen = chosen_steps(key if key is not None else jax.random.key(0), steps, k)
    every_step = k is None or k >= steps
    stats, images = fence((stats, images), cotangents)  # pass 2 after all of pass 1
    grads = _pass2(model, params, stats, images, cotangents, chosen, every_step, unroll)
    if not every_step:
        grads = jax.tree.map(lambda x: x * (steps / k), grads)
    return (value, (mean_logits, new_stats)), grads


def _pass1(
    model: nn.Module,
    objective: Callable[[jax.Array], jax.Array],
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    per_step: bool,
) -> tuple[jax.Array, jax.Array, Any, Any, jax.Array]:
    """The default train-mode forward, without gradient: (loss, time-mean logits (B, C), new
    running statistics, the batch statistics, each step's logits' cotangent (T, B, C))."""
    steps, momentum = model.time_steps, model.bn_momentum
    kwargs = {"per_step": True} if per_step else {}
    variables = {"params": params, "batch_stats": batch_stats}
    # Momentum 0 makes the "running" statistics the batch's.
    packed = functools.partial(model.act, pack_spikes=True)  # the same spikes, built as bits
    logits, updates = model.clone(bn_momentum=0.0, act=packed).apply(
        variables, images, train=True, mutable=["batch_stats"], **kwargs
    )
    stats = jax.lax.stop_gradient(updates["batch_stats"])
    new_stats = jax.tree.map(lambda r, b: momentum * r + (1 - momentum) * b, batch_stats, stats)
    value, g = jax.value_and_grad(objective)(jax.lax.stop_gradient(logits))
    # Each step's logits are head(pooled[t]); the default's are their time-mean.
    cotangents = g if per_step else jnp.broadcast_to(g / steps, (steps, *g.shape))
    mean_logits = jnp.mean(logits, axis=0) if per_step else logits
    return value, mean_logits, new_stats, stats, cotangents


def _pass2(
    model: nn.Module,
    params: Any,
    stats: Any,
    images: jax.Array,
    cotangents: jax.Array,
    chosen: jax.Array,
    every_step: bool,
    unroll: bool,
) -> Any:
    """The sum over the `chosen` steps of each step's parameter gradient: one step at a time,
    membranes carried without gradient, BN with pass 1's statistics as constants."""
    one_step = model.clone(time_steps=1, act=functools.partial(model.act, online=True))

    def forward(p: Any, membrane: Any) -> tuple[jax.Array, Any]:
        v = {"params": p, "batch_stats": stats, **({MEMBRANE: membrane} if membrane else {})}
        z, out = one_step.apply(v, images, train=False, mutable=[MEMBRANE])
        return z, out[MEMBRANE]

    shapes = jax.eval_shape(lambda: forward(params, None)[1])
    zeros = jax.tree.map(jnp.zeros_like, params)

    def with_grad(membrane: Any, cotangent: jax.Array) -> tuple[Any, Any]:
        z, vjp, membrane = jax.vjp(lambda p: forward(p, membrane), params, has_aux=True)
        return membrane, vjp(cotangent.astype(z.dtype))[0]

    def body(carry: tuple[Any, Any], xs: tuple[jax.Array, jax.Array]) -> tuple[Any, None]:
        membrane, total = carry
        cotangent, take = xs
        if every_step:
            membrane, grads = with_grad(membrane, cotangent)
        else:
            without = lambda m, _: (forward(params, m)[1], zeros)
            membrane, grads = jax.lax.cond(take, with_grad, without, membrane, cotangent)
        return (membrane, jax.tree.map(jnp.add, total, grads)), None

    carry = (jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes), zeros)
    if not unroll:
        return jax.lax.scan(body, carry, (cotangents, chosen))[0][1]
    for t in range(model.time_steps):
        carry, _ = body(carry, (cotangents[t], chosen[t]))
        # Step t+1 starts only once step t's gradient is complete, so its activations are
        # dead by then (else the scheduler may run every forward first).
        carry = (fence(carry[0], carry[1]), carry[1])
    return carry[1]


def loss_value_and_grad(
    model: nn.Module,
    teacher: nn.Module | None,
    options: LossOptions,
    k: int | None,
    params: Any,
    batch_stats: Any,
    images: jax.Array,
    labels: jax.Array,
    teacher_variables: Any,
    key: jax.Array,
) -> tuple[tuple[jax.Array, tuple[jax.Array, Any]], Any]:
    """The train step's loss (`losses.objective`, distilling from `teacher` when given), its
    aux (time-mean logits, new BN statistics) and its gradient by SLTT (`value_and_grad`)."""
    target = teacher_logits(teacher, teacher_variables, images)
    objective_fn = lambda z: objective(z, labels, options, target)
    return value_and_grad(
        model, objective_fn, params, batch_stats, images, per_step=options.per_step, key=key, k=k
    )
