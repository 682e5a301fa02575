"""Small inputs and tree helpers shared by the model tests (test_models, test_resnet,
test_spiking_resnet)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from idsnn_jax.models import is_spiking

W = 0.0625  # tiny width multiplier: 4, 8, 16, 32 channels


def images(shape, seed=0):
    """Standard-normal float32 images of `shape` (NHWC)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def flat(tree):
    """{"a/b/c": leaf} of a nested dict."""
    return traverse_util.flatten_dict(tree, sep="/")


def model_kwargs(name, time_steps=2, **kw):
    """`kw` plus `time_steps` when model `name` is spiking."""
    if is_spiking(name):
        kw.setdefault("time_steps", time_steps)
    return kw


def captured(inter, suffix="__call__"):
    """{module path: tuple of outputs} of captured `__call__`s."""
    out = {}
    for k, v in traverse_util.flatten_dict(inter).items():
        if k[-1] == suffix:
            out["/".join(k[:-1])] = v
    return out


def train_apply_captured(model, variables, x):
    """(logits, state) of a train-mode forward that updates BN statistics and captures every
    module's output (state["intermediates"])."""
    return model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
