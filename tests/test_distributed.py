"""Many processes: when the CLI starts JAX's distributed runtime, the sharded data order
against a NumPy construction of its rule (and each process gathering it from its own shards),
what a workdir records of it, and the CLI run as 2 processes on 127.0.0.1 (gloo collectives on
CPU) against 1 process with the same 2 shards: same parameters, same records."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time

import chex
import jax
import numpy as np
import pytest

from idsnn_jax import checkpoints, distributed, faults, resume
from idsnn_jax import input_pipeline as ip
from idsnn_jax.configs import tiny

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMING = {"time", "epoch_seconds", "images_per_sec"}

# --- When to start the distributed runtime ------------------------------------------------------


def test_initialize_args_from_flags_and_launchers():
    assert distributed.initialize_args({}) is None
    # A Slurm batch script (no srun step) runs one process, whatever SLURM_NTASKS says.
    assert distributed.initialize_args({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None
    assert distributed.initialize_args({"SLURM_STEP_NUM_TASKS": "1"}) is None
    assert distributed.initialize_args({"SLURM_STEP_NUM_TASKS": "4"}) == {}
    assert distributed.initialize_args({"OMPI_COMM_WORLD_SIZE": "1"}) is None
    assert distributed.initialize_args({"OMPI_COMM_WORLD_SIZE": "2"}) == {}
    flags = {"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 0}
    assert distributed.initialize_args({}, **flags) == flags
    # Flags given are passed alone: JAX looks up the others in the cluster environment.
    srun = {"SLURM_STEP_NUM_TASKS": "8"}
    assert distributed.initialize_args(srun, process_id=3) == {"process_id": 3}


def test_initialize_calls_jax_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for key in distributed.LAUNCHER_TASKS:
        monkeypatch.delenv(key, raising=False)
    distributed.initialize(coordinator_address=None, num_processes=None, process_id=None)
    assert calls == []
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    distributed.initialize()
    assert calls == [{}]


# --- The sharded epoch order ----------------------------------------------------------------------


def _rule(num_examples: int, batch: int, seed: int, epoch: int, shards: int) -> np.ndarray:
    """Global example ids (steps, B) of the README's rule, in NumPy from each shard's
    permutation: batch i is, shard by shard, entries i*B/S .. (i+1)*B/S of shard s
    (examples s*n .. (s+1)*n - 1) permuted with fold_in(key, s) (one shard: key)."""
    key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
    n, per = num_examples // shards, batch // shards
    perms = [
        np.asarray(jax.random.permutation(key if shards == 1 else jax.random.fold_in(key, s), n))
        for s in range(shards)
    ]
    rows = [
        np.concatenate([s * n + perms[s][i * per : (i + 1) * per] for s in range(shards)])
        for i in range(n // per)
    ]
    return np.stack(rows)


@pytest.mark.parametrize(
    "num_examples, batch, shards, processes",
    [(50, 12, 1, 1), (50, 12, 2, 1), (50, 12, 2, 2), (103, 16, 4, 2), (103, 16, 4, 4)],
)
def test_each_process_gathers_the_rule_from_its_own_shards(num_examples, batch, shards, processes):
    """Process p holds `train_rows` of the split (ids 0 .. N-1 here) and gets `epoch_indices`
    rows into them; its slice of every global batch gathers exactly the rule's examples."""
    expected = _rule(num_examples, batch, seed=3, epoch=2, shards=shards)
    split = np.arange(num_examples)
    width = batch // processes
    for p in range(processes):
        held = split[
            ip.train_rows(num_examples, num_shards=shards, process_index=p, process_count=processes)
        ]
        assert len(held) == num_examples // shards * shards // processes
        rows = ip.epoch_indices(
            num_examples, batch, seed=3, epoch=2, num_shards=shards, process_count=processes
        )
        cols = slice(p * width, (p + 1) * width)
        np.testing.assert_array_equal(held[np.asarray(rows)[:, cols]], expected[:, cols])


def test_one_shard_is_the_order_before_shards():
    """data_shards=1 keeps every earlier run's order: one permutation of the whole split."""
    key = jax.random.fold_in(jax.random.PRNGKey(0), 5)
    before = np.asarray(jax.random.permutation(key, 50))[:48].reshape(4, 12)
    np.testing.assert_array_equal(ip.epoch_indices(50, 12, seed=0, epoch=5), before)
    np.testing.assert_array_equal(_rule(50, 12, 0, 5, shards=1), before)


