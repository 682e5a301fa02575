"""Operation counts and an energy estimate of one forward pass, per layer and per image.

For every layer with a `kernel` (conv or dense), counted exactly from the data:
- SOPs (synaptic operations, accumulates) of a layer whose input is spikes (or spike counts,
  as a SEW block's sum): every input spike times the number of output units it reaches.
- MACs (multiply-accumulates) of a layer whose input is analog: every connection. In a
  spiking network that is the stem conv on the direct-encoded image (computed at each of
  the T steps, so counted T times) and the head on the time-averaged features; in an ANN
  it is every layer.
Both come from the layer itself, through its fan-out: with an all-ones kernel (bias 0) the
layer is linear in its input, and its transpose applied to all-ones outputs gives, per input
element of one example, how many output units that element reaches (padding and strides
accounted for exactly). SOPs of an example are its spikes weighted by that fan-out; MACs are
the fan-out summed (every input counted as present). One example's transpose per layer, then
a dot product per example: cheaper than running the network a second time.
Energy `E = MACs * E_MAC + SOPs * E_AC`, with 45 nm constants
(Horowitz, ISSCC 2014) by default. The counts leave out memory traffic: with it, an SNN beats
a quantized ANN only at low average spike rates (arXiv 2409.08290: near 6% at T = 5-10).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class EnergyCosts:
    """Energy of one operation in picojoules."""

    e_mac_pj: float = 4.6  # 32-bit float multiply (3.7) + add (0.9), 45 nm
    e_ac_pj: float = 0.9  # 32-bit float add, 45 nm


PRESETS = {
    "45nm_fp32": EnergyCosts(4.6, 0.9),
    "45nm_fp16": EnergyCosts(1.5, 0.4),  # fp16 multiply 1.1 + add 0.4
    "45nm_int8": EnergyCosts(0.23, 0.03),  # int8 multiply 0.2 + add 0.03
}


def energy_uj(macs: float, sops: float, costs: EnergyCosts) -> float:
    """Energy in microjoules of `macs` multiply-accumulates and `sops` accumulates."""
    return (macs * costs.e_mac_pj + sops * costs.e_ac_pj) * 1e-6


def _is_weighted_layer(module: nn.Module) -> bool:
    """A leaf layer that owns a `kernel` array (conv or dense), not a block around one."""
    return isinstance(module.variables.get("params", {}).get("kernel"), jax.Array)


def _ones(x: jax.Array) -> jax.Array:
    """Ones shaped like `x`, computed from it (`x * 0 + 1`, which XLA does not fold for
    floats): XLA:CPU (jaxlib 0.10.2) miscomputes some convs whose operands are constant
    broadcasts (a 3x3 conv of all-ones arrays summed over 1 of its 32 input channels)."""
    return x * 0 + 1


def _with_ones(module: nn.Module, x: jax.Array) -> jax.Array:
    """`module` (unbound copy) applied to `x` with every kernel entry 1 and biases 0."""
    params = module.variables["params"]
    ones = {k: _ones(v) if k == "kernel" else v * 0 for k, v in params.items()}
    return module.clone(parent=None).apply({"params": ones}, x)


def _fanout(module: nn.Module, x: jax.Array) -> jax.Array:
    """Per input element of one example (`x.shape[1:]`): the output units it reaches, float32."""
    probe = _ones(x[:1].astype(jnp.float32))
    out, transpose = jax.vjp(lambda z: _with_ones(module, z), probe)
    return transpose(_ones(out))[0][0]


def _per_image(rows: jax.Array, fanout: jax.Array, batch: int) -> jax.Array:
    """`rows` (N, ...) weighted by `fanout` and summed per row, then over time when
    N = T * batch: (batch,)."""
    flat = rows.reshape(rows.shape[0], -1).astype(jnp.float32)
    sums = flat @ fanout.reshape(-1)
    return sums.reshape(-1, batch).sum(axis=0)


def counted_apply(
    model: nn.Module, variables: Any, images: jax.Array, **apply_kwargs: Any
) -> tuple[Any, dict[str, jax.Array]]:
    """`model.apply(variables, images, **apply_kwargs)` and, per weighted layer `path`,
    `{'sops/<path>': (B,), 'macs/<path>': (B,)}` per image (one of the two is zeros).

    A spiking model (`model.spiking`: its activation emits spikes, at any `time_steps`)
    counts SOPs for every layer but the stem and the head, whose inputs are analog; an ANN
    counts MACs everywhere.
    """
    seen: list[tuple[nn.Module, jax.Array]] = []

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and _is_weighted_layer(context.module):
            seen.append((context.module, args[0]))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        out = model.apply(variables, images, **apply_kwargs)
    spiking = model.spiking
    batch = images.shape[0]
    counts: dict[str, jax.Array] = {}
    for module, x in seen:
        path = "/".join(module.path)
        analog = not spiking or module.path[0] in ("stem", "head")
        ops = _per_image(_ones(x) if analog else x, _fanout(module, x), batch)
        zeros = jnp.zeros_like(ops)
        counts[f"sops/{path}"] = zeros if analog else ops
        counts[f"macs/{path}"] = ops if analog else zeros
    return out, counts


def totals(counts: dict[str, Any]) -> dict[str, Any]:
    """`{'sops': ..., 'macs': ...}`: the per-layer counts of `counted_apply` summed."""
    return {
        kind: sum(v for k, v in counts.items() if k.startswith(f"{kind}/"))
        for kind in ("sops", "macs")
    }
