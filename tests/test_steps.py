"""The step layer: N devices == 1 device, the distillation loss inside the step, PyTorch SGD
semantics, the lr schedule, bfloat16, exact evaluation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import augment, energy, input_pipeline, steps
from idsnn_jax.datasets import DatasetInfo
from idsnn_jax.losses import LossOptions, cross_entropy, idsnn_loss, objective
from idsnn_jax.models import create_model, init_variables

INFO = DatasetInfo("tiny", 5, (8, 8, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _models():
    student = create_model(
        "spiking_resnet18", num_classes=5, width=0.0625, time_steps=2, bn_axis_name="batch"
    )
    teacher = create_model("resnet18", num_classes=5, width=0.0625, bn_axis_name="batch")
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


def _compile_loop(mesh, step):
    return steps.compile_train_loop(mesh, steps.make_train_loop(step))


def _calls(mesh, batches, steps_per_call: int):
    """Device data (the batches concatenated) and per call (indices (k, B), valid (k,)), the
    last call padded with invalid steps, as `train.fit` makes them."""
    data = steps.device_data(
        np.concatenate([b["image"] for b in batches]),
        np.concatenate([b["label"] for b in batches]),
        mesh,
    )
    b = len(batches[0]["label"])
    order = np.arange(len(batches) * b, dtype=np.int32).reshape(len(batches), b)
    padding = -len(batches) % steps_per_call
    order = np.concatenate([order, np.zeros((padding, b), np.int32)])
    valid = np.arange(len(order)) < len(batches)
    sharding = NamedSharding(mesh, P(None, steps.AXIS))
    calls = [
        (jax.device_put(order[s : s + steps_per_call], sharding), valid[s : s + steps_per_call])
        for s in range(0, len(order), steps_per_call)
    ]
    return data, calls


# Every option beyond the reference recipe, on (steps.make_train_step's keyword arguments).
MODERN = dict(
    loss=LossOptions(label_smoothing=0.1, tet_weight=0.5, kd_per_step=True),
    augment=augment.AugmentOptions(crop_padding=1, cutout=3, auto_augment=True),
    ema_decay=0.9,
)


def _run_steps(mesh, student, teacher, num_steps: int = 3, steps_per_call: int = 1, **step_kw):
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
    step = steps.make_train_step(student, tx, INFO, teacher=teacher, **step_kw)
    train_fn = _compile_loop(mesh, step)
    variables = init_variables(student, INFO, 0)
    ema = bool(step_kw.get("ema_decay"))
    state = steps.replicate(steps.create_train_state(variables, tx, 7, ema=ema), mesh)
    teacher_vars = steps.replicate(init_variables(teacher, INFO, 1), mesh)
    data, calls = _calls(mesh, _batches(num_steps, 8), steps_per_call)
    losses = []
    for indices, valid in calls:
        state, metrics = train_fn(state, data, indices, valid, teacher_vars)
        losses.extend(np.asarray(metrics["loss"])[valid].tolist())
    return jax.device_get(state), losses


def _four_equal_one(student, teacher, **kw):
    """Runs the steps on 1 device and on all 4; asserts equal losses, parameters and BN
    statistics (and the EMA when kept); returns the 1-device (state, losses)."""
    one, losses_one = _run_steps(steps.create_mesh(jax.devices()[:1]), student, teacher, **kw)
    four, losses_four = _run_steps(steps.create_mesh(), student, teacher, **kw)
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    for field in ("params", "batch_stats", "ema"):
        chex.assert_trees_all_close(getattr(four, field), getattr(one, field), atol=1e-5, rtol=1e-4)
    return one, losses_one


@pytest.mark.slow
def test_four_devices_equal_one_device():
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    student, teacher = _models()
    one, losses_one = _four_equal_one(student, teacher)
    assert len(losses_one) == 3
    # The step really trained: parameters moved away from the initialization.
    init = init_variables(student, INFO, 0)["params"]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, init)
    assert max(jax.tree.leaves(moved)) > 1e-3


@pytest.mark.slow
def test_four_devices_equal_one_device_with_the_modern_options():
    """Label smoothing, TET, per-step KD, AutoAugment, Cutout and EMA on: still N == 1 (the
    augmentations are keyed per global example), EMA included; and the options change the
    training (the losses differ from the reference recipe's)."""
    student, teacher = _models()
    _, losses_one = _four_equal_one(student, teacher, **MODERN)
    _, reference = _run_steps(steps.create_mesh(jax.devices()[:1]), student, teacher)
    assert abs(losses_one[0] - reference[0]) > 1e-3


def test_ema_follows_the_recurrence():
    """After each of 3 steps, ema = d * ema + (1 - d) * weights with d = min(0.9, (1 + s) /
    (10 + s)), s = 0, 1, 2 (0.1, 0.18..., 0.25), from ema = the initial weights."""
    student, teacher = _models()
    mesh = steps.create_mesh(jax.devices()[:1])
    tx = optax.sgd(0.05)
    variables = init_variables(student, INFO, 0)
    state = steps.replicate(steps.create_train_state(variables, tx, 7, ema=True), mesh)
    train_fn = _compile_loop(mesh, steps.make_train_step(student, tx, INFO, ema_decay=0.9))
    data, calls = _calls(mesh, _batches(3, 8), steps_per_call=1)
    want = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
    for s, (indices, valid) in enumerate(calls):
        state, _ = train_fn(state, data, indices, valid, {})
        d = min(0.9, (1 + s) / (10 + s))
        now = jax.device_get({"params": state.params, "batch_stats": state.batch_stats})
        want = jax.tree.map(
            lambda e, x, d=d: d * np.float64(e) + (1 - d) * np.float64(x), want, now
        )
    chex.assert_trees_all_close(jax.device_get(state.ema), want, atol=1e-6, rtol=1e-5)


@pytest.mark.slow
def test_steps_per_call_gives_the_same_training():
    """3 steps as one dispatch of 2 + a padded one (k=2) equal 3 dispatches of 1: the same
    losses and parameters, and the padding step leaves the state (step count) alone."""
    student, teacher = _models()
    mesh = steps.create_mesh()
    one, losses_one = _run_steps(mesh, student, teacher, steps_per_call=1)
    two, losses_two = _run_steps(mesh, student, teacher, steps_per_call=2)
    assert int(two.step) == 3
    np.testing.assert_allclose(losses_two, losses_one, rtol=1e-6)
    chex.assert_trees_all_close(two.params, one.params, atol=1e-6, rtol=1e-5)
    chex.assert_trees_all_close(two.opt_state, one.opt_state, atol=1e-6, rtol=1e-5)


def test_train_step_traces_once():
    student, teacher = _models()
    tx = optax.sgd(0.01)
    step = chex.assert_max_traces(steps.make_train_step(student, tx, INFO, teacher=teacher), n=1)
    mesh = steps.create_mesh()
    train_fn = _compile_loop(mesh, step)
    state = steps.replicate(steps.create_train_state(init_variables(student, INFO, 0), tx, 0), mesh)
    teacher_vars = steps.replicate(init_variables(teacher, INFO, 1), mesh)
    data, calls = _calls(mesh, _batches(3, 8), steps_per_call=1)
    for indices, valid in calls:
        state, _ = train_fn(state, data, indices, valid, teacher_vars)
    assert int(state.step) == 3


def _one_step(student, teacher, *, kd_alpha=0.3, kd_tau=4.0):
    """One distillation step on one device: (state before, batch, teacher variables, metrics)."""
    mesh = steps.create_mesh(jax.devices()[:1])
    tx = optax.sgd(0.05)
    state = steps.create_train_state(init_variables(student, INFO, 0), tx, 7)
    teacher_vars = init_variables(teacher, INFO, 1)
    batch = _batches(1, 8, seed=3)[0]
    step = steps.make_train_step(
        student, tx, INFO, teacher=teacher, loss=LossOptions(kd_alpha=kd_alpha, kd_tau=kd_tau)
    )
    train_fn = _compile_loop(mesh, step)
    before = jax.device_get(state)
    data, [(indices, valid)] = _calls(mesh, [batch], steps_per_call=1)
    _, metrics = train_fn(
        steps.replicate(state, mesh), data, indices, valid, steps.replicate(teacher_vars, mesh)
    )
    return before, batch, teacher_vars, jax.tree.map(lambda m: m[0], jax.device_get(metrics))


@pytest.mark.slow
def test_distillation_step_reports_the_idsnn_loss():
    """The step's loss equals idsnn_loss(student train-mode logits, teacher eval-mode logits)
    computed outside the step on the same augmented images, and differs from plain CE."""
    student, teacher = _models()
    state, batch, teacher_vars, metrics = _one_step(student, teacher, kd_alpha=0.3, kd_tau=4.0)
    images = augment.preprocess(
        jax.random.fold_in(state.rng, state.step), batch["image"], INFO, train=True
    )
    # The same models without the mapped BatchNorm axis, applied outside shard_map.
    student_1, teacher_1 = student.clone(bn_axis_name=None), teacher.clone(bn_axis_name=None)
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits, _ = student_1.apply(variables, images, train=True, mutable=["batch_stats"])
    teacher_logits = teacher_1.apply(teacher_vars, images, train=False)
    expected = idsnn_loss(logits, teacher_logits, batch["label"], 0.3, 4.0)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    ce = float(cross_entropy(logits, batch["label"]))
    assert abs(float(metrics["loss"]) - ce) > 1e-3  # the KD term is really there


@pytest.mark.slow
def test_modern_step_reports_the_objective():
    """With every option on, the step's loss equals `losses.objective` of the student's
    per-step train-mode logits and the teacher's eval-mode logits, computed outside the step on
    images augmented outside it by `preprocess` (crop, AutoAugment, Cutout) from the step's key."""
    student, teacher = _models()
    mesh = steps.create_mesh(jax.devices()[:1])
    tx = optax.sgd(0.05)
    variables = init_variables(student, INFO, 0)
    state = steps.create_train_state(variables, tx, 7, ema=True)
    teacher_vars = init_variables(teacher, INFO, 1)
    batch = _batches(1, 8, seed=3)[0]
    train_fn = _compile_loop(
        mesh, steps.make_train_step(student, tx, INFO, teacher=teacher, **MODERN)
    )
    data, [(indices, valid)] = _calls(mesh, [batch], steps_per_call=1)
    _, metrics = train_fn(
        steps.replicate(state, mesh), data, indices, valid, steps.replicate(teacher_vars, mesh)
    )
    key = jax.random.fold_in(state.rng, state.step)
    images = augment.preprocess(key, batch["image"], INFO, train=True, options=MODERN["augment"])
    student_1, teacher_1 = student.clone(bn_axis_name=None), teacher.clone(bn_axis_name=None)
    logits, _ = student_1.apply(
        variables, images, train=True, per_step=True, mutable=["batch_stats"]
    )
    teacher_logits = teacher_1.apply(teacher_vars, images, train=False)
    expected = objective(logits, batch["label"], MODERN["loss"], teacher_logits)
    assert float(metrics["loss"][0]) == pytest.approx(float(expected), rel=1e-5)
    plain = augment.preprocess(key, batch["image"], INFO, train=True)
    assert not np.allclose(images, plain)  # the augmentations really ran


def test_bfloat16_train_step_tracks_float32():
    """bfloat16 compute through the whole distillation step: finite, close to float32."""
    student, teacher = _models()
    losses = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        s, t = student.clone(dtype=dtype), teacher.clone(dtype=dtype)
        _, _, _, metrics = _one_step(s, t)
        losses[dtype] = float(metrics["loss"])
    assert np.isfinite(losses[jnp.bfloat16])
    assert losses[jnp.bfloat16] == pytest.approx(losses[jnp.float32], rel=5e-2)


@pytest.mark.slow
def test_eval_step_counts_operations_over_devices():
    """With count_ops, the sharded eval step's SOP and MAC sums equal `energy.counted_apply`
    on the whole batch (padding masked), and the totals are the per-layer sums."""
    student, _ = _models()
    variables = init_variables(student, INFO, 0)
    batch = _batches(1, 8, seed=5)[0] | {"mask": np.array([1] * 6 + [0] * 2, np.float32)}
    mesh = steps.create_mesh()
    eval_fn = steps.compile_eval_step(mesh, steps.make_eval_step(student, INFO, count_ops=True))
    state = steps.replicate(steps.create_train_state(variables, optax.sgd(0.1), 0), mesh)
    sums = jax.device_get(eval_fn(state, steps.shard_batch(batch, mesh)))
    images = input_pipeline.normalize(jnp.asarray(batch["image"][:6]), INFO)
    _, counts = energy.counted_apply(student.clone(bn_axis_name=None), variables, images)
    for key in ("sops/stage1/block0/conv1", "macs/stem/conv", "macs/head"):
        assert sums[key] == pytest.approx(float(np.sum(counts[key])), rel=1e-6)
    assert sums["sops"] == pytest.approx(
        sum(float(np.sum(v)) for k, v in counts.items() if k.startswith("sops/")), rel=1e-6
    )
    assert sums["sops"] > 0 and sums["count"] == 6


def test_sltt_step_four_devices_equal_one_device():
    """`gradient='sltt'` with k < T: every device draws the same time steps from the step's
    key, so 4 devices train as 1; and the step trains differently from BPTT."""
    student, teacher = _models()
    _, losses_one = _four_equal_one(student, teacher, gradient="sltt", sltt_k=1)
    bptt, losses_bptt = _run_steps(steps.create_mesh(jax.devices()[:1]), student, teacher)
    assert losses_bptt[0] == pytest.approx(losses_one[0], rel=1e-6)  # same first forward
    assert abs(losses_bptt[-1] - losses_one[-1]) > 1e-4
