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

from idsnn_jax import energy, input_pipeline, steps
from idsnn_jax.datasets import DatasetInfo
from idsnn_jax.losses import cross_entropy, idsnn_loss
from idsnn_jax.models import create_model

INFO = DatasetInfo("tiny", 5, (8, 8, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


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


def _run_steps(mesh, student, teacher, num_steps: int = 3, steps_per_call: int = 1):
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.05, momentum=0.9))
    train_fn = _compile_loop(mesh, steps.make_train_step(student, tx, INFO, teacher=teacher))
    state = steps.replicate(
        steps.create_train_state(steps.init_variables(student, INFO, 0), tx, 7), mesh
    )
    teacher_vars = steps.replicate(steps.init_variables(teacher, INFO, 1), mesh)
    data, calls = _calls(mesh, _batches(num_steps, 8), steps_per_call)
    losses = []
    for indices, valid in calls:
        state, metrics = train_fn(state, data, indices, valid, teacher_vars)
        losses.extend(np.asarray(metrics["loss"])[valid].tolist())
    return jax.device_get(state), losses


def test_four_devices_equal_one_device():
    assert jax.device_count() == 4, "conftest sets 4 fake CPU devices"
    student, teacher = _models()
    one, losses_one = _run_steps(steps.create_mesh(jax.devices()[:1]), student, teacher)
    four, losses_four = _run_steps(steps.create_mesh(), student, teacher)
    assert len(losses_one) == 3
    np.testing.assert_allclose(losses_four, losses_one, rtol=1e-5)
    chex.assert_trees_all_close(four.params, one.params, atol=1e-5, rtol=1e-4)
    chex.assert_trees_all_close(four.batch_stats, one.batch_stats, atol=1e-5, rtol=1e-4)
    # The step really trained: parameters moved away from the initialization.
    init = steps.init_variables(student, INFO, 0)["params"]
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), one.params, init)
    assert max(jax.tree.leaves(moved)) > 1e-3


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
    state = steps.replicate(
        steps.create_train_state(steps.init_variables(student, INFO, 0), tx, 0), mesh
    )
    teacher_vars = steps.replicate(steps.init_variables(teacher, INFO, 1), mesh)
    data, calls = _calls(mesh, _batches(3, 8), steps_per_call=1)
    for indices, valid in calls:
        state, _ = train_fn(state, data, indices, valid, teacher_vars)
    assert int(state.step) == 3


def test_sgd_matches_pytorch_semantics():
    """Weight decay added to the gradient before momentum; lr x gamma at milestones."""
    opt = steps.OptimizerOptions(
        learning_rate=0.1, momentum=0.9, weight_decay=0.01, lr_milestones=(1, 2), lr_gamma=0.5
    )
    steps_per_epoch = 2
    tx, schedule = steps.create_optimizer(opt, steps_per_epoch, num_epochs=3)
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
    opt = steps.OptimizerOptions(lr_milestones=milestones, lr_interval=interval)
    assert opt.milestones(120 if interval == 20 else (200 if 60 in milestones else 5)) == expected


def _one_step(student, teacher, *, kd_alpha=0.3, kd_tau=4.0):
    """One distillation step on one device: (state before, batch, teacher variables, metrics)."""
    mesh = steps.create_mesh(jax.devices()[:1])
    tx = optax.sgd(0.05)
    state = steps.create_train_state(steps.init_variables(student, INFO, 0), tx, 7)
    teacher_vars = steps.init_variables(teacher, INFO, 1)
    batch = _batches(1, 8, seed=3)[0]
    step = steps.make_train_step(
        student, tx, INFO, teacher=teacher, kd_alpha=kd_alpha, kd_tau=kd_tau
    )
    train_fn = _compile_loop(mesh, step)
    before = jax.device_get(state)
    data, [(indices, valid)] = _calls(mesh, [batch], steps_per_call=1)
    _, metrics = train_fn(
        steps.replicate(state, mesh), data, indices, valid, steps.replicate(teacher_vars, mesh)
    )
    return before, batch, teacher_vars, jax.tree.map(lambda m: m[0], jax.device_get(metrics))


def test_distillation_step_reports_the_idsnn_loss():
    """The step's loss equals idsnn_loss(student train-mode logits, teacher eval-mode logits)
    computed outside the step on the same augmented images, and differs from plain CE."""
    student, teacher = _models()
    state, batch, teacher_vars, metrics = _one_step(student, teacher, kd_alpha=0.3, kd_tau=4.0)
    images = input_pipeline.preprocess(
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


def test_lr_interval_steps_the_rate_inside_training():
    """With lr_interval=1 and 2 steps per epoch, plain SGD moves a parameter by lr * grad
    with lr 0.1, 0.1, 0.01, 0.01, 0.001, 0.001 over six steps."""
    opt = steps.OptimizerOptions(
        learning_rate=0.1, momentum=0.0, weight_decay=0.0, lr_interval=1, lr_gamma=0.1
    )
    tx, _ = steps.create_optimizer(opt, steps_per_epoch=2, num_epochs=3)
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
    ],
)
def test_optimizer_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        steps.OptimizerOptions(**{field: value})


def test_eval_step_counts_operations_over_devices():
    """With count_ops, the sharded eval step's SOP and MAC sums equal `energy.counted_apply`
    on the whole batch (padding masked), and the totals are the per-layer sums."""
    student, _ = _models()
    variables = steps.init_variables(student, INFO, 0)
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
