"""The whole pipeline on tiny real-format data: stages, files, resume, teacher reuse, config
errors, and the CLI. The test process has 4 CPU devices (conftest), so all of this runs
data-parallel."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import default
from idsnn_jax import input_pipeline, pipeline, train
from idsnn_jax.logs import MetricLogger
from idsnn_jax.models import create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(dataset: str, data_dir, **overrides):
    config = default.get_config()
    config.dataset = dataset
    config.data_dir = None if data_dir is None else str(data_dir)
    config.batch_size = 8
    config.eval_batch_size = 8
    config.teacher.model = "resnet18"
    config.teacher.width = 0.0625
    config.teacher.num_epochs = 1
    config.student.width = 0.0625
    config.student.time_steps = 2
    config.student.num_epochs = 1
    config.log_every_steps = 2
    for key, value in overrides.items():
        _set(config, key, value)
    return config


def _set(config, dotted_key: str, value) -> None:
    *parents, leaf = dotted_key.split(".")
    for name in parents:
        config = config[name]
    config[leaf] = value


def _records(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_pipeline_on_cifar_archive_then_rerun_skips(data_cifar10_dir, tmp_path):
    workdir = tmp_path / "run"
    config = tiny_config("cifar10", data_cifar10_dir, max_test_examples=6)
    summary = pipeline.run(config, str(workdir))

    records = _records(workdir)
    assert [(r["stage"], r["epoch"]) for r in records] == [("teacher", 1), ("student", 1)]
    for r in records:
        for key in (
            "train_loss",
            "test_loss",
            "train_accuracy",
            "test_accuracy",
            "lr",
            "images_per_sec",
        ):
            assert math.isfinite(r[key]), key
        assert 0 <= r["test_accuracy"] <= 1
    # The test accuracy counts the 6 test examples exactly once: a multiple of 1/6.
    assert round(records[1]["test_accuracy"] * 6, 6) == round(records[1]["test_accuracy"] * 6)
    rates = {k: v for k, v in records[1].items() if k.startswith("firing_rate/")}
    assert "firing_rate/stem/act" in rates and all(0 <= v <= 1 for v in rates.values())
    assert not any(k.startswith("firing_rate/") for k in records[0])  # the ANN has no spikes
    for stage in ("teacher", "student"):
        assert os.listdir(workdir / stage / "last") and os.listdir(workdir / stage / "best")
        assert os.listdir(workdir / "tensorboard" / stage)
    assert json.loads((workdir / "summary.json").read_text()) == summary
    report = (workdir / "student_transfer_report.txt").read_text()
    assert report.startswith("transfer: ") and "params/stem/conv/kernel" in report
    assert summary["student_best_accuracy"] == records[1]["test_accuracy"]

    again = pipeline.run(config, str(workdir))  # both stages finished: nothing retrains
    assert len(_records(workdir)) == 2
    assert again["student_best_accuracy"] == summary["student_best_accuracy"]
    assert again["teacher_best_accuracy"] == summary["teacher_best_accuracy"]


def test_pipeline_on_tfds_mock_cifar10(tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny_config(
        "cifar10", None, max_train_examples=16, init_from_teacher=False, distill=False
    )
    with tfds.testing.mock_data(num_examples=16):
        summary = pipeline.run(config, str(tmp_path))
    assert "teacher_best_accuracy" not in summary  # the baseline needs no teacher
    assert not (tmp_path / "teacher").exists()
    assert 0 <= summary["student_best_accuracy"] <= 1


def test_pipeline_on_idx_with_teacher_reuse(data_fashion_mnist_dir, tmp_path):
    first = tmp_path / "first"
    config = tiny_config("fashion_mnist", data_fashion_mnist_dir, distill=False)
    pipeline.run(config, str(first))

    reuse = tiny_config(
        "fashion_mnist",
        data_fashion_mnist_dir,
        **{"teacher.checkpoint": str(first / "teacher"), "teacher.num_epochs": 0},
    )
    summary = pipeline.run(reuse, str(tmp_path / "second"))
    assert summary["teacher_best_accuracy"] is None  # loaded, not trained
    assert not (tmp_path / "second" / "teacher").exists()
    assert [r["stage"] for r in _records(tmp_path / "second")] == ["student"]

    wrong = tiny_config(
        "fashion_mnist",
        data_fashion_mnist_dir,
        **{"teacher.checkpoint": str(first / "teacher"), "teacher.width": 0.125},
    )
    with pytest.raises(ValueError, match="config.teacher.checkpoint"):
        pipeline.run(wrong, str(tmp_path / "third"))


def _fit(ctx, epochs: int):
    model = create_model("resnet18", num_classes=10, width=0.0625, bn_axis_name="batch")
    return train.fit(
        ctx,
        stage="teacher",
        model=model,
        mode="ann",
        num_epochs=epochs,
        variables=train.init_variables(model, ctx.info, 0),
    )


def test_resume_after_crash_equals_uninterrupted_run(data_fashion_mnist_dir, tmp_path):
    info = input_pipeline.dataset_info("fashion_mnist")
    splits = [
        input_pipeline.load_split("fashion_mnist", s, str(data_fashion_mnist_dir))
        for s in ("train", "test")
    ]
    config = tiny_config(
        "fashion_mnist", data_fashion_mnist_dir, **{"optimizer.lr_milestones": (1,)}
    )
    mesh = train.create_mesh()

    def ctx(workdir, writer_cls=MetricLogger):
        return train.RunContext(config, str(workdir), *splits, info, mesh, writer_cls(str(workdir)))

    straight = _fit(ctx(tmp_path / "straight"), 2)

    class CrashAtEpoch2(MetricLogger):
        def write(self, stage, epoch, metrics):
            if epoch == 2:
                raise KeyboardInterrupt("simulated crash before epoch 2 is saved")
            super().write(stage, epoch, metrics)

    with pytest.raises(KeyboardInterrupt):
        _fit(ctx(tmp_path / "resumed", CrashAtEpoch2), 2)
    assert sorted(os.listdir(tmp_path / "resumed" / "teacher" / "last")) == ["1"]
    resumed = _fit(ctx(tmp_path / "resumed"), 2)

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
    assert resumed.history[1]["lr"] == pytest.approx(0.005)  # x0.1 at the epoch-1 milestone


@pytest.mark.parametrize(
    "key, value",
    [
        ("dataset", "imagenet"),
        ("teacher.model", "vgg16"),
        ("teacher.model", "spiking_resnet18"),
        ("student.model", "resnet18"),
        ("batch_size", 6),  # not a multiple of the 4 devices
        ("eval_batch_size", 0),
        ("student.time_steps", 0),
        ("student.width", 0.0),
        ("teacher.checkpoint", "/no/such/teacher"),
        ("block_map", "middle"),
        ("kd_tau", 0.0),
        ("optimizer.lr_milestones", (120, 60)),
        ("optimizer.momentum", 1.5),
        ("max_train_examples", 4),  # fewer than one batch
        ("dtype", "float16"),
        ("checkpoint_every_epochs", 0),
    ],
)
def test_invalid_config_names_the_key(key, value, tmp_path):
    config = tiny_config("cifar10", tmp_path / "no_data_here")
    _set(config, key, value)
    # Validation comes before any work: the missing data would otherwise raise first.
    with pytest.raises(ValueError, match=f"config.{key}="):
        pipeline.run(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="Looked at"):
        pipeline.run(tiny_config("cifar10", tmp_path), str(tmp_path / "wd"))


def test_cli_runs_and_rejects_unknown_keys(data_fashion_mnist_dir, tmp_path):
    base = [
        sys.executable,
        "-m",
        "idsnn_jax.main",
        "--config=configs/fashion_mnist.py",
        f"--workdir={tmp_path}",
        f"--config.data_dir={data_fashion_mnist_dir}",
    ]
    env = {**os.environ, "XLA_FLAGS": ""}
    bad = subprocess.run(
        [*base, "--config.student.time_step=2"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode != 0 and "time_step" in bad.stderr
    tiny = [
        "--config.max_train_examples=16",
        "--config.batch_size=8",
        "--config.eval_batch_size=12",
        "--config.teacher.num_epochs=1",
        "--config.student.num_epochs=1",
        "--config.teacher.width=0.0625",
        "--config.student.width=0.0625",
        "--config.student.time_steps=2",
        "--config.compare_baseline=False",
    ]
    out = subprocess.run(
        [*base, *tiny], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "summary:" in out.stdout
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["student_best_accuracy"] <= 1
