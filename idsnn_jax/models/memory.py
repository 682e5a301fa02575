"""Parts of the exact-gradient memory options (`remat`, `pack_spikes`) of the spiking ResNets.

Each is a `jax.custom_vjp` that keeps less for the backward pass than JAX's own VJP and
recomputes the rest there, with the same forward and the same gradients up to float
rounding:
  - `spike_conv` / `SpikeConv`: a conv whose input is exactly 0/1 keeps that input as bits,
    and sums its kernel gradient one time step at a time;
  - `rematerialize`: a block (or the stem) keeps only its input, as bits when it is binary,
    and is recomputed from it in the backward pass;
  - `fence`: what keeps XLA from moving those recomputations out of their place.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idsnn_jax.models.resnet import torch_default_init
from idsnn_jax.neuron import pack_bits, unpack_bits

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def fence(tree: Any, on: Any) -> Any:
    """`tree`, made to depend on the first element of every leaf of `on`: a scheduling fence.

    Work that starts from `fence(x, g)` cannot run before `g` exists. Without it XLA:CPU's
    (concurrency-optimized) scheduler runs recomputations that depend only on residuals as
    early as it can, all at once, so that their activations are live together.
    `optimization_barrier` does not help: XLA:CPU expands it away before scheduling. The
    test, `v == v`, cannot be folded by XLA; it is false only for a NaN, and then the
    gradients that follow are NaN anyway.
    """
    first = sum(jnp.sum(leaf.reshape(-1)[:1]) for leaf in jax.tree.leaves(on))
    return jax.tree.map(lambda x: jnp.where(first == first, x, jnp.zeros_like(x)), tree)


def _conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """The convolution `nn.Conv` computes (NHWC x HWIO, symmetric padding, no bias)."""
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        (strides, strides),
        ((padding, padding), (padding, padding)),
        dimension_numbers=_DIMENSIONS,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def spike_conv(
    x: jax.Array, kernel: jax.Array, strides: int, padding: int, chunks: int = 1
) -> jax.Array:
    """`conv(x, kernel)` for x `(N, H, W, C)` exactly 0/1 (the backward rebuilds x as
    `x != 0`); the backward keeps x as bits (1/32 of float32).

    `chunks` (dividing N; `ResNet` passes its time steps, so a chunk is one step): the
    kernel gradient is the sum of the chunks' kernel gradients, each computed after the
    previous one, so that only one chunk of x is unpacked at a time (XLA:CPU also makes a
    transposed copy of it). The input gradient needs no x and is one convolution.
    """
    return _conv(x, kernel, strides, padding)


def _spike_conv_fwd(x, kernel, strides, padding, chunks):
    bits = pack_bits(x.reshape((chunks, -1)) != 0)  # (chunks, ceil(N H W C / chunks / 8))
    return _conv(x, kernel, strides, padding), (bits, kernel, jnp.zeros((0,) + x.shape, x.dtype))


def _spike_conv_bwd(strides, padding, chunks, res, g):
    bits, kernel, like = res
    shape, dtype = like.shape[1:], like.dtype
    conv_of_x = functools.partial(_conv, kernel=kernel, strides=strides, padding=padding)
    (g_x,) = jax.linear_transpose(conv_of_x, jax.ShapeDtypeStruct(shape, dtype))(g)
    part, rows = (shape[0] // chunks, *shape[1:]), g.shape[0] // chunks
    g_kernel = jnp.zeros_like(kernel)
    for i in range(chunks):
        x_i = unpack_bits(fence(bits[i : i + 1], g_kernel if i else g), (1, *part), dtype)
        conv_of_kernel = functools.partial(_conv, x_i[0], strides=strides, padding=padding)
        g_kernel = (
            g_kernel + jax.linear_transpose(conv_of_kernel, kernel)(g[i * rows : (i + 1) * rows])[0]
        )
    return g_x, g_kernel


spike_conv.defvjp(_spike_conv_fwd, _spike_conv_bwd)


class SpikeConv(nn.Module):
    """Bias-free k x k conv on spikes, with `nn.Conv`'s parameter (`<name>/kernel`, HWIO),
    init and forward; its backward stores the 0/1 input as bits (`spike_conv`), and sums the
    kernel gradient over `chunks` equal parts of the batch axis when they divide it (one time
    step each: `ResNet` passes its `time_steps`), else over the whole batch at once."""

    features: int
    kernel: int = 3
    strides: int = 1
    padding: int | None = None
    dtype: Any = jnp.float32
    chunks: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        shape = (self.kernel, self.kernel, x.shape[-1], self.features)
        kernel = self.param("kernel", torch_default_init, shape, jnp.float32)
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        pad = self.kernel // 2 if self.padding is None else self.padding
        chunks = self.chunks if x.shape[0] % self.chunks == 0 else 1
        return spike_conv(x, kernel, self.strides, pad, chunks)


def rematerialize(block: nn.Module, x: jax.Array, *, binary: bool) -> jax.Array:
    """`block(x)`, recomputed in the backward pass from its input alone.

    A lifted `nn.custom_vjp`: the forward runs the block and keeps, for the backward pass,
    only x (packed 8 per byte when `binary`: x must then be exactly 0/1), plus references to
    the block's variables, which exist anyway. The backward rebuilds x, recomputes the block
    (`jax.vjp` of its pure `apply`, train-mode BatchNorm statistics recomputed from the same
    x) and returns the exact gradients. Unlike `nn.remat`, the recomputation starts from
    `fence(x, g)`, not from the forward's own values, so XLA can neither fold it back into
    the forward (XLA:CPU's CSE does that to `nn.remat`, which then saves no memory there)
    nor run it before the backward pass reaches the block.
    """
    unbound = block.clone(parent=None)
    shape, dtype = x.shape, x.dtype

    def fn(mdl, xx):
        return mdl(xx)

    def fwd(mdl, xx):
        variables = {k: v for k, v in mdl.variables.items() if k in ("params", "batch_stats")}
        kept = pack_bits(xx.reshape((1, -1)) != 0) if binary else xx
        return mdl(xx), (variables, kept)

    def bwd(res, g):
        variables, kept = res
        kept = fence(kept, g)
        xx = unpack_bits(kept, (1, math.prod(shape)), dtype).reshape(shape) if binary else kept

        def pure(params, xin):
            return unbound.apply({**variables, "params": params}, xin, mutable=["batch_stats"])[0]

        _, vjp = jax.vjp(pure, variables["params"], xx)
        params_t, x_t = vjp(g)
        return {"params": params_t}, x_t

    return nn.custom_vjp(fn, forward_fn=fwd, backward_fn=bwd)(block, x)
