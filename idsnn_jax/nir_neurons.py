"""The exported neurons, in the conventions that NIR's consumers read (used by `export_nir`).

The model's neuron is `u[t] = decay u[t-1] (1 - s[t-1]) + x[t]`, `s[t] = u[t] > v_th` (hard
reset to 0). NIR defines continuous-time nodes; a consumer steps them at its own dt, and the
two tested consumers fix what they read:

  - snnTorch 1.0.0 `import_nir.import_from_nir` reads every LIF at dt = 1e-4 (hard-coded):
    `snn.Leaky(beta = 1 - dt/tau, threshold = v_threshold / (r dt/tau))` with
    `mem <- beta mem + x`, spike if mem > threshold, reset to 0; v_leak must be 0.
  - Norse 1.1.0 (`LIFBoxCell` at the dt it is given) integrates `v <- v + dt/tau (v_leak - v
    + x)`, spikes if v > v_threshold, resets to v_reset, and ignores r (with a warning).
    Its IF (`IAFCell`) is `v <- v + x`: it ignores r and dt.

So a LIF node is exported with tau = dt / (1 - decay) at dt = 1e-4 (`LIF_DT`), r = 1,
v_leak = v_reset = 0 and v_threshold = (1 - decay) v_th. NIR's forward-Euler step at that dt,
`v <- v + (dt/tau) (v_leak - v + r x)`, is then `v <- decay v + (1 - decay) x`: the model's
potential times (1 - decay), against the threshold times (1 - decay), so every spike is the
model's. snnTorch reads it as beta = decay, threshold = v_th on the unscaled potential; Norse
reads exactly the scaled one. decay = 1 (no leak) exports `nir.IF` with r = 1 and
v_threshold = v_th at dt = 1 (`IF_DT`): NIR's `v <- v + dt r x` is `v <- v + x`, which is
also how Norse reads it (snnTorch 1.0.0 cannot: see the README).
"""

from __future__ import annotations

from typing import Any

import nir
import numpy as np

LIF_DT = 1e-4  # the exported step of a leaky graph: what snnTorch's import assumes (seconds)
IF_DT = 1.0  # the exported step of a leak-free graph: IF nodes add r x per step in consumers


def time_step(decay: float) -> float:
    """The dt at which the exported graph's nodes, stepped by forward Euler, are the model."""
    return IF_DT if decay == 1.0 else LIF_DT


def potential_scale(decay: float) -> float:
    """The exported node's potential divided by the model's u (1 - decay, or 1 for IF)."""
    return 1.0 if decay == 1.0 else 1.0 - decay


def neuron_node(decay: float, v_th: float, shape: tuple[int, ...], dtype: Any) -> nir.NIRNode:
    """A `nir.LIF` (decay < 1) or `nir.IF` (decay = 1) layer of `shape` (see the docstring)."""
    full = lambda value: np.full(shape, value, dtype)
    if decay == 1.0:
        return nir.IF(r=full(1.0), v_threshold=full(v_th), v_reset=full(0.0))
    return nir.LIF(
        tau=full(LIF_DT / (1.0 - decay)),
        r=full(1.0),
        v_leak=full(0.0),
        v_threshold=full(v_th * (1.0 - decay)),
        v_reset=full(0.0),
    )


def neuron_metadata(decay: float, v_th: float) -> dict[str, Any]:
    """What the graph's metadata says about its neurons and time step."""
    return {
        "dt": time_step(decay),
        "decay": decay,
        "v_th": v_th,
        "potential_scale": potential_scale(decay),
        "neuron_convention": (
            "step each node by forward Euler at dt: a LIF is v <- decay v + (1 - decay) x "
            "(tau = dt / (1 - decay), r = 1, v_leak = v_reset = 0, v_threshold = (1 - decay) "
            "v_th), spike if v > v_threshold, reset v to 0; an IF is v <- v + x (r = 1, dt = 1). "
            "snnTorch's import_from_nir (dt = 1e-4) and Norse at this dt read it exactly"
        ),
    }
