"""NNX users' path (README, Design notes, "NNX users"): a Spiking ResNet wrapped with
`flax.nnx.bridge.ToNNX` and trained one step with an `nnx.Optimizer` ends where the Linen
step ends.

The README's `py` block runs here as written; the Linen step it is checked against is
written out below, as `steps.make_train_step` computes it on one device without
augmentation: `apply(..., train=True, mutable=["batch_stats"])`, the cross-entropy, the
project's optax transform on the gradients of `params`, the updated `batch_stats` kept.
"""

from __future__ import annotations

import os
import re

import jax
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util

from idsnn_jax.losses import cross_entropy

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
RTOL, ATOL = 1e-5, 1e-6  # float32


def _readme_block() -> str:
    """The first `py` block after the "NNX users" heading."""
    with open(README) as f:
        text = f.read()
    start = text.index("### NNX users")
    return re.search(r"```py\n(.*?)```", text[start:], flags=re.S).group(1)


def _assert_trees_close(actual, expected, what: str) -> None:
    actual, expected = traverse_util.flatten_dict(actual), traverse_util.flatten_dict(expected)
    assert actual.keys() == expected.keys(), what
    for path in expected:
        np.testing.assert_allclose(
            np.asarray(actual[path]),
            np.asarray(expected[path]),
            rtol=RTOL,
            atol=ATOL,
            err_msg=f"{what}: {'/'.join(path)}",
        )


def _max_change(after, before) -> float:
    changes = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), after, before)
    return max(jax.tree.leaves(changes))


def _linen_step(model, tx, variables, images, labels):
    """One Linen train step: (loss, {'params', 'batch_stats'} after it)."""

    def loss_fn(params, batch_stats):
        logits, updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return cross_entropy(logits, labels), updates["batch_stats"]

    @jax.jit
    def step(params, batch_stats):
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats)
        updates, _ = tx.update(grads, tx.init(params), params)
        return loss, {"params": optax.apply_updates(params, updates), "batch_stats": batch_stats}

    return step(variables["params"], variables["batch_stats"])


def _bridged(model, variables, images) -> nnx.Module:
    """`model` as an NNX module holding `variables` (as the README block does it)."""
    bridged = nnx.bridge.ToNNX(model, rngs=nnx.Rngs(0)).lazy_init(images)
    for kind, collection in ((nnx.Param, "params"), (nnx.BatchStat, "batch_stats")):
        state = nnx.state(bridged, kind)
        nnx.replace_by_pure_dict(state, variables[collection])
        nnx.update(bridged, state)
    return bridged


@pytest.mark.slow
def test_readme_nnx_step_is_the_linen_step():
    ns: dict = {}
    exec(compile(_readme_block(), "README.md (NNX users)", "exec"), ns)
    model, variables = ns["linen_model"], ns["variables"]
    images, labels = ns["images"], ns["labels"]
    assert set(variables) == {"params", "batch_stats"}

    linen_eval = jax.jit(lambda v: model.apply(v, images, train=False))
    nnx_eval = nnx.jit(lambda m: m(images))

    # Before the step: the bridged module holds the Linen variables and computes the same.
    fresh = _bridged(model, variables, images)
    np.testing.assert_allclose(
        np.asarray(nnx_eval(fresh)), np.asarray(linen_eval(variables)), rtol=RTOL, atol=ATOL
    )

    loss, expected = _linen_step(model, ns["tx"], variables, images, labels)
    np.testing.assert_allclose(float(ns["loss"]), float(loss), rtol=RTOL, atol=ATOL)
    _assert_trees_close(ns["trained"]["params"], expected["params"], "params")
    _assert_trees_close(ns["trained"]["batch_stats"], expected["batch_stats"], "batch_stats")
    np.testing.assert_allclose(
        np.asarray(nnx_eval(ns["model"])), np.asarray(linen_eval(expected)), rtol=RTOL, atol=ATOL
    )

    # Not vacuous: the step moved the parameters and the BN running statistics.
    assert _max_change(expected["params"], variables["params"]) > 1e-3
    assert _max_change(expected["batch_stats"], variables["batch_stats"]) > 1e-3
    # One optimizer step was taken.
    assert int(ns["optimizer"].step[...]) == 1
