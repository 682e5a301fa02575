"""The GPU run's pieces on a CPU (`experiments/gpu_run.py`; the whole run is
`bash experiments/gpu_run.sh --dry_run`, minutes, not part of the suite)."""

from __future__ import annotations

import json
import sys
import time

import gpu_run  # experiments/ is on pytest's pythonpath (pyproject.toml)
import numpy as np
import pytest

from idsnn_jax.datasets import load_split

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane


def test_synthetic_cifar100_reads_back_through_the_real_loader(tmp_path):
    root = gpu_run.write_synthetic_cifar100(str(tmp_path), 48, 16)
    train = load_split("cifar100", "train", root)
    test = load_split("cifar100", "test", root)
    assert train.images.shape == (48, 32, 32, 3) and test.images.shape == (16, 32, 32, 3)
    assert train.labels.min() >= 0 and train.labels.max() < 100
    assert len(np.unique(train.images)) > 200  # random pixels, not a constant


def test_phase_outcomes(tmp_path):
    log = str(tmp_path / "log.txt")
    python = [sys.executable, "-c"]
    done = gpu_run.run_phase("ok", [*python, "print('hello')"], 60, log)
    failed = gpu_run.run_phase("bad", [*python, "raise SystemExit(3)"], 60, log)
    slow = gpu_run.run_phase("slow", [*python, "import time; time.sleep(60)"], 1, log)
    assert (done["status"], done["rc"]) == ("done", 0)
    assert (failed["status"], failed["rc"]) == ("failed", 3)
    assert slow["status"] == "stopped at its time limit" and slow["seconds"] < 30
    with open(log) as f:
        text = f.read()
    assert "=== ok" in text and "hello" in text and "=== slow" in text


def test_a_phase_without_enough_time_is_skipped(tmp_path):
    start = time.perf_counter()
    run = gpu_run.Run("quick", gpu_run.RESERVE_S + 10, env={}, out=str(tmp_path), start=start)
    result = run.phase("bench", 100, lambda seconds: pytest.fail("must not run"))
    assert result["status"].startswith("skipped")
    with open(tmp_path / "run.json") as f:
        assert json.load(f)["phases"] == [result]


def test_commands():
    mode = gpu_run.MODES["full"]
    first = gpu_run.bench_cmd(mode, "b.json", 120, first=True)
    rest = gpu_run.bench_cmd(mode, "b.json", 120, first=False)
    assert first[1].endswith("benchmark.py") and rest[-1] == "--resume" != first[-1]
    assert "--torch" in first and "--steps_per_call=1,8" in first and "--deadline_s=90" in first
    assert "--variants=default" in first and "--variants=default,both" in rest
    recipe = gpu_run.recipe_cmd(mode, "/data", "/work")
    assert recipe[1:4] == ["-m", "idsnn_jax.main", "--config=configs/cifar100.py"]
    assert "--config.teacher.num_epochs=3" in recipe and "--config.data_dir=/data" in recipe


def test_recipe_summary_reads_the_finished_epochs(tmp_path):
    records = [
        {"stage": "teacher", "epoch": 1, "images_per_sec": 10.0, "test_accuracy": 0.01},
        {"stage": "teacher", "epoch": 2, "images_per_sec": 20.0, "test_accuracy": 0.02},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = gpu_run.recipe_summary(str(tmp_path), {"status": "done"}, (50_000, 10_000))
    assert [e["images_per_sec"] for e in summary["stages"]["teacher"]] == [10.0, 20.0]
    assert summary["summary"] is None and summary["status"] == "done"
    assert summary["data"].startswith("synthetic")


def test_environment_names_the_device_and_checks_floors():
    assert gpu_run.gpu_slug({"backend": "gpu", "device_kind": "NVIDIA H100 80GB HBM3"}) == (
        "nvidia_h100_80gb_hbm3"
    )
    assert gpu_run.gpu_slug({"backend": "cpu"}) == "dry_run_cpu"
    floors = gpu_run.version_floors()
    assert floors and not any(" < " in v for k, v in floors.items() if k in ("jax", "flax"))
