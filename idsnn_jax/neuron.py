"""Leaky integrate-and-fire neurons with surrogate gradients.

The spike is a Heaviside step, whose true derivative is zero almost everywhere; training
replaces it in the backward pass by a surrogate (a `jax.custom_vjp`). `lif_scan` runs the
multi-step LIF of the IDSNN reference over a leading time axis with `lax.scan`, so the
membrane potential lives in the scan carry and never in module state.

All surrogate derivatives are normalized to integrate to 1 over the potential and take one
`width` parameter that sets how far from the threshold gradients still flow.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


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
) -> jax.Array:
    """Multi-step LIF over the leading time axis.

    Args:
      currents: input currents `(T, ...)`, any trailing shape, float32 or bfloat16.
      decay: membrane leak factor per step (reference 0.25).
      v_th: firing threshold (reference 0.5); a spike needs `u > v_th` strictly.
      surrogate: name in `SURROGATES` used for the backward pass.
      width: surrogate half-width `a` (reference 0.5).

    Returns:
      spikes of the same shape and dtype as `currents`, exactly 0 or 1. The membrane
      potential is kept in float32 whatever the input dtype, so bfloat16 compute does not
      accumulate rounding error over time.
    """
    check_neuron_args(surrogate=surrogate, surrogate_width=width, v_th=v_th, decay=decay)
    if currents.ndim < 1:
        raise ValueError(f"currents must have a leading time axis, got shape {currents.shape}")
    x = currents.astype(jnp.promote_types(currents.dtype, jnp.float32))
    zeros = jnp.zeros(x.shape[1:], x.dtype)
    step = functools.partial(lif_step, decay=decay, v_th=v_th, surrogate=surrogate, width=width)
    _, spikes = jax.lax.scan(step, (zeros, zeros), x)
    return spikes.astype(currents.dtype)
