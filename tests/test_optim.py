"""The optimizer: PyTorch SGD semantics and the learning-rate schedules (step, cosine,
warm-up), each against the formula written out."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from idsnn_jax import optim


def test_sgd_matches_pytorch_semantics():
    """Weight decay added to the gradient before momentum; lr x gamma at milestones."""
    opt = optim.OptimizerOptions(
        learning_rate=0.1, momentum=0.9, weight_decay=0.01, lr_milestones=(1, 2), lr_gamma=0.5
    )
    steps_per_epoch = 2
    tx, schedule = optim.create_optimizer(opt, steps_per_epoch, num_epochs=3)
    rng = np.random.default_rng(0)
    p = {"w": jnp.asarray(rng.normal(size=4), jnp.float32)}
    state = tx.init(p)
    p_ref, buf = np.asarray(p["w"], np.float64), np.zeros(4)
    for t in range(6):
        g = rng.normal(size=4)
        updates, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state, p)
        p = optax.apply_updates(p, updates)
        lr = 0.1 * 0.5 ** sum(t >= m * steps_per_epoch for m in (1, 2))
        assert float(schedule(t)) == pytest.approx(lr)
        d = g + 0.01 * p_ref  # torch.optim.SGD: d_p = g + wd * p; buf = m * buf + d_p
        buf = 0.9 * buf + d
        p_ref = p_ref - lr * buf
    np.testing.assert_allclose(np.asarray(p["w"]), p_ref, rtol=1e-5)


@pytest.mark.parametrize(
    "milestones, interval, expected",
    [
        ((60, 120, 160), 0, [60, 120, 160]),
        ((60, 120, 160), 20, [20, 40, 60, 80, 100]),
        ((3, 9), 0, [3]),
    ],
)
def test_lr_milestones(milestones, interval, expected):
    opt = optim.OptimizerOptions(lr_milestones=milestones, lr_interval=interval)
    assert opt.milestones(120 if interval == 20 else (200 if 60 in milestones else 5)) == expected


def test_lr_interval_steps_the_rate_inside_training():
    """With lr_interval=1 and 2 steps per epoch, plain SGD moves a parameter by lr * grad
    with lr 0.1, 0.1, 0.01, 0.01, 0.001, 0.001 over six steps."""
    opt = optim.OptimizerOptions(
        learning_rate=0.1, momentum=0.0, weight_decay=0.0, lr_interval=1, lr_gamma=0.1
    )
    tx, _ = optim.create_optimizer(opt, steps_per_epoch=2, num_epochs=3)
    p = {"w": jnp.zeros(())}
    state = tx.init(p)
    moves = []
    for _ in range(6):
        updates, state = tx.update({"w": jnp.ones(())}, state, p)
        new = optax.apply_updates(p, updates)
        moves.append(float(p["w"] - new["w"]))
        p = new
    np.testing.assert_allclose(moves, [0.1, 0.1, 0.01, 0.01, 0.001, 0.001], rtol=1e-5)


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("momentum", 1.0),
        ("weight_decay", -1e-4),
        ("lr_milestones", (120, 60)),
        ("lr_interval", -1),
        ("lr_gamma", 1.5),
        ("schedule", "linear"),
        ("warmup_epochs", -1),
    ],
)
def test_optimizer_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        optim.OptimizerOptions(**{field: value})


def _rates(opt: optim.OptimizerOptions, steps_per_epoch: int, num_epochs: int) -> np.ndarray:
    schedule = optim.lr_schedule(opt, steps_per_epoch, num_epochs)
    return np.asarray([float(schedule(jnp.int32(s))) for s in range(steps_per_epoch * num_epochs)])


def test_cosine_schedule_with_warmup_by_hand():
    """2 warm-up epochs of 2 steps (0.25, 0.5, 0.75, 1.0 x lr), then lr (1 + cos(pi k / 6)) / 2
    over the 6 steps k = 0..5 of the 3 remaining epochs."""
    opt = optim.OptimizerOptions(learning_rate=0.2, schedule="cosine", warmup_epochs=2)
    got = _rates(opt, steps_per_epoch=2, num_epochs=5)
    warm = [0.2 * (s + 1) / 4 for s in range(4)]
    cosine = [0.2 * (1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)]
    np.testing.assert_allclose(got, warm + cosine, rtol=1e-6)


def test_cosine_without_warmup_starts_at_the_rate():
    opt = optim.OptimizerOptions(learning_rate=0.1, schedule="cosine")
    got = _rates(opt, steps_per_epoch=3, num_epochs=2)
    np.testing.assert_allclose(
        got, [0.05 * (1 + math.cos(math.pi * k / 6)) for k in range(6)], rtol=1e-6
    )


def test_warmup_before_the_step_schedule_keeps_absolute_milestones():
    """Warm-up over epoch 1 (2 steps), then 0.1 until the milestone at epoch 2, then 0.01."""
    opt = optim.OptimizerOptions(learning_rate=0.1, lr_milestones=(2,), warmup_epochs=1)
    got = _rates(opt, steps_per_epoch=2, num_epochs=3)
    np.testing.assert_allclose(got, [0.05, 0.1, 0.1, 0.1, 0.01, 0.01], rtol=1e-6)
