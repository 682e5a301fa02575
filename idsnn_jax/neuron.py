"""Leaky integrate-and-fire neurons with surrogate gradients.

The spike is a Heaviside step, whose true derivative is zero almost everywhere; training
replaces it in the backward pass by a surrogate (a `jax.custom_vjp`). `lif_scan` runs the
multi-step LIF of the IDSNN reference over a leading time axis with `lax.scan` (unrolled by
default), so the membrane potential lives in the scan carry and never in module state.

`lif_scan(..., packed=True)` is the same neuron (same forward, same gradients) for
memory-saving training: a `jax.custom_vjp` whose backward pass keeps bits (spikes and
surrogate window) instead of float32 potentials and spikes.

All surrogate derivatives are normalized to integrate to 1 over the potential and take one
`width` parameter that sets how far from the threshold gradients still flow.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from idsnn_jax.precision import wide


def _rect(x: jax.Array, width: float) -> jax.Array:
    """STBP rectangle: 1/(2a) inside |x| < a, else 0 (the reference's choice)."""
    return (jnp.abs(x) < width).astype(x.dtype) / (2.0 * width)


def _triangle(x: jax.Array, width: float) -> jax.Array:
    """Triangle of half-width a and height 1/a."""
    return jnp.maximum(0.0, 1.0 - jnp.abs(x) / width) / width


def _sigmoid(x: jax.Array, width: float) -> jax.Array:
    """Derivative of sigmoid(x / a): sigma(x/a) (1 - sigma(x/a)) / a."""
    s = jax.nn.sigmoid(x / width)
    return s * (1.0 - s) / width


def _atan(x: jax.Array, width: float) -> jax.Array:
    """Derivative of 1/2 + arctan(pi x / (2a)) / pi: (1/(2a)) / (1 + (pi x / (2a))^2)."""
    return (1.0 / (2.0 * width)) / (1.0 + (jnp.pi * x / (2.0 * width)) ** 2)


SURROGATES: dict[str, Callable[[jax.Array, float], jax.Array]] = {
    "rect": _rect,
    "triangle": _triangle,
    "sigmoid": _sigmoid,
    "atan": _atan,
}


def check_neuron_args(
    *, surrogate: str, surrogate_width: float, v_th: float = 0.5, decay: float = 0.25
) -> None:
    """Raises ValueError, naming the argument, for an unknown surrogate, a non-positive
    surrogate width or threshold, or a decay outside [0, 1]."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate={surrogate!r} is unknown; choose one of {sorted(SURROGATES)}")
    if not surrogate_width > 0:
        raise ValueError(
            f"surrogate_width={surrogate_width!r} must be > 0 (half-width of the surrogate window)"
        )
    if not v_th > 0:
        raise ValueError(f"v_th={v_th!r} must be > 0 (the firing threshold)")
    if not 0 <= decay <= 1:
        raise ValueError(f"decay={decay!r} must be in [0, 1] (membrane leak per time step)")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def spike(x: jax.Array, surrogate: str = "rect", width: float = 0.5) -> jax.Array:
    """Heaviside step `x > 0` (x = u - v_th) with a surrogate derivative in the backward pass.

    Returns 0/1 in the dtype of `x`.
    """
    return (x > 0).astype(x.dtype)


def _spike_fwd(x: jax.Array, surrogate: str, width: float) -> tuple[jax.Array, jax.Array]:
    return spike(x, surrogate, width), x


def _spike_bwd(surrogate: str, width: float, x: jax.Array, g: jax.Array) -> tuple[jax.Array]:
    return (g * SURROGATES[surrogate](x, width).astype(g.dtype),)


spike.defvjp(_spike_fwd, _spike_bwd)


def lif_step(
    carry: tuple[jax.Array, jax.Array],
    x: jax.Array,
    *,
    decay: float,
    v_th: float,
    surrogate: str,
    width: float,
) -> tuple[tuple[jax.Array, jax.Array], jax.Array]:
    """One LIF update: `u = decay * u_prev * (1 - sg(s_prev)) + x`, `s = u > v_th`.

    The hard reset gate is detached (stop_gradient), but gradients flow through `u_prev`
    (BPTT). `carry = (u_prev, s_prev)`; returns `((u, s), s)`.
    """
    u_prev, s_prev = carry
    u = decay * u_prev * (1.0 - jax.lax.stop_gradient(s_prev)) + x
    s = spike(u - v_th, surrogate, width)
    return (u, s), s


def lif_scan(
    currents: jax.Array,
    *,
    decay: float = 0.25,
    v_th: float = 0.5,
    surrogate: str = "rect",
    width: float = 0.5,
    packed: bool = False,
    unroll: bool | int = True,
) -> jax.Array:
    """Multi-step LIF over the leading time axis.

    Args:
      currents: input currents `(T, ...)`, any trailing shape, float32 or bfloat16.
      decay: membrane leak factor per step (reference 0.25).
      v_th: firing threshold (reference 0.5); a spike needs `u > v_th` strictly.
      surrogate: name in `SURROGATES` used for the backward pass.
      width: surrogate half-width `a` (reference 0.5).
      packed: memory-saving BPTT, same forward and gradient (`_lif_packed`): the backward
        keeps, per neuron and step, 2 bits (spike and rect window) instead of float32
        potentials and spikes; smooth surrogates also keep u in float32.
      unroll: `lax.scan`'s `unroll`. True (default) unrolls the time loop: straight-line
        code that XLA fuses across steps, and no while-loop buffers that XLA:CPU holds for
        the whole program: less CPU time and temp memory, longer compiles (figures in
        `experiments/results/cpu_conv.json`). An int k runs k steps
        per loop iteration (less code for long T). Same spikes and gradients either way;
        `packed` ignores it (its loop is always unrolled).

    Returns:
      spikes of the same shape and dtype as `currents`, exactly 0 or 1. The membrane
      potential is kept in float32 whatever the input dtype, so bfloat16 compute does not
      accumulate rounding error over time.
    """
    check_neuron_args(surrogate=surrogate, surrogate_width=width, v_th=v_th, decay=decay)
    if currents.ndim < 1:
        raise ValueError(f"currents must have a leading time axis, got shape {currents.shape}")
    x = wide(currents)
    if packed:
        return _lif_packed(x, float(decay), float(v_th), surrogate, float(width)).astype(
            currents.dtype
        )
    zeros = jnp.zeros(x.shape[1:], x.dtype)
    step = functools.partial(lif_step, decay=decay, v_th=v_th, surrogate=surrogate, width=width)
    _, spikes = jax.lax.scan(step, (zeros, zeros), x, unroll=unroll)
    return spikes.astype(currents.dtype)


# --------------------------------------------------------------------------------------
# Memory-saving BPTT: what the backward keeps is stored as bits.


def pack_bits(mask: jax.Array) -> jax.Array:
    """Boolean/0-1 array `(T, ...)` -> uint8 `(T, ceil(N / 8))`, 8 neurons per byte."""
    return jnp.packbits(mask.reshape((mask.shape[0], -1)).astype(jnp.bool_), axis=-1)


def unpack_bits(bits: jax.Array, shape: tuple[int, ...], dtype: Any) -> jax.Array:
    """Inverse of `pack_bits`: uint8 `(T, ceil(N / 8))` -> 0/1 array of `shape` in `dtype`."""
    n = math.prod(shape[1:])
    return jnp.unpackbits(bits, axis=-1, count=n).reshape(shape).astype(dtype)


def _lif_steps(x: jax.Array, decay: float, v_th: float, surrogate: str, width: float):
    """The `lif_scan` recursion on float32 currents as a Python loop over the (static, small)
    time axis; yields (u[t], s[t]).

    A loop rather than `lax.scan`: a scan's stacked outputs are while-loop buffers, which
    XLA:CPU allocates at the start of the program and keeps to the end, whatever they hold.
    """
    u = s = jnp.zeros(x.shape[1:], x.dtype)
    for t in range(x.shape[0]):
        (u, s), _ = lif_step((u, s), x[t], decay=decay, v_th=v_th, surrogate=surrogate, width=width)
        yield u, s


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _lif_packed(x: jax.Array, decay: float, v_th: float, surrogate: str, width: float):
    """`lif_scan(packed=True)` on float32 currents `(T, ...)`: a `jax.custom_vjp` whose
    residuals per neuron and step are, for the rect surrogate, 2 bits (s[t] and the window
    |u[t] - v_th| < a, 8 neurons per byte); for triangle / sigmoid / atan, s[t] as a bit plus
    u[t] in float32 (their derivative needs u). The backward runs BPTT in reverse
    time from them: `g_u[t] = g_s[t] sg'(u[t] - v_th) + g_u[t+1] decay (1 - s[t])`.

    Run without differentiation (`sltt`'s pass 1, evaluation), it packs each step's spikes
    as they come and unpacks them all at the end, the same 0/1 values: XLA then holds the
    currents and bits, not a second float32 tensor for all T (the spikes) beside them."""
    bits = jnp.stack([_pack_step(s) for _, s in _lif_steps(x, decay, v_th, surrogate, width)])
    return unpack_bits(bits, x.shape, x.dtype)


def _pack_step(a: jax.Array) -> jax.Array:
    return jnp.packbits(a.reshape(-1).astype(jnp.bool_))


def _lif_packed_fwd(x, decay, v_th, surrogate, width):
    s_bits, aux = [], []
    for u, s in _lif_steps(x, decay, v_th, surrogate, width):
        s_bits.append(_pack_step(s))
        # The rectangle's derivative needs one bit per neuron and step (the window mask);
        # the smooth surrogates need the potential itself (kept in float32: exact gradients).
        aux.append(_pack_step(jnp.abs(u - v_th) < width) if surrogate == "rect" else u)
    s_bits = jnp.stack(s_bits)
    return unpack_bits(s_bits, x.shape, x.dtype), (s_bits, jnp.stack(aux))


def _lif_packed_bwd(decay, v_th, surrogate, width, res, g):
    """Reverse-time BPTT: g_u[t] = g_s[t] sg'(u[t] - v_th) + g_u[t+1] decay (1 - s[t])."""
    s_bits, aux = res
    n = math.prod(g.shape[1:])

    def unpack(bits):
        return jnp.unpackbits(bits, count=n).reshape(g.shape[1:]).astype(g.dtype)

    g_x = [None] * g.shape[0]
    g_next = None  # nothing after T-1 depends on u[T-1]
    for t in reversed(range(g.shape[0])):
        if surrogate == "rect":
            dsdu = unpack(aux[t]) / (2.0 * width)
        else:
            dsdu = SURROGATES[surrogate](aux[t] - v_th, width).astype(g.dtype)
        g_u = g[t] * dsdu
        if g_next is not None:
            g_u = g_u + g_next * decay * (1.0 - unpack(s_bits[t]))
        g_x[t] = g_next = g_u
    return (jnp.stack(g_x),)


_lif_packed.defvjp(_lif_packed_fwd, _lif_packed_bwd)