def test_sharded_order_placed_on_devices_keeps_its_values():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "batch"))
    kwargs = dict(seed=1, epoch=0, num_shards=4)
    placed = ip.epoch_indices(64, 16, sharding=sharding, **kwargs)
    np.testing.assert_array_equal(placed, ip.epoch_indices(64, 16, **kwargs))


# --- What the workdir records ---------------------------------------------------------------------


def _started(workdir, record: dict) -> None:
    """A workdir with a saved teacher epoch (placeholder) and `record` as its config.json."""
    os.makedirs(workdir / "teacher" / "1" / "state")
    (workdir / resume.CONFIG_FILE).write_text(json.dumps(record))


def test_workdir_records_the_shard_count(tmp_path, monkeypatch):
    """data_shards=0 is recorded as the process count, so resuming a 2-process run on 1
    process (another order) is refused unless data_shards=2 is given; a workdir from before
    data_shards existed had 1 shard."""
    config = tiny.get_config()
    assert config.data_shards == 0 and resume.config_record(config)["data_shards"] == 1
    with monkeypatch.context() as m:
        m.setattr(jax, "process_count", lambda: 2)
        _started(tmp_path / "two", resume.config_record(config))
    with pytest.raises(ValueError, match=r"refusing to resume it: data_shards: 2 -> 1\. Use"):
        resume.check_workdir(config, str(tmp_path / "two"))
    config.data_shards = 2
    resume.check_workdir(config, str(tmp_path / "two"))

    old = resume.config_record(config)
    del old["data_shards"]
    _started(tmp_path / "old", old)
    with pytest.raises(ValueError, match=r"data_shards: 1 -> 2\. Use"):
        resume.check_workdir(config, str(tmp_path / "old"))
    config.data_shards = 0
    resume.check_workdir(config, str(tmp_path / "old"))


# --- Two processes through the CLI ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(workdir, data_dir, devices: int, log, *flags: str, fault: str = "") -> subprocess.Popen:
    """The CLI on the tiny config (no operation counts) with `devices` CPU devices and
    `IDSNN_FAULT=fault` if given; stdout and stderr go to `log`.out / `log`.err."""
    cmd = [sys.executable, "-m", "idsnn_jax.main", "--config=configs/tiny.py"]
    cmd += [f"--workdir={workdir}", f"--config.data_dir={data_dir}", "--config.energy=", *flags]
    env = {k: v for k, v in os.environ.items() if k != faults.ENV}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    if fault:
        env[faults.ENV] = fault
    with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err)


def _wait_all(
    procs: list[subprocess.Popen], timeout: float, expected: list[int] | None = None
) -> list[int]:
    """Exit statuses; once one ends otherwise than `expected` (default: all 0) or time runs
    out the others are killed (a process of a distributed run whose peer died would wait for
    it). A process stopped on purpose (143) must not end the wait for the others."""
    expected = expected or [0] * len(procs)
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.returncode not in (None, e) for p, e in zip(procs, expected, strict=True)):
            break
        time.sleep(0.5)
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
    return [p.returncode for p in procs]


def _records(workdir) -> list[dict]:
    with open(workdir / "metrics.jsonl") as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def _load(workdir, stage: str) -> dict:
    with jax.enable_x64(True):  # float64 checkpoints restored as float64
        return checkpoints.load_variables(str(workdir / stage))


