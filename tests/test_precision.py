"""The precision rule (`idsnn_jax.precision`): compute in the config's dtype, keep state,
logits and losses in at least float32, and all of it in float64 in float64 mode."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idsnn_jax import plan, precision, steps
from idsnn_jax.configs import tiny
from idsnn_jax.datasets import dataset_info
from idsnn_jax.losses import LossOptions, objective
from idsnn_jax.models import create_model, init_variables

INFO = dataset_info("fashion_mnist")


@pytest.mark.parametrize(
    "name, backend, expected",
    [
        ("auto", "cpu", jnp.float32),
        ("auto", "gpu", jnp.bfloat16),
        ("auto", "tpu", jnp.bfloat16),
        ("float32", "gpu", jnp.float32),
        ("bfloat16", "cpu", jnp.bfloat16),
        ("float64", "gpu", jnp.float64),
    ],
)
def test_compute_dtype(monkeypatch, name, backend, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert precision.compute_dtype(name) == expected


@pytest.mark.parametrize(
    "compute, wide",
    [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.float32), (jnp.float64, jnp.float64)],
)
def test_wide_dtype(compute, wide):
    assert precision.wide_dtype(compute) == wide


def test_float64_needs_64_bit_jax():
    config = tiny.get_config()
    config.dtype = "float64"
    with pytest.raises(ValueError, match=r"^config\.dtype='float64' is invalid: expected 64-bit"):
        plan.build_plan(config)
    with jax.enable_x64(True):
        assert {m.dtype for m in plan.build_plan(config).models.values()} == {jnp.float64}


@pytest.mark.slow
@pytest.mark.parametrize("compute", [jnp.bfloat16, jnp.float64])
def test_state_logits_and_loss_are_wide(compute):
    """Variables, the train-mode logits (per step too), BN statistics, the loss and its
    gradient: float32 under bfloat16 compute, float64 under float64 (no float32 anywhere)."""
    wide = precision.wide_dtype(compute)
    with jax.enable_x64(compute == jnp.float64):
        model = create_model("spiking_resnet18", num_classes=10, width=0.0625, time_steps=2)
        model = model.clone(dtype=compute)
        variables = init_variables(model, INFO, 0)
        images = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), compute)
        labels = jnp.arange(4)

        def loss(params):
            logits, updates = model.apply(
                {**variables, "params": params}, images, train=True, mutable=["batch_stats"]
            )
            return objective(logits, labels, LossOptions(), logits), (logits, updates)

        (value, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(
            variables["params"]
        )
        per_step = model.apply(variables, images, per_step=True)
        tx = optax.sgd(0.1, momentum=0.9)
        state = steps.create_train_state(variables, tx, 0)
    trees = {"variables": variables, "grads": grads, "updates": updates, "opt": state.opt_state}
    dtypes = {name: {x.dtype for x in jax.tree.leaves(t)} for name, t in trees.items()}
    assert dtypes == {name: {np.dtype(wide)} for name in trees}
    assert {value.dtype, logits.dtype, per_step.dtype} == {np.dtype(wide)}
