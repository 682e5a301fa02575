"""One stage's epochs: evaluation that counts every example once in float64, and the
epoch's dispatches (`steps_per_call` steps each, the last padded with invalid steps)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import references as ref

from idsnn_jax import epochs, input_pipeline, steps, train
from idsnn_jax.datasets import DatasetInfo, Split
from idsnn_jax.logs import MetricLogger
from idsnn_jax.models import create_model, init_variables

INFO = DatasetInfo("tiny", 5, (8, 8, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def test_evaluate_counts_every_example_once():
    """Accuracy, loss and firing rates equal a direct forward on all 11 examples, with a
    batch size (8 over 4 devices) that forces a padded last batch."""
    student = create_model(
        "spiking_resnet18", num_classes=5, width=0.0625, time_steps=2, bn_axis_name="batch"
    )
    variables = init_variables(student, INFO, 3)
    rng = np.random.default_rng(1)
    split = Split(
        rng.integers(0, 256, (11, 8, 8, 3), dtype=np.uint8),
        rng.integers(0, 5, (11,), dtype=np.int32),
    )
    mesh = steps.create_mesh()
    eval_fn = steps.compile_eval_step(mesh, steps.make_eval_step(student, INFO))
    state = steps.replicate(steps.create_train_state(variables, optax.sgd(0.1), 0), mesh)
    got = epochs.evaluate(eval_fn, state, split, 8, mesh)

    images = input_pipeline.normalize(jnp.asarray(split.images), INFO)
    logits, inter = student.apply(variables, images, train=False, mutable=["intermediates"])
    log_p = ref.log_softmax(np.asarray(logits))
    expected_loss = -np.mean(log_p[np.arange(11), split.labels])
    expected_acc = np.mean(np.argmax(np.asarray(logits), 1) == split.labels)
    assert got["accuracy"] == pytest.approx(expected_acc)
    assert got["loss"] == pytest.approx(expected_loss, rel=1e-5)
    stem = np.mean(np.asarray(inter["intermediates"]["stem"]["act"]["firing_rate"][0]))
    assert got["firing_rate/stem/act"] == pytest.approx(stem, rel=1e-5)
    assert 0.0 < stem < 1.0


def test_evaluate_adds_the_batch_sums_on_the_host_in_float64():
    """The per-batch sums add up on the host: in float32 on the device, 2**24 + 1 is 2**24
    (and eager device adds between the eval steps' all-reduces deadlocked XLA:CPU with 4
    devices under load, hanging CI in evaluation)."""
    calls = []

    def eval_fn(state, batch):
        calls.append(batch["image"].shape)
        big = 2.0**24 if len(calls) == 1 else 1.0
        return {
            "loss": jnp.float32(big),
            "correct": jnp.float32(1),
            "count": jnp.sum(batch["mask"]),
        }

    split = Split(np.zeros((16, 2, 2, 1), np.uint8), np.zeros((16,), np.int32))
    got = epochs.evaluate(eval_fn, None, split, 8, steps.create_mesh())
    assert calls == [(8, 2, 2, 1)] * 2
    assert got == {"accuracy": 2 / 16, "loss": (2.0**24 + 1) / 16}


@pytest.mark.parametrize("steps_per_call", [1, 3])
def test_epoch_calls_cover_the_epoch_once_in_equal_shapes(tmp_path, steps_per_call):
    """20 examples, batch 4: 5 steps; from step 1 on, the dispatches hold the epoch's steps
    1..4 in order (the rows of `input_pipeline.epoch_indices`), each call k steps long, the
    padding steps marked invalid."""
    split = Split(np.zeros((20, 2, 2, 1), np.uint8), np.zeros((20,), np.int32))
    mesh = steps.create_mesh()
    ctx = train.RunContext(str(tmp_path), split, split, INFO, mesh, MetricLogger(str(tmp_path)))
    options = train.FitOptions(num_epochs=1, batch_size=4, steps_per_call=steps_per_call)
    calls = epochs.epoch_calls(ctx, 0, options, first_step=1)
    whole = np.asarray(input_pipeline.epoch_indices(20, 4, seed=0, epoch=0))
    got = np.concatenate([np.asarray(idx) for idx, _ in calls])
    valid = np.concatenate([v for _, v in calls])
    assert {np.asarray(idx).shape for idx, _ in calls} == {(steps_per_call, 4)}
    assert valid.sum() == 4 and valid[:4].all()
    np.testing.assert_array_equal(got[:4], whole[1:5])
