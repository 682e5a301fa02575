"""Tests of the reproduction scripts in experiments/: `summarize` on hand-written metrics
and the ablation end to end on a tiny Fashion-MNIST setting (one shared teacher)."""

from __future__ import annotations

import json
import os

import ablation  # experiments/ is on pytest's pythonpath (pyproject.toml)
import pytest
import summarize

from idsnn_jax import datasets
from idsnn_jax.configs import cifar100, tiny

FASHION_MNIST_DIR = datasets.DEFAULT_FASHION_MNIST_DIR


def _record(stage, epoch, acc, ips, **rates):
    return {
        "stage": stage,
        "epoch": epoch,
        "time": 0.0,
        "train_loss": 1.0,
        "train_accuracy": 0.5,
        "images_per_sec": ips,
        "epoch_seconds": 64 / ips,
        "lr": 0.05,
        "test_accuracy": acc,
        "test_loss": 1.0,
        **{f"firing_rate/{k}": v for k, v in rates.items()},
    }


def test_summarize_exact_numbers(tmp_path):
    records = [
        _record("teacher", 1, 0.50, 10.0),
        _record("teacher", 2, 0.70, 100.0),
        _record("teacher", 3, 0.60, 200.0),
        _record("student", 1, 0.20, 5.0, stem=0.1, block=0.3),
        _record("student", 2, 0.40, 30.0, stem=0.2, block=0.4),
        # epoch 3 logged, run killed before its checkpoint, epoch 3 redone after the resume:
        _record("student", 3, 0.99, 999.0, stem=0.9, block=0.9),
        _record("student", 3, 0.40, 50.0, stem=0.1, block=0.2),
        _record("student", 4, 0.30, 40.0, stem=0.3, block=0.5),
    ]
    lines = [json.dumps(r) for r in records] + ['{"stage": "student", "ep']  # half-written
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines))

    rows = summarize.summarize([str(tmp_path)])

    assert [r["stage"] for r in rows] == ["teacher", "student"]
    teacher, student = rows
    assert teacher["workdir"] == str(tmp_path)
    assert teacher["epochs"] == 3 and teacher["last_epoch"] == 3
    assert teacher["best_accuracy"] == 0.70 and teacher["best_epoch"] == 2
    assert teacher["last_accuracy"] == 0.60
    assert teacher["images_per_sec"] == pytest.approx(150.0)  # epoch 1 (compilation) left out
    assert teacher["mean_firing_rate"] is None
    assert teacher["train_seconds"] == pytest.approx(6.4 + 0.64 + 0.32)
    assert student["epochs"] == 4
    assert student["best_accuracy"] == 0.40 and student["best_epoch"] == 2  # first of the ties
    assert student["last_accuracy"] == 0.30
    assert student["images_per_sec"] == pytest.approx(40.0)  # (30 + 50 + 40) / 3
    assert student["mean_firing_rate"] == pytest.approx(0.4)  # (0.3 + 0.5) / 2, last epoch
    assert student["train_seconds"] == pytest.approx(64 / 5 + 64 / 30 + 64 / 50 + 64 / 40)
    table = summarize.format_table(rows)
    assert "70.00" in table and "40.00" in table


def test_summarize_finds_workdirs_under_a_root(tmp_path):
    for name, acc in (("b", 0.25), ("a", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text(json.dumps(_record("s", 1, acc, 1.0)))
    (tmp_path / "empty").mkdir()
    rows = summarize.summarize([str(tmp_path)])
    assert [(os.path.basename(r["workdir"]), r["best_accuracy"]) for r in rows] == [
        ("a", 0.5),
        ("b", 0.25),
    ]
    with pytest.raises(FileNotFoundError, match="no metrics.jsonl"):
        summarize.summarize([str(tmp_path / "empty")])


def _tiny_config():
    config = tiny.get_config()
    config.compare_baseline = True  # the ablation turns it off: baseline is its own variant
    return config


@pytest.fixture
def compilation_cache(tmp_path_factory):
    """A persistent XLA cache for this test only: the four variants compile the same student
    init and eval step, and two of them each train step, so the cache halves the test time.
    JAX sets its cache up once per process, hence the resets."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc

    keys = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    saved = {k: jax.config.values[k] for k in keys}
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("xla_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    try:
        yield
    finally:
        for k, v in saved.items():
            jax.config.update(k, v)
        cc.reset_cache()


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"no Fashion-MNIST IDX files in {FASHION_MNIST_DIR}",
)
def test_ablation_shares_one_teacher(tmp_path, compilation_cache):
    config = _tiny_config()
    root = tmp_path / "ablation"

    rows = ablation.run_ablation(config, str(root))

    assert [r["variant"] for r in rows] == ["baseline", "init_only", "kd_only", "idsnn"]
    assert [(r["init_from_teacher"], r["distill"]) for r in rows] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    # The teacher was trained once, in teacher_run; no variant trained its own.
    # Checkpoints: <workdir>/<stage>/<epoch>/state.
    stage_dirs = {p.parent.parent.relative_to(root).as_posix() for p in root.glob("*/*/*/state")}
    assert stage_dirs == {"teacher_run/teacher", *(f"{v}/student" for v in ablation.VARIANTS)}
    teacher_stages = [r["stage"] for r in summarize.summarize([str(root / "teacher_run")])]
    assert teacher_stages == ["teacher"]
    for variant in ablation.VARIANTS:
        summary = json.loads((root / variant / "summary.json").read_text())
        assert "baseline_best_accuracy" not in summary  # compare_baseline forced off
        assert summary["student_epochs"] == 1
        if variant == "baseline":
            assert "teacher_best_accuracy" not in summary  # no teacher at all
        else:
            assert summary["teacher_best_accuracy"] is None  # loaded, not trained

    result = json.loads((root / "ablation.json").read_text())
    assert len(result["rows"]) == 4
    assert result["teacher_checkpoint"] == str(root / "teacher_run" / "teacher")
    assert result["teacher"]["epochs"] == 1
    for row in result["rows"]:
        assert 0.0 <= row["last_accuracy"] <= row["best_accuracy"] <= 1.0
        assert row["epochs"] == 1 and 0 < row["train_seconds"] <= row["wall_seconds"]
        assert row["paper_accuracy"] is None  # not CIFAR-100 at T=6
    assert "init_only" in ablation.format_table(rows)

    # A rerun skips every finished variant and the teacher: same rows, nothing retrained.
    mtime = (root / "teacher_run" / "metrics.jsonl").stat().st_mtime
    again = ablation.run_ablation(config, str(root), ["idsnn", "baseline"])
    assert [r["variant"] for r in again] == ["idsnn", "baseline"]
    assert again[0] == rows[3] and again[1] == rows[0]
    assert (root / "teacher_run" / "metrics.jsonl").stat().st_mtime == mtime


def test_ablation_rejects_unknown_variants(tmp_path):
    with pytest.raises(ValueError, match="unknown variants"):
        ablation.run_ablation(_tiny_config(), str(tmp_path), ["idsnn", "kd"])


def test_paper_numbers_only_in_the_paper_setting():
    config = cifar100.get_config()
    assert not ablation.is_paper_setting(config)  # T=4
    config.student.time_steps = 6
    assert ablation.is_paper_setting(config)
    config.dataset = "cifar10"
    assert not ablation.is_paper_setting(config)
