"""The plan's own rules: the compute dtype `config.dtype` resolves to on each backend, and the
per-stage options it builds from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from idsnn_jax import plan
from idsnn_jax.configs import tiny


@pytest.mark.parametrize(
    "name, backend, expected",
    [
        ("auto", "cpu", jnp.float32),
        ("auto", "gpu", jnp.bfloat16),
        ("auto", "tpu", jnp.bfloat16),
        ("float32", "gpu", jnp.float32),
        ("bfloat16", "cpu", jnp.bfloat16),
    ],
)
def test_compute_dtype(monkeypatch, name, backend, expected):
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    assert plan.compute_dtype(name) == expected


def test_auto_dtype_builds_float32_models_on_cpu():
    config = tiny.get_config()
    config.dtype = "auto"
    built = plan.build_plan(config)
    assert all(m.dtype == jnp.float32 for m in built.models.values())
    assert jax.default_backend() == "cpu"


def test_steps_per_call_reaches_the_fit_options():
    config = tiny.get_config()
    config.steps_per_call = 3
    built = plan.build_plan(config)
    assert {o.steps_per_call for o in built.fit_options.values()} == {3}
    config.steps_per_call = 0
    with pytest.raises(ValueError, match=r"^config\.steps_per_call=0 is invalid"):
        plan.build_plan(config)
