"""CIFAR-stem ResNets, written once for both the ANN teacher and the spiking student.

Activations are 4-D `(N, H, W, C)` everywhere. For an ANN, N is the batch B; for a spiking
network N = T * B: time is folded into the batch, so every conv and BatchNorm is one call
per layer (and BatchNorm statistics are over T, B, H, W: tdBN). The two families differ
only in the activation module (ReLU vs. LIF, which unfolds time itself), the BN scale
init, and the number of time steps, so the block code below serves both and the
parameter trees share their paths (`stem/conv`, `stage1/block0/conv1`, ..., `head`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from idsnn_jax.precision import wide

BN_EPSILON = 1e-5  # every BatchNorm's epsilon (PyTorch's default)
ModuleDef = Callable[..., nn.Module]

# What `remat=True` keeps inside a block (the rest is recomputed in the backward pass). The
# convs are not dots, so the dot policy keeps about what `nothing_saveable` keeps.
REMAT_POLICIES: dict[str, Any] = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "everything_saveable": jax.checkpoint_policies.everything_saveable,
}

# PyTorch's default conv/linear init (kaiming_uniform with a = sqrt(5)): U(+-1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """PyTorch's default bias init for a layer with `fan_in` inputs: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / max(fan_in, 1) ** 0.5
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(
        key, shape, dtype, -bound, bound
    )


class ReLU(nn.Module):
    """The ANN activation as a module, so blocks treat ReLU and LIF alike."""

    emits_spikes: ClassVar[bool] = False  # see `ResNet.spiking`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return nn.relu(x)


def conv(
    features: int,
    kernel: int = 3,
    strides: int = 1,
    padding: int | None = None,
    *,
    name: str,
    dtype: Any = jnp.float32,
) -> nn.Conv:
    """Bias-free k x k convolution with PyTorch's symmetric padding (k // 2 by default).

    A factory rather than a wrapper module, so the kernel's path is `<name>/kernel`.
    """
    pad = kernel // 2 if padding is None else padding
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=strides,
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        kernel_init=torch_default_init,
        name=name,
    )


class Block(nn.Module):
    """What both residual blocks share: their fields and the residual merge.

    A block outputs `features * expansion` channels. `spike_conv`, when given, is the conv
    factory for convs whose input is exactly 0/1 (LIF outputs), which may keep it as bits
    (`pack_spikes`): every conv after an activation, and the block-input convs too unless
    `sew` (a SEW block's input is a sum of spikes, not binary).
    """

    features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    act: ModuleDef
    sew: bool = False
    spike_conv: ModuleDef | None = None

    expansion = 1  # a class attribute, not a field: output channels per `features`

    @property
    def inner_conv(self) -> ModuleDef:
        """Conv factory for an activation's output (binary in an SNN)."""
        return self.spike_conv or self.conv

    @property
    def input_conv(self) -> ModuleDef:
        """Conv factory for the block's input: binary only in a standard (non-SEW) SNN."""
        return self.conv if self.sew else self.inner_conv

    def merge(self, x: jax.Array, y: jax.Array, act_name: str) -> jax.Array:
        """Adds the shortcut and applies the last activation.

        The shortcut is a projection (1x1 conv with the block's stride, then BN) when the block
        is strided or changes the number of channels, as in the reference, and the identity
        otherwise. The rule looks at the configuration, not at the input's spatial size, so
        the parameter tree does not depend on the image size used at init.
        """
        shortcut = x
        out_channels = self.features * self.expansion
        if self.strides != 1 or x.shape[-1] != out_channels:
            shortcut = self.input_conv(out_channels, 1, self.strides, name="shortcut_conv")(x)
            shortcut = self.norm(name="shortcut_bn")(shortcut)
            if self.sew:
                shortcut = self.act(name="shortcut_act")(shortcut)
        if self.sew:
            return self.act(name=act_name)(y) + shortcut
        return self.act(name=act_name)(y + shortcut)


class BasicBlock(Block):
    """Two 3x3 convs. Standard: `act(bn2(conv2(act(bn1(conv1 x)))) + sc(x))`.

    With `sew=True` (SEW-ResNet, ADD): `act(bn2(conv2(...))) + sc(x)` where a projection
    shortcut is `act(bn(conv1x1 x))`, so both summands are spikes.
    """

    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.input_conv(self.features, 3, self.strides, name="conv1")(x)
        y = self.act(name="act1")(self.norm(name="bn1")(y))
        y = self.norm(name="bn2")(self.inner_conv(self.features, 3, name="conv2")(y))
        return self.merge(x, y, "act2")


class Bottleneck(Block):
    """1x1 -> 3x3 (strided) -> 1x1 with 4x expansion (ResNet50 and deeper)."""

    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.input_conv(self.features, 1, name="conv1")(x)
        y = self.act(name="act1")(self.norm(name="bn1")(y))
        y = self.inner_conv(self.features, 3, self.strides, name="conv2")(y)
        y = self.act(name="act2")(self.norm(name="bn2")(y))
        conv3 = self.inner_conv(self.features * self.expansion, 1, name="conv3")
        y = self.norm(name="bn3")(conv3(y))
        return self.merge(x, y, "act3")


class Stem(nn.Module):
    """CIFAR stem: 3x3 conv (stride 1, no max-pool) -> BN -> activation."""

    features: int
    padding: int
    conv: ModuleDef
    norm: ModuleDef
    act: ModuleDef

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(self.features, 3, padding=self.padding, name="conv")(x)
        return self.act(name="act")(self.norm(name="bn")(x))


