"""The loop layer: exact resume after a crash, resumes refused when they would not be exact,
the best checkpoint on the run's own trajectory, and options that name their bad field."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from idsnn_jax import augment, epochs, optim, steps, train
from idsnn_jax.checkpoints import StageCheckpoints
from idsnn_jax.datasets import DatasetInfo, dataset_info, load_split
from idsnn_jax.logs import MetricLogger
from idsnn_jax.losses import LossOptions
from idsnn_jax.models import create_model, init_variables

INFO = DatasetInfo("tiny", 5, (8, 8, 3), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))


def _ctx(data_dir, workdir, writer_cls=MetricLogger) -> train.RunContext:
    splits = [load_split("fashion_mnist", s, str(data_dir)) for s in ("train", "test")]
    info = dataset_info("fashion_mnist")
    mesh = steps.create_mesh()
    return train.RunContext(str(workdir), *splits, info, mesh, writer_cls(str(workdir)))


def _fit(ctx, num_epochs: int, **options):
    model = create_model("resnet18", num_classes=10, width=0.0625, bn_axis_name="batch")
    opts = dict(batch_size=8, eval_batch_size=8, log_every_steps=2, num_epochs=num_epochs)
    return train.fit(
        ctx,
        stage="teacher",
        model=model,
        variables=init_variables(model, ctx.info, 0),
        options=train.FitOptions(**(opts | options)),
    )


def _crash_at(epoch_to_crash: int) -> type[MetricLogger]:
    class Crash(MetricLogger):
        def write(self, stage, epoch, metrics):
            if epoch == epoch_to_crash:
                raise KeyboardInterrupt(f"simulated crash before epoch {epoch} is saved")
            super().write(stage, epoch, metrics)

    return Crash


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# The options beyond the reference recipe (EMA in the state, keyed augmentations, schedule).
MODERN = dict(
    optimizer=optim.OptimizerOptions(lr_milestones=(1,), schedule="cosine", warmup_epochs=1),
    loss=LossOptions(label_smoothing=0.1, tet_weight=0.5),
    augment=augment.AugmentOptions(cutout=4, auto_augment=True),
    ema_decay=0.9,
)


@pytest.mark.slow
@pytest.mark.parametrize("modern", [False, True], ids=["reference", "modern"])
def test_resume_after_crash_equals_uninterrupted_run(data_fashion_mnist_dir, tmp_path, modern):
    options = MODERN if modern else {"optimizer": optim.OptimizerOptions(lr_milestones=(1,))}
    straight = _fit(_ctx(data_fashion_mnist_dir, tmp_path / "straight"), 2, **options)
    crashing = _ctx(data_fashion_mnist_dir, tmp_path / "resumed", _crash_at(2))
    with pytest.raises(KeyboardInterrupt):
        _fit(crashing, 2, **options)
    assert sorted(os.listdir(tmp_path / "resumed" / "teacher")) == ["1"]
    resumed = _fit(_ctx(data_fashion_mnist_dir, tmp_path / "resumed"), 2, **options)
    assert (resumed.state.ema is not None) == modern
    assert ("test_ema_accuracy" in resumed.history[-1]) == modern

    assert [r["epoch"] for r in _records(tmp_path / "resumed")] == [1, 2]
    timing = {"images_per_sec", "epoch_seconds"}
    for got, want in zip(resumed.history, straight.history, strict=True):
        assert {k: v for k, v in got.items() if k not in timing} == {
            k: v for k, v in want.items() if k not in timing
        }
    for a, b in zip(
        jax.tree.leaves(jax.device_get(resumed.state)),
        jax.tree.leaves(jax.device_get(straight.state)),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)
    lr = 0.05 if modern else 0.005  # cosine starts at the peak after warm-up; x0.1 at milestone
    assert resumed.history[1]["lr"] == pytest.approx(lr)


def test_ema_weights_are_evaluated_without_counting_operations(
    data_fashion_mnist_dir, tmp_path, monkeypatch
):
    """With energy and EMA on, each epoch counts the weights' operations once (the energy
    figures) and evaluates the EMA weights with the plain eval step, not counting again."""
    counted = []

    def spy(eval_fn, state, *args):
        out = evaluate(eval_fn, state, *args)
        counted.append("macs" in out)
        return out

    evaluate = epochs.evaluate
    monkeypatch.setattr(epochs, "evaluate", spy)
    ctx = _ctx(data_fashion_mnist_dir, tmp_path / "run")
    result = _fit(ctx, 1, energy="45nm_fp32", ema_decay=0.9)
    assert counted == [True, False]
    record = result.history[0]
    assert record["test_energy_uj"] > 0 and 0 <= record["test_ema_accuracy"] <= 1


@pytest.mark.slow
def test_best_checkpoint_lies_on_the_final_trajectory(
    data_fashion_mnist_dir, tmp_path, monkeypatch
):
    """checkpoint_every_epochs=2, a crash while epoch 4 is recorded (epoch 3 was the best so
    far), then a resume whose later epochs score differently: the best checkpoint must hold
    the best epoch of the final history, with that history, never an epoch of the run that
    crashed. Test accuracies are scripted so the trajectories differ on purpose."""
    scripted = iter([0.1, 0.2, 0.9, 0.5, 0.3, 0.25, 0.2, 0.2])
    real_evaluate = epochs.evaluate

    def evaluate(*args, **kwargs):
        return real_evaluate(*args, **kwargs) | {"accuracy": next(scripted)}

    monkeypatch.setattr(epochs, "evaluate", evaluate)
    every2 = dict(checkpoint_every_epochs=2, checkpoint_keep=1)
    with pytest.raises(KeyboardInterrupt):
        _fit(_ctx(data_fashion_mnist_dir, tmp_path, _crash_at(4)), 4, **every2)
    result = _fit(_ctx(data_fashion_mnist_dir, tmp_path), 4, **every2)

    accuracies = [r["test_accuracy"] for r in result.history]
    ckpt = StageCheckpoints(str(tmp_path / "teacher"))
    template = jax.device_get(result.state)
    _, meta = ckpt.restore_best(template)
    ckpt.close()
    assert meta["epoch"] == result.best_epoch == int(np.argmax(accuracies)) + 1
    assert meta["history"] == result.history[: meta["epoch"]]


def _fit_student(ctx, epochs: int, teacher_seed: int):
    """An ANN 'student' distilling from a ResNet18 teacher initialized with `teacher_seed`."""
    model = create_model("resnet18", num_classes=10, width=0.0625, bn_axis_name="batch")
    teacher = (model, jax.device_get(init_variables(model, ctx.info, teacher_seed)))
    return train.fit(
        ctx,
        stage="student",
        model=model,
        variables=init_variables(model, ctx.info, 0),
        options=train.FitOptions(num_epochs=epochs, batch_size=8, eval_batch_size=8),
        teacher=teacher,
    )


@pytest.mark.slow
def test_resume_refuses_what_would_not_be_exact(data_fashion_mnist_dir, tmp_path):
    """A stage resumes only with the inputs its checkpoints were trained with: more epochs
    under a cosine schedule (the rate of the trained steps would change) is refused, more
    under the step schedule is not; other data or another teacher (by content, not path) is
    refused, naming the stage and what to do."""
    cosine = {"optimizer": optim.OptimizerOptions(schedule="cosine")}
    ctx = _ctx(data_fashion_mnist_dir, tmp_path / "cosine")
    _fit(ctx, 1, **cosine)
    with pytest.raises(ValueError) as err:
        _fit(ctx, 2, **cosine)
    assert str(err.value) == (
        f"[teacher] ({tmp_path / 'cosine' / 'teacher'}) num_epochs 1 -> 2 changes the learning "
        "rate of the 6 steps already trained (schedule='cosine', warmup_epochs=0), so the run "
        "would not equal one configured for 2 epochs from the start: keep num_epochs=1, or "
        "use a new --workdir"
    )
    step = {"optimizer": optim.OptimizerOptions(lr_milestones=(1,))}
    ctx = _ctx(data_fashion_mnist_dir, tmp_path / "step")
    _fit(ctx, 1, **step)
    assert len(_fit(ctx, 2, **step).history) == 2

    ctx = dataclasses.replace(_ctx(data_fashion_mnist_dir, tmp_path / "kd"), data_fingerprint="a")
    _fit_student(ctx, 1, teacher_seed=1)
    with pytest.raises(ValueError, match=r"^\[student\] .* distilled from another teacher \("):
        _fit_student(ctx, 2, teacher_seed=2)
    with pytest.raises(ValueError, match=r"trained on other data \(fingerprint a -> b\)"):
        _fit_student(dataclasses.replace(ctx, data_fingerprint="b"), 2, teacher_seed=1)
    assert len(_fit_student(ctx, 2, teacher_seed=1).history) == 2


@pytest.mark.parametrize(
    "field, value",
    [
        ("num_epochs", 0),
        ("batch_size", 0),
        ("eval_batch_size", 2.5),
        ("ema_decay", 1.0),
        ("checkpoint_keep", 0),
        ("checkpoint_every_epochs", 0),
        ("log_every_steps", 0),
    ],
)
def test_fit_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        train.FitOptions(**({"num_epochs": 1} | {field: value}))
