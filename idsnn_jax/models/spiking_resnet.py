"""Spiking ResNets: the CIFAR ResNet of `resnet.py` with LIF neurons over T time steps.

Activations arrive time-folded, `(T * B, H, W, C)`; the `LIF` module unfolds them to
`(T, B, H, W, C)`, runs `lif_scan` over time and folds the spikes back. Neuron state is
only in the scan carry, so nothing needs resetting between batches. tdBN is the folded
BatchNorm of `resnet.py` with its scale initialized to `v_th`.

Memory-saving BPTT (exact gradients, off by default); each option leaves the forward, the
gradients (up to float rounding) and the parameter tree as they are:
  - `remat`: recompute each residual block and the stem in the backward pass with `nn.remat`
    (`resnet.REMAT_POLICIES[remat_policy]` decides what is kept inside a block; the convs are
    not dots, so the dot policies keep what `nothing_saveable` keeps). Each block's float32
    input is kept. XLA:CPU folds the recomputation back into the forward pass (CSE), so on
    CPU this alone saves nothing.
  - `pack_spikes`: each LIF keeps 2 bits per neuron and step for its backward (rect
    surrogate; smooth surrogates also keep u in float32: `lif_scan(packed=True)`), and each
    conv whose input is spikes keeps that input as bits and sums its kernel gradient one
    time step at a time (`memory.SpikeConv`). BatchNorm's float32 input (the conv output) is
    still kept.
  - both: each block and the stem are rematerialized from their input alone
    (`memory.rematerialize`), packed into bits where it is spikes (a standard block's input;
    a SEW block's is a sum of spikes and the stem's the image, kept as they are): between
    blocks only bits are kept, and nothing is recomputed before the backward pass needs it.
"""

from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from idsnn_jax.models.memory import SpikeConv, rematerialize
from idsnn_jax.models.resnet import BasicBlock, Bottleneck, ResNet
from idsnn_jax.neuron import check_neuron_args, lif_scan, lif_step
from idsnn_jax.precision import wide

# The collection of each LIF's membrane potential between time steps when the network runs
# one step at a time (`LIF.one_step`, used by `sltt`).
MEMBRANE = "membrane"


class LIF(nn.Module):
    """LIF activation on time-folded input `(T * B, ...)` -> spikes of the same shape.

    Sows the layer's firing rate per example, `(B,)` (spikes per neuron per time step),
    into the `intermediates` collection when that collection is mutable; per example so
    that evaluation can mask padded examples exactly. With `online=True` it runs one time
    step instead (`one_step`, input `(B, ...)`, state in the `membrane` collection).
    """

    emits_spikes: ClassVar[bool] = True  # see `ResNet.spiking`
    time_steps: int
    decay: float = 0.25
    v_th: float = 0.5
    surrogate: str = "rect"
    surrogate_width: float = 0.5
    pack_spikes: bool = False
    online: bool = False  # run one time step (`one_step`), as `sltt` does

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.online:
            return self.one_step(x)
        currents = x.reshape((self.time_steps, -1, *x.shape[1:]))
        spikes = lif_scan(
            currents,
            decay=self.decay,
            v_th=self.v_th,
            surrogate=self.surrogate,
            width=self.surrogate_width,
            packed=self.pack_spikes,
        )
        per_example = wide(spikes.reshape((self.time_steps, currents.shape[1], -1)))
        self.sow("intermediates", "firing_rate", jnp.mean(per_example, axis=(0, 2)))
        return spikes.reshape(x.shape)

    def one_step(self, x: jax.Array) -> jax.Array:
        """One time step of `lif_scan` on currents `x` (B, ...), whatever `time_steps`, from
        the membrane potential `u[t-1]` in the `membrane` collection (zeros when absent),
        which it replaces by `u[t]` (float32) when that collection is mutable. `u[t-1]`
        enters as a constant: no gradient flows along time (`sltt`). `lif_step` itself, so
        the same spikes."""
        state = self.variable(MEMBRANE, "u", lambda: jnp.zeros(x.shape, wide(x).dtype))
        u_prev = jax.lax.stop_gradient(state.value)
        s_prev = (u_prev - self.v_th > 0).astype(u_prev.dtype)  # = spike(u_prev - v_th)
        neuron = dict(decay=self.decay, v_th=self.v_th, surrogate=self.surrogate)
        (u, s), _ = lif_step((u_prev, s_prev), wide(x), **neuron, width=self.surrogate_width)
        state.value = u
        return s.astype(x.dtype)


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
    remat: bool = False,
    remat_policy: str = "nothing_saveable",
    pack_spikes: bool = False,
) -> ResNet:
    """Builds a Spiking ResNet (reference defaults: T=4, decay 0.25, v_th 0.5, rect a=0.5).

    `stem_padding=3` reproduces the reference SNN stem exactly (36x36 maps for 32x32 input);
    `remat` and `pack_spikes` save training memory (module docstring).
    """
    if not (isinstance(time_steps, int) and time_steps >= 1):
        raise ValueError(f"time_steps={time_steps!r} must be an integer >= 1")
    neuron = dict(decay=decay, v_th=v_th, surrogate=surrogate, surrogate_width=surrogate_width)
    check_neuron_args(**neuron)
    act = functools.partial(LIF, time_steps=time_steps, pack_spikes=pack_spikes, **neuron)
    both = remat and pack_spikes
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
        remat=remat,
        remat_policy=remat_policy,
        spike_conv=SpikeConv if pack_spikes else None,
        # With both options, blocks and stem keep only their input (bits where it is spikes).
        block_call=functools.partial(rematerialize, binary=not sew) if both else None,
        stem_call=functools.partial(rematerialize, binary=False) if both else None,
    )


def firing_rates(intermediates: Any) -> dict[str, jax.Array]:
    """`{'stage1/block0/act1': rates (B,), ...}` from the `intermediates` of a forward pass."""
    flat = traverse_util.flatten_dict(intermediates, sep="/")
    suffix = "/firing_rate"
    return {k[: -len(suffix)]: v[0] for k, v in flat.items() if k.endswith(suffix)}
