"""The model registry (idsnn_jax.models): every registered model runs, and bad arguments
are refused naming them."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import W, flat, images, model_kwargs

from idsnn_jax.models import (
    MODELS,
    ResNet,
    create_model,
    is_spiking,
)

# --------------------------------------------------------------------------------------
# Every registered model runs.


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_logits_shape_and_dtype(name):
    """Abstract evaluation (traces the whole model, no FLOPs) of init, train and eval."""
    model = create_model(name, num_classes=5, width=W, **model_kwargs(name))
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}

    def train(v, xx):
        return model.apply(v, xx, train=True, mutable=["batch_stats"])

    logits, updated = jax.eval_shape(train, variables, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert jax.tree.structure(updated["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )
    eval_logits = jax.eval_shape(model.apply, variables, x)
    assert eval_logits.shape == (2, 5) and eval_logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "name,shape",
    [
        ("resnet18", (2, 8, 8, 3)),
        ("resnet50", (2, 8, 8, 3)),
        ("resnet18", (3, 12, 12, 1)),
        ("spiking_resnet18", (3, 12, 12, 1)),
    ],
)
def test_forward_train_and_eval(name, shape):
    """Real forwards (ANN basic + bottleneck, SNN, 1-channel images): finite float32 logits."""
    model = create_model(name, num_classes=10, width=W, **model_kwargs(name))
    x = images(shape, seed=1)
    # init runs the eval-mode forward with the initial running stats: two forwards, not three.
    eval_logits, variables = model.init_with_output(jax.random.key(1), x, train=False)
    assert variables["params"]["stem"]["conv"]["kernel"].shape == (3, 3, shape[-1], 4)
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    for out in (eval_logits, logits):
        assert out.shape == (shape[0], 10) and out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out)))
    # Eval and train mode really differ (running vs batch statistics) ...
    assert not np.allclose(np.asarray(eval_logits), np.asarray(logits))
    # ... and train mode updated the running statistics.
    old, new = flat(variables["batch_stats"]), flat(updated["batch_stats"])
    assert old.keys() == new.keys()
    assert all(not np.allclose(old[k], new[k]) for k in old if k.endswith("mean"))


# --------------------------------------------------------------------------------------
# Errors.


def test_unknown_model_name_lists_models():
    with pytest.raises(ValueError) as e:
        create_model("resnet19", num_classes=10)
    msg = str(e.value)
    assert "resnet19" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("time_steps", [0, -1, 2.0])
def test_bad_time_steps(time_steps):
    with pytest.raises(ValueError, match="time_steps"):
        create_model("spiking_resnet18", num_classes=10, time_steps=time_steps)


@pytest.mark.parametrize("name", ["resnet18", "spiking_resnet18"])
@pytest.mark.parametrize("width", [0.0, -0.5])
def test_bad_width(name, width):
    with pytest.raises(ValueError, match="width"):
        create_model(name, num_classes=10, width=width)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


def test_bad_surrogate_in_model():
    with pytest.raises(ValueError, match="surrogate"):
        create_model("spiking_resnet18", num_classes=10, surrogate="nope")


@pytest.mark.parametrize("name", ["resnet18", "spiking_resnet18"])
@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 2, 8, 8, 3)])
def test_images_must_be_4d(name, shape):
    model = create_model(name, num_classes=10, width=W, **model_kwargs(name))
    with pytest.raises(ValueError, match="images"):
        model.init(jax.random.key(0), jnp.zeros(shape))


def test_is_spiking_and_registry_types():
    assert not is_spiking("resnet18") and not is_spiking("resnet152")
    assert is_spiking("spiking_resnet18") and is_spiking("sew_resnet34")
    for name in MODELS:
        m = create_model(name, num_classes=2, width=W, **model_kwargs(name))
        assert isinstance(m, ResNet)
        assert m.time_steps == (2 if is_spiking(name) else 1)
