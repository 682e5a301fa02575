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
    conv whose input is spikes keeps that input as bits (`SpikeConv`). BatchNorm's float32
    input (the conv output) is still kept.
  - both: a standard block's input is spikes, so each block is rematerialized from its input
    packed into bits (`remat_from_bits`): between blocks only bits are kept, and the next
    conv's input is recomputed from them. SEW blocks (input a sum of spikes) fall back to
    `nn.remat` with packed LIFs inside.
"""

from __future__ import annotations

import functools
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from idsnn_jax.models.resnet import BasicBlock, Bottleneck, ResNet, torch_default_init
from idsnn_jax.neuron import check_neuron_args, lif_scan, lif_step, pack_bits, unpack_bits
from idsnn_jax.precision import wide

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# The collection of each LIF's membrane potential between time steps when the network runs
# one step at a time (`LIF.one_step`, used by `sltt`).
MEMBRANE = "membrane"


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """The convolution `nn.Conv` computes (NHWC x HWIO, symmetric padding, no bias)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSIONS,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def spike_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """`conv(x, kernel)` for x exactly 0/1; the backward keeps x as bits (1/32 of float32).

    Only valid for binary x: the backward rebuilds x as `x != 0`.
    """
    return _conv(x, kernel, strides, padding)


def _spike_conv_fwd(x, kernel, strides, padding):
    bits = pack_bits(x.reshape((1, -1)) != 0)
    return _conv(x, kernel, strides, padding), (bits, kernel, jnp.zeros((0,) + x.shape, x.dtype))


def _spike_conv_bwd(strides, padding, res, g):
    bits, kernel, like = res
    x = unpack_bits(bits, (1, *like.shape[1:]), like.dtype).reshape(like.shape[1:])
    _, vjp = jax.vjp(lambda xx, kk: _conv(xx, kk, strides, padding), x, kernel)
    return vjp(g)


spike_conv.defvjp(_spike_conv_fwd, _spike_conv_bwd)


class SpikeConv(nn.Module):
    """Bias-free k x k conv on spikes, with `nn.Conv`'s parameter (`<name>/kernel`, HWIO),
    init and forward; its backward stores the 0/1 input as bits (`spike_conv`)."""

    features: int
    kernel: int = 3
    strides: int = 1
    padding: int | None = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        kernel = self.param("kernel", torch_default_init, shape, jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pad = self.kernel // 2 if self.padding is None else self.padding
        return spike_conv(x, kernel, self.strides, pad)


def _after(x: jax.Array, g: jax.Array) -> jax.Array:
    """`x`, made to depend on the cotangent `g`: a scheduling fence.

    `remat_from_bits` starts its recomputation from `_after(bits, g)`, so no scheduler can run
    it before the backward pass reaches the block. Without it XLA:CPU's (concurrency-optimized)
    scheduler runs every block's recomputation at once, which at T=6 took the packed model's
    compiled temp memory from 71 to 178 MiB; `optimization_barrier` does not help, XLA:CPU
    expands it away before scheduling. The test, `v == v` for the first element `v` of `g`,
    cannot be folded by XLA; it is false only for a NaN, and then the block's gradients are
    NaN anyway.
    """
    first = g.reshape(-1)[0]
    return jnp.where(first == first, x, jnp.zeros_like(x))


def remat_from_bits(block: nn.Module, x: jax.Array) -> jax.Array:
    """`block(x)` for a block whose input x is exactly 0/1, rematerialized from bits.

    A lifted `nn.custom_vjp`: the forward runs the block and keeps, for the backward pass,
    only x packed 8 per byte (plus references to the block's variables, which exist anyway);
    the backward rebuilds x from the bits, recomputes the block (`jax.vjp` of its pure
    `apply`, train-mode BatchNorm statistics recomputed from the same x) and returns the
    exact gradients. Unlike `nn.remat`, the recomputation starts from `unpack(bits)`, not
    from the forward's own values, so XLA cannot fold it back into the forward (XLA:CPU's
    CSE does that to `nn.remat`, which then saves no memory there).
    """
    unbound = block.clone(parent=None)
    shape, dtype = x.shape, x.dtype

    def fn(mdl, xx):
        return mdl(xx)

    def fwd(mdl, xx):
        variables = {k: v for k, v in mdl.variables.items() if k in ("params", "batch_stats")}
        return mdl(xx), (variables, pack_bits(xx.reshape((1, -1)) != 0))

    def bwd(res, g):
        variables, bits = res
        bits = _after(bits, g)
        xx = unpack_bits(bits, (1, math.prod(shape)), dtype).reshape(shape)

        def pure(params, xin):
            return unbound.apply({**variables, "params": params}, xin, mutable=["batch_stats"])[0]

        _, vjp = jax.vjp(pure, variables["params"], xx)
        params_t, x_t = vjp(g)
        return {"params": params_t}, x_t

    return nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd)(block, x)


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
        # With both options a standard block's input is spikes: rematerialize it from bits.
        block_call=remat_from_bits if (pack_spikes and remat and not sew) else None,
    )


def firing_rates(intermediates: Any) -> dict[str, jax.Array]:
    """`{'stage1/block0/act1': rates (B,), ...}` from the `intermediates` of a forward pass."""
    flat = traverse_util.flatten_dict(intermediates, sep="/")
    suffix = "/firing_rate"
    return {k[: -len(suffix)]: v[0] for k, v in flat.items() if k.endswith(suffix)}
