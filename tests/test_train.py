"""Train/eval steps: N devices == 1 device, PyTorch SGD semantics, exact evaluation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from idsnn_jax import input_pipeline, train
from idsnn_jax.models import create_model

INFO = input_pipeline.DatasetInfo("tiny", 5, (8, 8, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _models():
    student = create_model(
        "spiking_resnet18", num_classes=5, width=0.0625, time_steps=2, bn_axis_name="batch"
    )
    teacher = create_model("resnet34", num_classes=5, width=0.0625, bn_axis_name="batch")
    return student, teacher


def _batches(n: int, batch: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (batch, 8, 8, 3), dtype=np.uint8),
            "label": rng.integers(0, 5, (batch,), dtype=np.int32),
        }
        for _ in range(n)
    ]


def _run_steps(mesh, student, teacher, steps: int = 3):
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
    step = train.make_train_step(student, tx, INFO, mode="idsnn", teacher=teacher)
    train_fn, _ = train.compile_steps(mesh, step, lambda s, b: {})
    state = train.replicate(
        train.create_train_state(train.init_variables(student, INFO, 0), tx, 7), mesh
    )
    teacher_vars = train.replicate(train.init_variables(teacher, INFO, 1), mesh)
    losses = []
    for batch in _batches(steps, 8):
        state, metrics = train_fn(state, train.shard_batch(batch, mesh), teacher_vars)
        losses.append(float(metrics["loss"]))
    return jax.device_get(state), losses


def test_four_devices_equal_one_device():
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    student, teacher = _models()
    one, losses_one = _run_steps(train.create_mesh(jax.devices()[:1]), student, teacher)
    four, losses_four = _run_steps(train.create_mesh(), student, teacher)
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    chex.assert_trees_all_close(four.params, one.params, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(four.batch_stats, one.batch_stats, atol=1e-5, rtol=1e-4)
    # The step really trained: parameters moved away from the initialization.
    init = train.init_variables(student, INFO, 0)["params"]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, init)
    assert max(jax.tree.leaves(moved)) > 1e-3


def test_train_step_traces_once():
    student, teacher = _models()
    tx = optax.sgd(0.01)
    step = chex.assert_max_traces(
        train.make_train_step(student, tx, INFO, mode="idsnn", teacher=teacher), n=1
    )
    mesh = train.create_mesh()
    train_fn, _ = train.compile_steps(mesh, step, lambda s, b: {})
    state = train.replicate(
        train.create_train_state(train.init_variables(student, INFO, 0), tx, 0), mesh
    )
    teacher_vars = train.replicate(train.init_variables(teacher, INFO, 1), mesh)
    for batch in _batches(3, 8):
        state, _ = train_fn(state, train.shard_batch(batch, mesh), teacher_vars)
    assert int(state.step) == 3


def test_sgd_matches_pytorch_semantics():
    """Weight decay added to the gradient before momentum; lr x gamma at milestones."""
    opt = ml_collections.ConfigDict(
        dict(
            learning_rate=0.1,
            momentum=0.9,
            weight_decay=0.01,
            lr_milestones=(1, 2),
            lr_interval=0,
            lr_gamma=0.5,
        )
    )
    steps_per_epoch = 2
    tx, schedule = train.create_optimizer(opt, steps_per_epoch, num_epochs=3)
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
    opt = ml_collections.ConfigDict(dict(lr_milestones=milestones, lr_interval=interval))
    assert (
        train.lr_milestones(opt, 120 if interval == 20 else (200 if 60 in milestones else 5))
        == expected
    )


def test_evaluate_counts_every_example_once():
    """Accuracy, loss and firing rates equal a direct forward on all 11 examples, with a
    batch size (8 over 4 devices) that forces a padded last batch."""
    student, _ = _models()
    variables = train.init_variables(student, INFO, 3)
    rng = np.random.default_rng(1)
    split = input_pipeline.Split(
        rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8),
        rng.integers(0, 5, (11,), dtype=np.int32),
    )
    mesh = train.create_mesh()
    _, eval_fn = train.compile_steps(
        mesh, lambda s, b, t: (s, {}), train.make_eval_step(student, INFO)
    )
    state = train.replicate(train.create_train_state(variables, optax.sgd(0.1), 0), mesh)
    got = train.evaluate(eval_fn, state, split, 8, mesh)

    images = input_pipeline.normalize(jnp.asarray(split.images), INFO)
    logits, inter = student.apply(variables, images, train=False, mutable=["intermediates"])
    logits = np.asarray(logits, np.float64)
    log_p = (
        logits
        - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    expected_loss = -np.mean(log_p[np.arange(11), split.labels])
    expected_acc = np.mean(np.argmax(logits, 1) == split.labels)
    assert got["accuracy"] == pytest.approx(expected_acc)
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)
    stem = np.mean(np.asarray(inter["intermediates"]["stem"]["act"]["firing_rate"][0]))
    assert got["firing_rate/stem/act"] == pytest.approx(stem, rel=1e-5)
    assert 0.0 < stem < 1.0


def test_train_step_rejects_bad_mode():
    student, _ = _models()
    with pytest.raises(ValueError, match="mode='kd'"):
        train.make_train_step(student, optax.sgd(0.1), INFO, mode="kd")
    with pytest.raises(ValueError, match="needs a teacher"):
        train.make_train_step(student, optax.sgd(0.1), INFO, mode="idsnn")
