"""Spiking ResNets: the CIFAR ResNet of `resnet.py` with LIF neurons over T time steps.

Activations arrive time-folded, `(T * B, H, W, C)`; the `LIF` module unfolds them to
`(T, B, H, W, C)`, runs `lif_scan` over time and folds the spikes back. Neuron state is
only in the scan carry, so nothing needs resetting between batches. tdBN is the folded
BatchNorm of `resnet.py` with its scale initialized to `v_th`.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from idsnn_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from idsnn_jax.neuron import check_neuron_args, lif_scan


class LIF(nn.Module):
    """LIF activation on time-folded input `(T * B, ...)` -> spikes of the same shape.

    Sows the layer's firing rate per example, `(B,)` (spikes per neuron per time step),
    into the `intermediates` collection when that collection is mutable; per example so
    that evaluation can mask padded examples exactly.
    """

    time_steps: int
    decay: float = 0.25
    v_th: float = 0.5
    surrogate: str = "rect"
    surrogate_width: float = 0.5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        currents = x.reshape((self.time_steps, -1, *x.shape[1:]))
        spikes = lif_scan(
            currents,
            decay=self.decay,
            v_th=self.v_th,
            surrogate=self.surrogate,
            width=self.surrogate_width,
        )
        per_example = spikes.reshape((self.time_steps, currents.shape[1], -1)).astype(jnp.float32)
        self.sow("intermediates", "firing_rate", jnp.mean(per_example, axis=(0, 2)))
        return spikes.reshape(x.shape)


def spiking_resnet(
    stage_sizes: tuple[int, ...],
    block_cls: type[BasicBlock] | type[Bottleneck] = BasicBlock,
    *,
    num_classes: int,
    width: float = 1.0,
    time_steps: int = 4,
    decay: float = 0.25,
    v_th: float = 0.5,
    surrogate: str = "rect",
    surrogate_width: float = 0.5,
    sew: bool = False,
    stem_padding: int = 1,
    bn_axis_name: str | None = None,
    dtype: Any = jnp.float32,
) -> ResNet:
    """Builds a Spiking ResNet (reference defaults: T=4, decay 0.25, v_th 0.5, rect a=0.5).

    `stem_padding=3` reproduces the reference SNN stem exactly (36x36 maps for 32x32 input).
    """
    if not (isinstance(time_steps, int) and time_steps >= 1):
        raise ValueError(f"time_steps={time_steps!r} must be an integer >= 1")
    check_neuron_args(surrogate=surrogate, surrogate_width=surrogate_width, v_th=v_th, decay=decay)
    act = functools.partial(
        LIF,
        time_steps=time_steps,
        decay=decay,
        v_th=v_th,
        surrogate=surrogate,
        surrogate_width=surrogate_width,
    )
    return ResNet(
        stage_sizes=stage_sizes,
        block_cls=block_cls,
        num_classes=num_classes,
        width=width,
        time_steps=time_steps,
        act=act,
        bn_scale_init=v_th,
        stem_padding=stem_padding,
        sew=sew,
        bn_axis_name=bn_axis_name,
        dtype=dtype,
    )


def firing_rates(intermediates: Any) -> dict[str, jax.Array]:
    """`{'stage1/block0/act1': rates (B,), ...}` from the `intermediates` of a forward pass."""
    flat = traverse_util.flatten_dict(intermediates, sep="/")
    suffix = "/firing_rate"
    return {k[: -len(suffix)]: v[0] for k, v in flat.items() if k.endswith(suffix)}
