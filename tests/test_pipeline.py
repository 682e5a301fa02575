"""The whole pipeline on tiny real-format data: stages, files, teacher reuse across device
counts, the seams between stages (the student's start, the teacher it learns from, resume of
distillation), config errors before any work, and the CLI. The test process has 4 CPU
devices (conftest), so all of this runs data-parallel."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import chex
import jax
import numpy as np
import optax
import pytest

from idsnn_jax import checkpoints, epochs, pipeline, resume, steps, train
from idsnn_jax.configs import tiny
from idsnn_jax.datasets import dataset_info
from idsnn_jax.logs import MetricLogger
from idsnn_jax.models import create_model, init_variables
from idsnn_jax.plan import build_plan
from idsnn_jax.transfer import init_snn_from_ann

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(dataset: str, data_dir, **overrides):
    """`configs/tiny.py` on `dataset` in `data_dir`, with dotted-key overrides."""
    config = tiny.get_config()
    config.dataset = dataset
    config.data_dir = None if data_dir is None else str(data_dir)
    config.max_train_examples = None
    config.max_test_examples = None
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


def test_pipeline_on_cifar_archive_then_rerun_skips(data_cifar10_dir, tmp_path, log_lines):
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
        assert os.listdir(workdir / stage) == ["1"]
        assert os.listdir(workdir / "tensorboard" / stage)
    assert json.loads((workdir / "summary.json").read_text()) == summary
    report = (workdir / "student_transfer_report.txt").read_text()
    assert report.startswith("transfer: ") and "params/stem/conv/kernel" in report
    assert summary["student_best_accuracy"] == records[1]["test_accuracy"]
    # Evaluation counted operations (config.energy): per-layer counts sum to the totals, and
    # the energy is the 45 nm formula; the ANN teacher has MACs only.
    student = records[1]
    layers = sum(v for k, v in student.items() if k.startswith("sops/"))
    assert student["test_sops"] == pytest.approx(layers, rel=1e-6) and layers > 0
    expected = (4.6 * student["test_macs"] + 0.9 * student["test_sops"]) * 1e-6
    assert summary["student_energy_uj"] == pytest.approx(expected)
    assert records[0]["test_sops"] == 0 and records[0]["test_macs"] > student["test_macs"]

    assert (workdir / "curves.png").stat().st_size and (workdir / "firing_rates.png").stat().st_size

    (workdir / "student_transfer_report.txt").unlink()
    log_lines.clear()
    again = pipeline.run(config, str(workdir))  # both stages finished: nothing retrains
    assert len(_records(workdir)) == 2
    assert again["student_best_accuracy"] == summary["student_best_accuracy"]
    assert again["teacher_best_accuracy"] == summary["teacher_best_accuracy"]
    best = 100 * summary["student_best_accuracy"]
    assert f"[student] finished earlier (best {best:.2f}% at epoch 1 of 1), skipping" in log_lines
    assert not any("initialized from the teacher" in line for line in log_lines)
    assert not (workdir / "student_transfer_report.txt").exists()  # no transfer redone


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
        ("max_train_examples", 4),  # longer than one batch
        ("teacher.max_train_examples", 4),
        ("student.max_train_examples", 0),
        ("dtype", "float16"),
        ("checkpoint_every_epochs", 0),
        ("teacher.num_epochs", 0),
        ("student.num_epochs", 0),
        ("student.neuron.surrogate", "nope"),
        ("student.neuron.surrogate_width", -0.5),
        ("student.neuron.v_th", 0.0),
        ("student.neuron.decay", 1.5),
        ("student.stem_padding", -1),
        ("optimizer.learning_rate", 0.0),
        ("optimizer.lr_interval", -2),
        ("augment.crop_padding", -1),
        ("kd_alpha", -1.0),
        ("label_smoothing", 1.0),
        ("tet_weight", 1.5),
        ("ema_decay", -0.5),
        ("optimizer.schedule", "linear"),
        ("optimizer.warmup_epochs", -1),
        ("augment.cutout", -2),
    ],
)
def test_invalid_config_names_the_key(key, value, tmp_path):
    config = tiny_config("cifar10", tmp_path / "no_data_here")
    _set(config, key, value)
    # Validation comes before any work (before the teacher trains): the missing data would
    # otherwise raise first.
    with pytest.raises(ValueError, match=f"config.{key}="):
        pipeline.run(config, str(tmp_path / "wd"))
    assert not (tmp_path / "wd").exists()


def test_memory_options_reach_the_student(tmp_path):
    """`student.remat` / `student.pack_spikes` build the memory-saving student (the option
    itself is tested against the default's gradients in test_models)."""
    config = tiny_config("cifar10", tmp_path, **{"student.remat": True})
    config.student.pack_spikes = True
    student = build_plan(config).models["student"]
    assert student.remat and student.spike_conv is not None and student.block_call is not None
    default = build_plan(tiny_config("cifar10", tmp_path)).models["student"]
    assert not default.remat and default.spike_conv is None and default.block_call is None


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(FileNotFoundError, match="looked at"):
        pipeline.run(tiny_config("cifar10", tmp_path), str(tmp_path / "wd"))


def _cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m idsnn_jax.main --config=configs/tiny.py ARGS` on ONE CPU device."""
    cmd = [sys.executable, "-m", "idsnn_jax.main", "--config=configs/tiny.py", *args]
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_rejects_unknown_keys(tmp_path):
    bad = _cli(f"--workdir={tmp_path}", "--config.student.time_step=2", timeout=120)
    assert bad.returncode != 0 and "time_step" in bad.stderr


def test_checkpoints_move_between_device_counts(data_fashion_mnist_dir, tmp_path):
    """A teacher saved on 4 devices distils a student on 1 (through the CLI), and that
    student, saved on 1 device, resumes on 4."""
    assert jax.device_count() == 4
    four = tmp_path / "four"
    pipeline.run(tiny_config("fashion_mnist", data_fashion_mnist_dir), str(four))

    one = tmp_path / "one"
    reuse = [
        f"--config.data_dir={data_fashion_mnist_dir}",
        f"--config.teacher.checkpoint={four}/teacher",
    ]
    out = _cli(f"--workdir={one}", *reuse)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "summary:" in out.stdout and "1 device(s)" in out.stdout
    assert [r["stage"] for r in _records(one)] == ["student"]

    config = tiny_config(  # the CLI's config (configs/tiny.py), one more student epoch
        "fashion_mnist",
        data_fashion_mnist_dir,
        max_train_examples=64,
        max_test_examples=32,
        **{"teacher.checkpoint": str(four / "teacher"), "student.num_epochs": 2},
    )
    summary = pipeline.run(config, str(one))
    assert [(r["stage"], r["epoch"]) for r in _records(one)] == [("student", 1), ("student", 2)]
    assert summary["student_epochs"] == 2


def test_student_starts_from_the_best_teacher_epoch(data_fashion_mnist_dir, tmp_path, monkeypatch):
    """The student's step-0 variables are init_snn_from_ann(teacher of its best epoch, fresh
    student), and it distils from that same epoch: not the last one. The teacher's test
    accuracies are scripted (0.3, 0.7, 0.5), so its best epoch is 2 of 3."""
    scripted = iter([0.3, 0.7, 0.5])
    real_evaluate, real_fit = epochs.evaluate, train.fit
    fits = {}

    def evaluate(*args, **kwargs):
        out = real_evaluate(*args, **kwargs)
        return out | {"accuracy": next(scripted, out["accuracy"])}

    def fit(ctx, *, stage, **kwargs):
        fits[stage] = kwargs
        return real_fit(ctx, stage=stage, **kwargs)

    monkeypatch.setattr(epochs, "evaluate", evaluate)
    monkeypatch.setattr(train, "fit", fit)
    config = tiny_config(
        "fashion_mnist", data_fashion_mnist_dir, **{"teacher.num_epochs": 3, "checkpoint_keep": 1}
    )
    summary = pipeline.run(config, str(tmp_path))
    teacher_records = [r for r in _records(tmp_path) if r["stage"] == "teacher"]
    assert [r["test_accuracy"] for r in teacher_records] == [0.3, 0.7, 0.5]
    assert summary["teacher_best_accuracy"] == 0.7

    best = checkpoints.load_variables(str(tmp_path / "teacher" / "2"))
    last = checkpoints.load_variables(str(tmp_path / "teacher" / "3"))
    student_model = fits["student"]["model"]
    fresh = init_variables(student_model, dataset_info(config.dataset), config.seed + 1)
    expected = init_snn_from_ann(best, fresh)
    chex.assert_trees_all_equal(
        jax.device_get(fits["student"]["variables"]), jax.device_get(expected)
    )
    teacher_used = fits["student"]["teacher"][1]
    chex.assert_trees_all_equal(teacher_used, best)
    with pytest.raises(AssertionError):  # the test can tell the best epoch from the last
        chex.assert_trees_all_equal(teacher_used, last)


def test_distillation_resumes_exactly(data_fashion_mnist_dir, tmp_path, monkeypatch):
    """A crash while the student's epoch 2 is recorded, then the same call again, ends with
    the student variables and records of an uninterrupted run. The teacher stages of the two
    workdirs are two separate trainings with the same seed, so their equal records are also
    the run-to-run determinism check (CPU; see the README for GPUs)."""
    config = tiny_config("fashion_mnist", data_fashion_mnist_dir, **{"student.num_epochs": 2})
    pipeline.run(config, str(tmp_path / "straight"))

    class CrashAtStudentEpoch2(MetricLogger):
        def write(self, stage, epoch, metrics):
            if (stage, epoch) == ("student", 2):
                raise KeyboardInterrupt("simulated crash")
            super().write(stage, epoch, metrics)

    monkeypatch.setattr(pipeline, "MetricLogger", CrashAtStudentEpoch2)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config, str(tmp_path / "resumed"))
    monkeypatch.setattr(pipeline, "MetricLogger", MetricLogger)
    pipeline.run(config, str(tmp_path / "resumed"))

    runs = [_records(tmp_path / name) for name in ("straight", "resumed")]
    assert [[r["stage"] for r in run] for run in runs] == [["teacher", "student", "student"]] * 2
    assert _untimed(runs[0]) == _untimed(runs[1])
    chex.assert_trees_all_equal(
        checkpoints.load_variables(str(tmp_path / "straight" / "student" / "2")),
        checkpoints.load_variables(str(tmp_path / "resumed" / "student" / "2")),
    )

    # The finished run, rerun with another seed: refused before any work, nothing touched.
    before = _snapshot(tmp_path / "straight")
    config.seed = 1
    with pytest.raises(ValueError, match=r"refusing to resume it: seed: 0 -> 1\. Use a new"):
        pipeline.run(config, str(tmp_path / "straight"))
    assert _snapshot(tmp_path / "straight") == before


TIMING = {"images_per_sec", "epoch_seconds", "time"}


def _untimed(records: list[dict]) -> list[dict]:
    """`records` without their timing fields: what two runs of one config must share."""
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


# --- Bad input: named before any work, no checkpoint touched --------------------------------------


def _snapshot(directory) -> dict[str, tuple[bytes, int]]:
    """Every file under `directory`: its bytes and modification time."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = (f.read(), os.stat(path).st_mtime_ns)
    return out


def _started_workdir(path, config, stages=("teacher",)) -> None:
    """A workdir as a run of `config` leaves it: `config.json` and a saved epoch per stage
    (placeholder files: every check here fails before a checkpoint would be read)."""
    for stage in stages:
        os.makedirs(path / stage / "1" / "state")
        (path / stage / "1" / "state" / "manifest.ocdbt").write_bytes(b"\x00" * 8)
    (path / resume.CONFIG_FILE).write_text(json.dumps(resume.config_record(config)))


def test_workdir_of_another_config_is_refused(tmp_path):
    old = tiny_config("cifar10", tmp_path / "no_data")
    workdir = tmp_path / "wd"
    _started_workdir(workdir, old)
    record = json.loads((workdir / resume.CONFIG_FILE).read_text())
    record["retired_key"] = 3  # a key only the old run had
    (workdir / resume.CONFIG_FILE).write_text(json.dumps(record))
    before = _snapshot(workdir)

    new = tiny_config("cifar10", tmp_path / "no_data", seed=2, **{"student.neuron.v_th": 0.4})
    new.optimizer.lr_milestones = (60, 90)
    with pytest.raises(ValueError) as err:
        pipeline.run(new, str(workdir))
    message = str(err.value)
    assert message.startswith(f"{workdir} holds a run of another config")
    for diff in (
        "optimizer.lr_milestones: [2] -> [60, 90]",
        "retired_key: 3 -> '<absent>'",
        "seed: 0 -> 2",
        "student.neuron.v_th: 0.5 -> 0.4",
    ):
        assert diff in message, (diff, message)
    assert "\n" not in message and _snapshot(workdir) == before

    # What a resume may change: logging, checkpoint keeping, evaluation batching, the data's
    # place, the baseline stage, and more epochs (the schedule of the trained ones is kept).
    extended = tiny_config(
        "cifar10",
        tmp_path / "moved_data",
        log_every_steps=7,
        checkpoint_keep=5,
        checkpoint_every_epochs=3,
        eval_batch_size=32,
        compare_baseline=True,
        **{"student.num_epochs": 4, "teacher.num_epochs": 3},
    )
    record.pop("retired_key")
    (workdir / resume.CONFIG_FILE).write_text(json.dumps(record))
    resume.check_workdir(extended, str(workdir))
    # ... but the teacher not once a student has started from it, and no epochs are removed.
    _started_workdir(tmp_path / "wd2", old, stages=("teacher", "student"))
    with pytest.raises(ValueError, match=r"teacher\.num_epochs: 1 -> 3\. Use"):
        resume.check_workdir(extended, str(tmp_path / "wd2"))
    longer = tiny_config("cifar10", tmp_path / "no_data", **{"student.num_epochs": 2})
    resume.check_workdir(longer, str(tmp_path / "wd2"))
    (tmp_path / "wd2" / resume.CONFIG_FILE).write_text(json.dumps(resume.config_record(longer)))
    with pytest.raises(ValueError, match=r"student\.num_epochs: 2 -> 1\. Use"):
        resume.check_workdir(old, str(tmp_path / "wd2"))
    # Nothing to resume (no saved epoch): any config may start there.
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / resume.CONFIG_FILE).write_text(json.dumps(record))
    resume.check_workdir(new, str(tmp_path / "fresh"))


@pytest.mark.parametrize(
    "damage, bad_file",
    [
        (lambda d: (d / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01"), "t10k-labels"),
        (lambda d: (d / "train-images-idx3-ubyte").unlink(), None),  # no train images at all
    ],
    ids=["truncated_labels", "missing_file"],
)
def test_bad_data_fails_before_work(data_fashion_mnist_dir, tmp_path, damage, bad_file):
    config = tiny_config("fashion_mnist", data_fashion_mnist_dir)
    workdir = tmp_path / "wd"
    _started_workdir(workdir, config, stages=("teacher", "student"))
    before = _snapshot(workdir)
    damage(data_fashion_mnist_dir)
    error = ValueError if bad_file else FileNotFoundError
    with pytest.raises(error) as err:
        pipeline.run(config, str(workdir))
    expected = os.path.join(data_fashion_mnist_dir, bad_file) if bad_file else "No fashion_mnist"
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    assert _snapshot(workdir) == before


def _save_model(directory, name: str, width: float, dataset: str, **kwargs) -> None:
    """One saved epoch of `name` (zeros: only shapes matter) in the stage `directory`."""
    info = dataset_info(dataset)
    model = create_model(name, num_classes=info.num_classes, width=width, **kwargs)
    shapes = jax.eval_shape(lambda: init_variables(model, info, 0))
    variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
    ckpt = checkpoints.StageCheckpoints(str(directory))
    ckpt.save(1, steps.create_train_state(variables, optax.sgd(0.1), 0), {"history": []}, 0.5)
    ckpt.close()


@pytest.mark.parametrize(
    "saved, message",
    [
        (  # another architecture: a deeper teacher has paths the model lacks
            ("teacher", "resnet34", 0.0625, "cifar10"),
            r"params/stage1/block2/bn1/bias is \(4,\) float32 in the checkpoint but missing in "
            r"the model \(79 more paths differ\)",
        ),
        (  # another width
            ("teacher", "resnet18", 0.125, "cifar10"),
            r"params/head/kernel is \(64, 10\) float32 in the checkpoint but \(32, 10\) float32",
        ),
        (  # another class count
            ("teacher", "resnet18", 0.0625, "cifar100"),
            r"params/head/bias is \(100,\) float32 in the checkpoint but \(10,\) float32 in the "
            r"model \(1 more path differs\)",
        ),
        (  # a spiking student's stage: ANN shapes, but its run's config.json says what it is
            ("student", "spiking_resnet18", 0.0625, "cifar10"),
            r"is the student stage of a run of student.model='spiking_resnet18', "
            r"student.width=0.0625 \(.*config.json\), but config.teacher.model='resnet18'",
        ),
    ],
    ids=["architecture", "width", "classes", "spiking_stage"],
)
def test_teacher_checkpoint_of_another_model_names_the_path(tmp_path, saved, message):
    stage, *model = saved
    run = tmp_path / "teacher_run"
    _save_model(run / stage, *model, **({"time_steps": 2} if stage == "student" else {}))
    config = tiny_config(
        "cifar10", tmp_path / "no_data", **{"teacher.checkpoint": str(run / stage)}
    )
    if stage == "student":
        written = tiny_config("cifar10", None)
        (run / resume.CONFIG_FILE).write_text(json.dumps(resume.config_record(written)))
    before = _snapshot(run)
    with pytest.raises(ValueError, match=message) as err:
        pipeline.run(config, str(tmp_path / "wd"))  # before the (missing) data is read
    assert str(err.value).startswith(f"config.teacher.checkpoint='{run / stage}'")
    assert "\n" not in str(err.value) and _snapshot(run) == before


def test_cli_bad_input_is_one_line_and_touches_no_checkpoint(data_fashion_mnist_dir, tmp_path):
    """The CLI on a truncated data file, in a workdir holding a run of the same config: exit
    status 1, one line naming the file, every file of the workdir as it was."""
    workdir = tmp_path / "wd"
    _started_workdir(workdir, tiny.get_config(), stages=("teacher", "student"))
    before = _snapshot(workdir)
    bad = data_fashion_mnist_dir / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-28])
    out = _cli(f"--workdir={workdir}", f"--config.data_dir={data_fashion_mnist_dir}", timeout=300)
    assert out.returncode == 1, out.stderr[-3000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith(f"error: {bad}: ") and "truncated" in lines[-1], out.stderr
    assert "Traceback" not in out.stderr
    assert _snapshot(workdir) == before
