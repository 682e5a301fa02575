"""Tiny spiking students for the NIR tests: random weights and BN running statistics near the
batch statistics of the images they will see, so that every LIF layer fires (neither never
nor always), and folding, spikes and resets all matter. No `model.init`: its traced
initializers cost more than the rest of a test."""

from __future__ import annotations

import functools

import jax
import numpy as np


def _random_leaf(path, leaf, rng: np.random.Generator, v_th: float) -> np.ndarray:
    """A kernel ~ N(0, 1/fan_in), a BN scale ~ v_th * U(0.7, 1.4), a bias ~ N(0, 0.1^2)."""
    name = path[-1].key
    if name == "kernel":
        return rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    if name == "scale":
        return v_th * rng.uniform(0.7, 1.4, leaf.shape)
    return 0.1 * rng.standard_normal(leaf.shape)


def _random_stat(path, leaf, rng: np.random.Generator) -> np.ndarray:
    """0.1 * a batch statistic -> the statistic, the mean shifted, the variance times
    U(0.6, 1.5)."""
    if path[-1].key == "var":
        return 10 * leaf * rng.uniform(0.6, 1.5, leaf.shape)
    return 10 * leaf + 0.2 * rng.standard_normal(leaf.shape)


def random_variables(model, images: jax.Array, seed: int) -> dict:
    """`{'params', 'batch_stats'}` (float64 NumPy) for `model`, whose BN running statistics lie
    near the batch statistics of `images` (B, H, W, C), far from mean 0 / var 1."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), images)
    params = jax.tree_util.tree_map_with_path(
        lambda p, x: _random_leaf(p, x, rng, model.bn_scale_init), shapes["params"]
    )
    zeros = jax.tree.map(lambda x: np.zeros(x.shape), shapes["batch_stats"])
    # Train mode normalizes with batch statistics; the update keeps 0.1 of them (momentum 0.9).
    train = jax.jit(functools.partial(model.apply, train=True, mutable=["batch_stats"]))
    _, updated = train({"params": params, "batch_stats": zeros}, images)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: _random_stat(p, np.asarray(x), rng), updated["batch_stats"]
    )
    return {"params": params, "batch_stats": stats}