class Stage(nn.Module):
    """`num_blocks` blocks at one width; the first one carries the stride.

    `block_call(block, x)`, when given, runs each block (e.g. a custom rematerialization).
    """

    block: ModuleDef
    num_blocks: int
    features: int
    strides: int
    block_call: Callable[[nn.Module, jax.Array], jax.Array] | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for j in range(self.num_blocks):
            block = self.block(self.features, self.strides if j == 0 else 1, name=f"block{j}")
            x = block(x) if self.block_call is None else self.block_call(block, x)
        return x


class ResNet(nn.Module):
    """CIFAR ResNet over `time_steps` (1 for an ANN; T for a directly encoded SNN).

    `__call__(images (B, H, W, C), train) -> logits (B, num_classes)`, at least float32. The
    image is repeated `time_steps` times (direct encoding) and folded into the batch; the head
    averages over H, W and then over time before the Dense layer. With `per_step=True` it
    returns every time step's logits `(T, B, num_classes)`, the Dense layer applied to each
    step's pooled features: being affine, their mean over T is the default output (up to
    float rounding). TET and per-step distillation train on them (`losses.objective`).

    Memory options (exact gradients, default off): `remat=True` recomputes each residual
    block and the stem in the backward pass, by `block_call(block, x)` / `stem_call(stem, x)`
    when given (the spiking network's `memory.rematerialize`), else by `nn.remat` with the
    `REMAT_POLICIES` entry named `remat_policy`. `spike_conv` (`pack_spikes`; built with
    `dtype` and `chunks=time_steps`) is the conv used on binary inputs, see `Block`.
    None of them changes the parameter tree.
    """

    stage_sizes: Sequence[int]
    block_cls: type[Block]
    num_classes: int
    width: float = 1.0
    time_steps: int = 1
    act: ModuleDef = ReLU
    bn_scale_init: float = 1.0
    stem_padding: int = 1
    sew: bool = False
    bn_axis_name: str | None = None
    dtype: Any = jnp.float32
    remat: bool = False
    remat_policy: str = "nothing_saveable"
    spike_conv: ModuleDef | None = None
    block_call: Callable[[nn.Module, jax.Array], jax.Array] | None = None
    stem_call: Callable[[nn.Module, jax.Array], jax.Array] | None = None
    # Flax momentum of every BatchNorm's running statistics (PyTorch's 0.1). `sltt` runs the
    # forward with 0.0, so that the new "running" statistics are the batch statistics.
    bn_momentum: float = 0.9

    @property
    def spiking(self) -> bool:
        """Whether the activation emits spikes (its class's `emits_spikes`: True for `LIF`),
        whatever `time_steps` and the BN scale init are: convs after it take spikes."""
        act = self.act.func if isinstance(self.act, functools.partial) else self.act
        return bool(getattr(act, "emits_spikes", False))

    def _rematerialized(self, cls: type[nn.Module], call: Callable | None) -> tuple[Any, Any]:
        """`(class, call)` that run `cls`: under `remat`, `call` if given, else `nn.remat`."""
        if not self.remat or call is not None:
            return cls, call if self.remat else None
        return nn.remat(cls, policy=REMAT_POLICIES[self.remat_policy]), None

    @nn.compact
    def __call__(self, images: jax.Array, train: bool = False, per_step: bool = False) -> jax.Array:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, H, W, C), got shape {images.shape}")
        conv_fn = functools.partial(conv, dtype=self.dtype)
        norm = functools.partial(
            nn.BatchNorm,
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=BN_EPSILON,
            scale_init=nn.initializers.constant(self.bn_scale_init),
            axis_name=self.bn_axis_name if train else None,
            dtype=self.dtype,
        )
        block_cls, block_call = self._rematerialized(self.block_cls, self.block_call)
        stem_cls, stem_call = self._rematerialized(Stem, self.stem_call)
        spike_conv = self.spike_conv
        if spike_conv is not None:
            spike_conv = functools.partial(spike_conv, dtype=self.dtype, chunks=self.time_steps)
        block = functools.partial(
            block_cls, conv=conv_fn, norm=norm, act=self.act, sew=self.sew, spike_conv=spike_conv
        )
        b = images.shape[0]
        x = jnp.broadcast_to(images.astype(self.dtype), (self.time_steps, *images.shape))
        x = x.reshape((self.time_steps * b, *images.shape[1:]))
        stem = stem_cls(
            stage_width(64, self.width), self.stem_padding, conv_fn, norm, self.act, name="stem"
        )
        x = stem(x) if stem_call is None else stem_call(stem, x)
        for i, num_blocks in enumerate(self.stage_sizes):
            features = stage_width(64 * 2**i, self.width)
            stage = Stage(
                block, num_blocks, features, 1 if i == 0 else 2, block_call, name=f"stage{i + 1}"
            )
            x = stage(x)
        x = jnp.mean(x, axis=(1, 2)).reshape((self.time_steps, b, x.shape[-1]))
        if not per_step:
            x = x.mean(axis=0)
        head = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=torch_default_init,
            bias_init=torch_bias_init(x.shape[-1]),
            name="head",
        )
        return wide(head(x))


def stage_width(base: int, width: float) -> int:
    """Channels of a stage: `base * width`, rounded, at least 1."""
    return max(1, round(base * width))
