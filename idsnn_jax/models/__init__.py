"""Model registry: `create_model(name, num_classes=..., width=..., **kwargs)`.

ANN names take `stem_padding`, `bn_axis_name`, `dtype`, `remat`, `remat_policy`; spiking
names also take `time_steps`, the neuron settings and `pack_spikes` (see
`spiking_resnet.spiking_resnet`). `remat` and `pack_spikes` save training memory and leave
the parameter tree, the forward and the gradients as they are.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from idsnn_jax.models.resnet import REMAT_POLICIES, BasicBlock, Bottleneck, ResNet
from idsnn_jax.models.spiking_resnet import LIF, firing_rates, spiking_resnet
from idsnn_jax.precision import wide_dtype

if TYPE_CHECKING:
    from idsnn_jax.datasets import DatasetInfo

AXIS = "batch"  # the data-parallel mesh axis (`steps.create_mesh`) BatchNorm averages over

_ANN = functools.partial(ResNet, block_cls=BasicBlock)
_ANN_BOTTLENECK = functools.partial(ResNet, block_cls=Bottleneck)

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": functools.partial(_ANN, stage_sizes=(2, 2, 2, 2)),
    "resnet34": functools.partial(_ANN, stage_sizes=(3, 4, 6, 3)),
    "resnet50": functools.partial(_ANN_BOTTLENECK, stage_sizes=(3, 4, 6, 3)),
    "resnet101": functools.partial(_ANN_BOTTLENECK, stage_sizes=(3, 4, 23, 3)),
    "resnet152": functools.partial(_ANN_BOTTLENECK, stage_sizes=(3, 8, 36, 3)),
    "spiking_resnet18": functools.partial(spiking_resnet, (2, 2, 2, 2)),
    "spiking_resnet34": functools.partial(spiking_resnet, (3, 4, 6, 3)),
    "sew_resnet18": functools.partial(spiking_resnet, (2, 2, 2, 2), sew=True),
    "sew_resnet34": functools.partial(spiking_resnet, (3, 4, 6, 3), sew=True),
}


def is_spiking(name: str) -> bool:
    """Whether the registered model `name` is a spiking network."""
    return not name.startswith("resnet")


def create_model(name: str, *, num_classes: int, width: float = 1.0, **kwargs: Any) -> nn.Module:
    """Returns the Flax module registered as `name`; bad arguments raise ValueError."""
    if name not in MODELS:
        raise ValueError(f"model={name!r} is unknown; known models: {sorted(MODELS)}")
    if not (isinstance(num_classes, int) and num_classes >= 1):
        raise ValueError(f"num_classes={num_classes!r} must be an integer >= 1")
    if not width > 0:
        raise ValueError(f"width={width!r} must be > 0 (multiplier of 64, 128, 256, 512 channels)")
    stem_padding = kwargs.get("stem_padding", 1)
    if not (isinstance(stem_padding, int) and stem_padding >= 0):
        raise ValueError(f"stem_padding={stem_padding!r} must be an integer >= 0")
    policy = kwargs.get("remat_policy", "nothing_saveable")
    if policy not in REMAT_POLICIES:
        raise ValueError(
            f"remat_policy={policy!r} is unknown; choose one of {sorted(REMAT_POLICIES)}"
        )
    if not is_spiking(name) and kwargs.pop("pack_spikes", False):
        raise ValueError(f"pack_spikes=True needs a spiking model; {name!r} has no spikes")
    return MODELS[name](num_classes=num_classes, width=width, **kwargs)


def init_variables(model: nn.Module, info: DatasetInfo, seed: int) -> dict[str, Any]:
    """Model variables {'params', 'batch_stats'} for a batch of `info`-shaped images, in the
    `precision.wide_dtype` of the model's compute dtype (float64 for float64 models)."""
    dummy = jnp.zeros((1, *info.image_shape), jnp.float32)
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.PRNGKey(seed), dummy)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    return jax.tree.map(lambda x: x.astype(wide_dtype(model.dtype)), variables)


__all__ = [
    "AXIS",
    "LIF",
    "MODELS",
    "BasicBlock",
    "Bottleneck",
    "ResNet",
    "create_model",
    "firing_rates",
    "init_variables",
    "is_spiking",
    "spiking_resnet",
]
