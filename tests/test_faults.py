"""Faults: a run killed anywhere (SIGKILL), stopped by SIGTERM/SIGINT, or diverging, then
started again with the same command, ends with exactly the parameters and records of an
uninterrupted run; the stop is one line that says how to resume.

The kills are deterministic: `IDSNN_FAULT=<point>:<n>[:<signal>]` (`idsnn_jax.faults`) sends
the signal the n-th time the CLI reaches a named point. The CLI runs in subprocesses on one
CPU device (tiny config, 2 + 2 epochs of 3 steps, one step per dispatch) sharing a JAX
compilation cache, so only the reference run compiles. The divergence runs in process.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

from idsnn_jax import checkpoints, faults, optim, pipeline, resume
from idsnn_jax.configs import tiny
from idsnn_jax.logs import epochs_by_stage, read_records

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"time", "epoch_seconds", "images_per_sec"}
# 48 training images (the data fixture), batch 16: 3 dispatches per epoch; dispatch 11 is the
# second step of the student's epoch 2; save 2 is the teacher's epoch 2.
EPOCHS = ["--config.teacher.num_epochs=2", "--config.student.num_epochs=2"]


def _cli(workdir, data_dir, cache_dir, fault: str | None = None) -> subprocess.CompletedProcess:
    """The same command every time (the fault is in the environment): 2 + 2 epochs."""
    cmd = [sys.executable, "-m", "idsnn_jax.main", "--config=configs/tiny.py"]
    cmd += [f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.steps_per_call=1"]
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env |= {
        "XLA_FLAGS": "",  # one device
        "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    if fault:
        env[faults.ENV] = fault
    return subprocess.run(
        cmd + EPOCHS, cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def _untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING}


def _outcome(workdir) -> dict:
    """What two runs of one config must share: the records (each epoch once), the final
    student's variables (its best epoch, as `load_variables` picks it, and its last) and
    the summary without its wall time."""
    stages = epochs_by_stage(read_records(str(workdir)))
    summary = json.loads((workdir / "summary.json").read_text())
    summary.pop("wall_seconds")
    return {
        "records": {stage: [_untimed(r) for r in rs] for stage, rs in stages.items()},
        "summary": summary,
        "best": checkpoints.load_variables(str(workdir / "student")),
        "last": checkpoints.load_variables(str(workdir / "student" / "2")),
    }


@pytest.fixture(scope="module")
def shared(tmp_path_factory) -> dict:
    return {"cache": tmp_path_factory.mktemp("jax_cache")}


@pytest.fixture
def reference(shared, data_fashion_mnist_dir, tmp_path_factory) -> dict:
    """The uninterrupted run's outcome, computed once per module (the data fixture writes
    the same bytes for every test, and `data_dir` may move between runs)."""
    if "reference" not in shared:
        workdir = tmp_path_factory.mktemp("reference")
        out = _cli(workdir, data_fashion_mnist_dir, shared["cache"])
        assert out.returncode == 0, out.stderr[-3000:]
        shared["reference"] = _outcome(workdir)
    return shared["reference"]


def _saves(workdir) -> dict[str, dict[str, bool]]:
    """Stage -> {epoch (or 'partial', an epoch stopped midway): whether its checkpoint is
    complete (not orbax's temporary one)}."""
    tmp = ".orbax-checkpoint-tmp"
    saves = {}
    for stage in ("teacher", "student"):
        names = os.listdir(workdir / stage) if (workdir / stage).is_dir() else []
        saves[stage] = {name.removesuffix(tmp): not name.endswith(tmp) for name in names}
        if checkpoints.PARTIAL_DIR in names:
            kept = os.listdir(workdir / stage / checkpoints.PARTIAL_DIR)
            saves[stage]["partial"] = any(name.isdigit() for name in kept)
    return {stage: epochs for stage, epochs in saves.items() if epochs}


def _logged(workdir) -> list[tuple[str, int]]:
    return [(r["stage"], r["epoch"]) for r in read_records(str(workdir))]


KILL, TERM, INT = -signal.SIGKILL, 128 + signal.SIGTERM, 128 + signal.SIGINT
CASES = {
    # fault: (exit status, the stderr's last line (or None), saves started, epochs logged)
    # A SIGKILL'ed save may or may not have completed: its commit runs on a background thread.
    "train_call:11": (KILL, None, {"teacher": ["1", "2"], "student": ["1"]}, 3),
    # Killed at once after epoch 2's asynchronous save started (microseconds; its commit takes
    # far longer): the epoch is logged but not saved, so the rerun redoes it and logs it again.
    "save:2": (KILL, None, {"teacher": ["1", "2"]}, 2),
    "stage_end:1": (KILL, None, {"teacher": ["1", "2"]}, 2),
    "transfer:1": (KILL, None, {"teacher": ["1", "2"]}, 2),
    # Stopped after a dispatch: the state there is saved, and the rerun goes on from it.
    "train_call:11:TERM": (
        TERM,
        "interrupted by SIGTERM in stage student, epoch 2, step 2 of 3 (saved there): rerun "
        "the same command to resume from that step",
        {"teacher": ["1", "2"], "student": ["1", "partial"]},
        3,
    ),
    # Stopped while the save is written: the save finishes first.
    "save:2:INT": (
        INT,
        "interrupted by SIGINT in stage teacher, after epoch 2: rerun the same command to "
        "resume after epoch 2",
        {"teacher": ["1", "2"]},
        2,
    ),
    "transfer:1:TERM": (
        TERM,
        "interrupted by SIGTERM in stage student, after the transfer: rerun the same command "
        "to restart the stage",
        {"teacher": ["1", "2"]},
        2,
    ),
}


@pytest.mark.parametrize("fault", list(CASES))
def test_stopped_run_resumes_exactly(fault, reference, shared, data_fashion_mnist_dir, tmp_path):
    status, message, started, logged = CASES[fault]
    workdir = tmp_path / "run"
    stopped = _cli(workdir, data_fashion_mnist_dir, shared["cache"], fault)
    assert stopped.returncode == status, stopped.stderr[-3000:]
    saves = _saves(workdir)
    assert {stage: sorted(epochs) for stage, epochs in saves.items()} == started
    if message:  # stopped gently: every started save completed, one line says how to resume
        assert all(all(done.values()) for done in saves.values()), saves
        lines = [line for line in stopped.stderr.splitlines() if line.strip()]
        assert lines[-1] == message, stopped.stderr[-3000:]
        assert "Traceback" not in stopped.stderr
    if fault == "save:2":
        assert saves["teacher"] == {"1": True, "2": False}
    if fault == "transfer:1":
        assert (workdir / "student_transfer_report.txt").is_file()
    order = [(s, r["epoch"]) for s, rs in reference["records"].items() for r in rs]
    assert _logged(workdir) == order[:logged]

    resumed = _cli(workdir, data_fashion_mnist_dir, shared["cache"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = _outcome(workdir)
    assert got["records"] == reference["records"]
    assert got["summary"] == reference["summary"]
    for key in ("best", "last"):
        leaves = jax.tree_util.tree_leaves_with_path(got[key])
        for (path, a), b in zip(leaves, jax.tree.leaves(reference[key]), strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"{key} {jax.tree_util.keystr(path)}")
    # Each stage resumed after its newest complete checkpoint; an epoch logged before the
    # kill and redone was redone from the same state: both records are the reference's.
    complete = {
        s: max((int(e) for e, ok in d.items() if ok and e.isdigit()), default=0)
        for s, d in saves.items()
    }
    redone = sum(len(rs) - complete.get(s, 0) for s, rs in reference["records"].items())
    records = read_records(str(workdir))
    assert len(records) == logged + redone
    by_epoch = {(s, r["epoch"]): r for s, rs in reference["records"].items() for r in rs}
    assert all(_untimed(r) == by_epoch[(r["stage"], r["epoch"])] for r in records)
    assert all(all(done.values()) for done in _saves(workdir).values())  # stale ones removed


# --- Divergence -----------------------------------------------------------------------------------


def _exploding_after_epoch_1(real):
    """`optim.create_optimizer` whose rate is x1e30 from epoch 2 on while the configured
    learning rate is the tiny config's 0.05 (a schedule the config check would refuse)."""

    def create_optimizer(options, steps_per_epoch, num_epochs):
        if options.learning_rate == 0.05:
            options = copy.copy(options)  # frozen and validated: set past the checks
            object.__setattr__(options, "lr_milestones", (1,))
            object.__setattr__(options, "lr_gamma", 1e30)
        return real(options, steps_per_epoch, num_epochs)

    return create_optimizer


def _files(directory) -> dict[str, bytes]:
    return {
        str(f.relative_to(directory)): f.read_bytes() for f in directory.rglob("*") if f.is_file()
    }


def test_divergence_keeps_the_last_good_checkpoint(
    data_fashion_mnist_dir, tmp_path, monkeypatch, log_lines
):
    """A loss that turns non-finite in the teacher's epoch 2 stops the run naming stage,
    epoch and step, before epoch 2 is logged or saved; the rerun with a lower learning rate
    (allowed only because the run diverged) resumes from epoch 1's checkpoint."""
    monkeypatch.setattr(optim, "create_optimizer", _exploding_after_epoch_1(optim.create_optimizer))
    config = tiny.get_config()
    config.data_dir = str(data_fashion_mnist_dir)
    config.teacher.num_epochs = 2
    workdir = tmp_path / "run"
    with pytest.raises(FloatingPointError) as err:
        pipeline.run(config, str(workdir))
    message = str(err.value)
    assert message.startswith("[teacher] training loss is ") and "\n" not in message
    assert message.split(" at ", 1)[1].startswith("epoch 2, step "), message
    assert message.endswith("of the epoch; lower optimizer.learning_rate or check the data")
    assert _logged(workdir) == [("teacher", 1)]
    assert os.listdir(workdir / "teacher") == ["1"] and not (workdir / "student").exists()
    good = checkpoints.load_variables(str(workdir / "teacher" / "1"))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(good))
    assert (workdir / resume.DIVERGED_FILE).read_text() == message + "\n"
    kept = _files(workdir / "teacher" / "1")

    config.optimizer.learning_rate = 0.1  # only lowering it is a repair
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate: 0\.05 -> 0\.1\. Use"):
        pipeline.run(config, str(workdir))
    config.optimizer.learning_rate = 0.01
    log_lines.clear()
    summary = pipeline.run(config, str(workdir))
    assert "[teacher] resuming at epoch 2 of 2" in log_lines
    assert _files(workdir / "teacher" / "1") == kept
    records = read_records(str(workdir))
    assert [(r["stage"], r["epoch"], r["lr"]) for r in records] == [
        ("teacher", 1, pytest.approx(0.05)),
        ("teacher", 2, pytest.approx(0.01)),
        ("student", 1, pytest.approx(0.01)),
    ]
    assert summary["student_epochs"] == 1 and not (workdir / resume.DIVERGED_FILE).exists()
    assert json.loads((workdir / resume.CONFIG_FILE).read_text())["optimizer"][
        "learning_rate"
    ] == pytest.approx(0.01)
    # The run no longer diverged: its learning rate is fixed again.
    config.optimizer.learning_rate = 0.005
    with pytest.raises(ValueError, match=r"optimizer\.learning_rate: 0\.01 -> 0\.005\. Use"):
        resume.check_workdir(config, str(workdir))


# --- A full disk or a read-only workdir -----------------------------------------------------------


def _failing_write(monkeypatch, suffix: str, code: int) -> None:
    """`faults.write_point` (which every write of the run passes) raising OSError `code` at
    the first write of a path ending in `suffix`."""
    real = faults.write_point

    def write_point(path: str) -> None:
        if path.endswith(suffix) and not done:
            done.append(path)
            raise OSError(code, os.strerror(code), path)
        real(path)

    done: list[str] = []
    monkeypatch.setattr(faults, "write_point", write_point)


def test_a_failed_write_loses_nothing(data_fashion_mnist_dir, tmp_path, monkeypatch):
    """Every file the run writes passes the write hook; a write that fails (a full disk at
    the student's checkpoint, then a read-only workdir at the summary) stops the run with an
    OSError naming the path, the files written before are untouched, and the rerun ends as
    an uninterrupted run."""
    config = tiny.get_config()
    config.data_dir = str(data_fashion_mnist_dir)
    config.energy = ""
    seen: list[str] = []
    real = faults.write_point
    with monkeypatch.context() as m:
        m.setattr(faults, "write_point", lambda path: (seen.append(path), real(path))[1])
        reference = pipeline.run(config, str(tmp_path / "reference"))
    names = [os.path.relpath(p, tmp_path / "reference") for p in seen]
    assert names == [
        "config.json",
        *("metrics.jsonl", "curves.png", "teacher/1"),
        "student_transfer_report.txt",
        *("metrics.jsonl", "curves.png", "firing_rates.png", "student/1"),
        "summary.json",
    ]

    workdir = tmp_path / "run"
    for suffix, code in (("student/1", errno.ENOSPC), ("summary.json", errno.EROFS)):
        with monkeypatch.context() as m:
            _failing_write(m, suffix, code)
            with pytest.raises(OSError) as err:
                pipeline.run(config, str(workdir))
        assert (err.value.errno, err.value.filename) == (code, str(workdir / suffix))
        if suffix == "student/1":
            teacher = _files(workdir / "teacher")
            assert not (workdir / "student").exists() or not os.listdir(workdir / "student")
    assert _files(workdir / "teacher") == teacher
    summary = pipeline.run(config, str(workdir))
    assert {k: v for k, v in summary.items() if k != "wall_seconds"} == {
        k: v for k, v in reference.items() if k != "wall_seconds"
    }
    records = [_untimed(r) for r in read_records(str(workdir))]
    want = [_untimed(r) for r in read_records(str(tmp_path / "reference"))]
    assert [r for r in records if r["stage"] == "teacher"] == want[:1]
    assert records[-1] == want[-1]  # the student, logged once per attempt, the same each time
    for a, b in zip(
        jax.tree.leaves(checkpoints.load_variables(str(workdir / "student"))),
        jax.tree.leaves(checkpoints.load_variables(str(tmp_path / "reference" / "student"))),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


# --- The fault hook's own checks --------------------------------------------------------------


def test_fault_point_returns_the_stop_signal_and_checks_its_spec(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    monkeypatch.setattr(faults, "_stop", [])
    assert faults.point("train_call") is None  # no signal: nothing happens
    monkeypatch.setattr(faults, "_stop", [signal.SIGTERM])
    assert faults.point("save") == signal.SIGTERM
    stop = faults.stopped(signal.SIGINT, "student", "after epoch 2", "resume after epoch 2")
    assert stop.signum == signal.SIGINT
    assert str(stop) == (
        "interrupted by SIGINT in stage student, after epoch 2: rerun the same command to "
        "resume after epoch 2"
    )
    monkeypatch.setattr(faults, "_stop", [])
    monkeypatch.setenv(faults.ENV, "nowhere:1")
    with pytest.raises(ValueError, match=r"IDSNN_FAULT='nowhere:1' is invalid: .*train_call"):
        faults.point("save")