def _two_processes(tmp_path, data_dir, flags: tuple[str, ...], log: str, fault: str = ""):
    """Processes 0 and 1 of a run on 127.0.0.1 in `tmp_path / 'processes'` (`fault` in
    process 1 only)."""
    port = _free_port()
    cluster = (f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2")
    return [
        _start(
            tmp_path / "processes",
            data_dir,
            1,
            tmp_path / f"{log}{p}",
            *flags,
            *cluster,
            f"--process_id={p}",
            fault=fault if p else "",
        )
        for p in range(2)
    ]


def _logs(tmp_path, names) -> dict[str, str]:
    return {
        name: (tmp_path / f"{name}.out").read_text() + (tmp_path / f"{name}.err").read_text()
        for name in names
    }


STOPPED = re.compile(
    r"interrupted by SIGTERM in stage student, epoch 1, step [2-5] of 6 \(saved there\): "
    r"rerun the same command to resume from that step"
)


def test_cli_on_2_and_4_devices_and_2_processes_equals_1_device(data_fashion_mnist_dir, tmp_path):
    """The whole CLI path (data on the devices, each epoch's indices, the gather in the step,
    padded evaluation, EMA, checkpoints) in float64, teacher and distilled student, 6 steps an
    epoch: 1 device, 2 devices, 4 devices (2 steps per dispatch, counting SOPs/MACs) and 2
    processes of 1 device (gloo on 127.0.0.1), all with the same 2 data shards, end with the
    same parameters, BN statistics and records (to 1e-9; float64 rounding of the reductions'
    order is ~1e-14). Only process 0 prints and writes files.

    The 2 processes are preempted: SIGTERM to process 1 at its 8th dispatch (the student's
    second step) stops both at one agreed step, each exiting 143 with the one line, the state
    saved there; rerun, they end bit for bit as 1 process of 2 devices (each all-reduce adds
    the same two values).

    float64, because float32 rounding of a different reduction order (or of 1 ulp in one
    weight) is amplified by training until the runs differ like seeds (README "Many
    processes"); in float64 an indexing, sharding or padding mistake still shows at O(1)."""
    common = ("--config.dtype=float64", "--config.data_shards=2", "--config.ema_decay=0.5")
    common += ("--config.batch_size=8", "--config.eval_batch_size=8")
    common += ("--config.max_test_examples=30",)  # padded last eval batch on every mesh
    singles = {
        "one": (1,),
        "two": (2,),
        "four": (4, "--config.steps_per_call=2", "--config.energy=45nm_fp32"),
    }
    data = data_fashion_mnist_dir
    procs = _two_processes(tmp_path, data, common, "stopped", fault="train_call:8:TERM")
    for name, (devices, *flags) in singles.items():
        procs.append(_start(tmp_path / name, data, devices, tmp_path / name, *common, *flags))
    codes = _wait_all(procs, timeout=600, expected=[143, 143, 0, 0, 0])
    logs = _logs(tmp_path, ["stopped0", "stopped1", *singles])
    assert codes == [143, 143, 0, 0, 0], {name: log[-3000:] for name, log in logs.items()}
    for p in range(2):
        assert STOPPED.fullmatch(logs[f"stopped{p}"].strip().splitlines()[-1]), logs[f"stopped{p}"]
    codes = _wait_all(_two_processes(tmp_path, data, common, "resumed"), timeout=600)
    logs |= _logs(tmp_path, ["resumed0", "resumed1"])
    assert codes == [0, 0], {name: logs[name][-3000:] for name in ("resumed0", "resumed1")}

    assert "2 process(es)" in logs["resumed0"] and "summary:" in logs["resumed0"]
    assert "[student] resuming at epoch 1 of 1, step " in logs["resumed0"]
    assert "config:" not in logs["resumed1"] and "summary:" not in logs["resumed1"]
    assert "4 device(s)" in logs["four"]
    assert json.loads((tmp_path / "processes" / "config.json").read_text())["data_shards"] == 2
    reference = _records(tmp_path / "one")
    assert [(r["stage"], r["epoch"]) for r in reference] == [("teacher", 1), ("student", 1)]
    for name in ("processes", "two", "four"):
        for got, want in zip(_records(tmp_path / name), reference, strict=True):
            assert (got["stage"], got["epoch"]) == (want["stage"], want["epoch"])
            numbers = {k: v for k, v in want.items() if k not in ("stage", "epoch")}
            assert {k: got[k] for k in numbers} == pytest.approx(numbers, rel=1e-9, abs=1e-12)
        for stage in ("teacher", "student"):
            chex.assert_trees_all_close(
                _load(tmp_path / name, stage), _load(tmp_path / "one", stage), rtol=1e-9, atol=1e-12
            )
    for stage in ("teacher", "student"):
        chex.assert_trees_all_equal(
            _load(tmp_path / "processes", stage), _load(tmp_path / "two", stage)
        )
