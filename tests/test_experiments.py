"""Tests of the reproduction scripts in experiments/: `summarize` on hand-written metrics
and the ablation end to end on a tiny Fashion-MNIST setting (one shared teacher)."""

from __future__ import annotations

import json
import os

import ablation  # experiments/ is on pytest's pythonpath (pyproject.toml)
import paper_study
import pytest
import recipe_study
import study_report
import summarize

from idsnn_jax import datasets
from idsnn_jax.configs import cifar100, fashion_mnist_modern, tiny
from idsnn_jax.plan import dotted

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane

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


@pytest.mark.skipif(
    not os.path.isdir(FASHION_MNIST_DIR),
    reason=f"no Fashion-MNIST IDX files in {FASHION_MNIST_DIR}",
)
def test_study_shares_one_teacher_per_seed(tmp_path):
    """paper_study end to end: the ablation with one shared teacher (trained with its own
    overrides), a convergence run loading it, the report from the runs' own records."""
    config = _tiny_config()
    root = tmp_path / "study"
    paper_study.run_study(config, str(root), [0], ["teacher.num_epochs=2"], [(1, 1)])
    sroot = root / "seed_0"

    rows = json.loads((sroot / "ablation.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "init_only", "kd_only", "idsnn"]
    assert [(r["init_from_teacher"], r["distill"]) for r in rows] == [
        (False, False),
        (True, False),
        (False, True),
        (True, True),
    ]
    # The teacher was trained once, in teacher_run, with its overrides; no variant trained
    # its own. Checkpoints: <workdir>/<stage>/<epoch>/state.
    stage_dirs = {p.parent.parent.relative_to(sroot).as_posix() for p in sroot.glob("*/*/*/state")}
    runs = [*ablation.VARIANTS, "idsnn_lr1_e1"]
    assert stage_dirs == {"teacher_run/teacher", *(f"{v}/student" for v in runs)}
    teacher = summarize.summarize([str(sroot / "teacher_run")])
    assert [(r["stage"], r["epochs"]) for r in teacher] == [("teacher", 2)]
    for run in runs:
        summary = json.loads((sroot / run / "summary.json").read_text())
        assert "baseline_best_accuracy" not in summary  # compare_baseline forced off
        assert summary["student_epochs"] == 1
        if run == "baseline":
            assert "teacher_best_accuracy" not in summary  # no teacher at all
        else:
            assert summary["teacher_best_accuracy"] is None  # loaded, not trained
    schedule_config = json.loads((sroot / "idsnn_lr1_e1" / "config.json").read_text())
    assert schedule_config["optimizer"]["lr_interval"] == 1
    for row in rows:
        assert 0.0 <= row["last_accuracy"] <= row["best_accuracy"] <= 1.0
        assert row["epochs"] == 1 and 0 < row["train_seconds"] <= row["wall_seconds"]
        assert row["paper_accuracy"] is None  # not CIFAR-100 at T=6
    assert "init_only" in ablation.format_table(rows)

    out = tmp_path / "report"
    paths = study_report.write_report(str(root), config, [(1, 1)], str(out))
    assert sorted(os.path.basename(p) for p in paths) == sorted(
        ["table3.md", "table3.json", "table4.md", "table4.json", "curves.json"]
        + ["table3.png", "table4.png", "fig5.png"]
    )
    table3 = json.loads((out / "table3.json").read_text())
    assert [r["best_per_seed"] for r in table3["rows"]] == [[r["best_accuracy"]] for r in rows]
    assert table3["teacher_best"]["mean"] == teacher[0]["best_accuracy"]

    # A rerun skips every finished run and the teacher: nothing retrained.
    mtimes = {r: (sroot / r / "metrics.jsonl").stat().st_mtime for r in ["teacher_run", *runs]}
    paper_study.run_study(config, str(root), [0], ["teacher.num_epochs=2"], [(1, 1)])
    assert {r: (sroot / r / "metrics.jsonl").stat().st_mtime for r in mtimes} == mtimes


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


def _curve(*accuracies):
    return [
        {"epoch": i + 1, "test_accuracy": a, "test_loss": 1 - a} for i, a in enumerate(accuracies)
    ]


def test_study_tables_by_hand():
    seeds = {
        1: {
            "teacher": _curve(0.8, 0.9),
            "baseline": _curve(0.5, 0.6, 0.55),
            "init_only": _curve(0.6, 0.7, 0.7),
            "kd_only": _curve(0.4, 0.5, 0.6),
            "idsnn": _curve(0.65, 0.7, 0.75),
            "idsnn_lr1_e2": _curve(0.62, 0.61),
        },
        2: {
            "teacher": _curve(0.7, 0.7),
            "baseline": _curve(0.3, 0.4, 0.5),
            "init_only": _curve(0.5, 0.5, 0.5),
            "kd_only": _curve(0.2, 0.3, 0.4),
            "idsnn": _curve(0.5, 0.5, 0.6),
            "idsnn_lr1_e2": _curve(0.4, 0.45),
        },
    }
    t3 = study_report.table3(seeds, paper=False)
    rows = {r["variant"]: r for r in t3["rows"]}
    assert t3["teacher_best"]["mean"] == pytest.approx(0.8)
    assert t3["teacher_best"]["std"] == pytest.approx(0.1 * 2**0.5)  # sample std of .9, .7
    assert rows["idsnn"]["best_per_seed"] == [0.75, 0.6]
    assert rows["idsnn"]["best"]["mean"] == pytest.approx(0.675)
    assert rows["idsnn"]["last"]["mean"] == pytest.approx(0.675)
    assert rows["idsnn"]["gain_over_baseline"]["mean"] == pytest.approx(0.125)  # .15, .1
    assert rows["init_only"]["best_epoch_per_seed"] == [2, 1]  # the first of ties
    assert rows["baseline"]["gain_over_baseline"] == {"mean": 0.0, "std": 0.0}
    t4 = study_report.table4(seeds, ["idsnn_lr1_e2"], paper=False)
    assert t4["target_per_seed"] == [0.6, 0.5]
    reach = {r["run"]: r["reach_epoch_per_seed"] for r in t4["rows"]}
    assert reach == {"baseline": [2, 3], "idsnn": [1, 1], "idsnn_lr1_e2": [1, None]}
    row = "| idsnn_lr1_e2 | 2 | 53.50 ± 12.02 | 51.00 / 53.00 | 1 / - | - |"
    assert row in study_report.table4_markdown(t4)


def test_study_arguments_fail_with_the_key():
    config = tiny.get_config()
    out = paper_study.with_overrides(config, ["max_train_examples=None", "teacher.num_epochs=3"])
    assert out.max_train_examples is None and out.teacher.num_epochs == 3
    assert config.teacher.num_epochs == 1  # a copy
    with pytest.raises(ValueError, match="teacher.nope"):
        paper_study.with_overrides(config, ["teacher.nope=1"])
    with pytest.raises(ValueError, match="not key=value"):
        paper_study.with_overrides(config, ["teacher.num_epochs"])
    assert paper_study.parse_schedules(["20:60", "10:20"]) == [(20, 60), (10, 20)]
    for bad in ("20", "a:b", "0:5"):
        with pytest.raises(ValueError, match="--schedules"):
            paper_study.parse_schedules([bad])


def _summary(path, best, ema=None):
    os.makedirs(path, exist_ok=True)
    summary = {"student_best_accuracy": best, "wall_seconds": 1.0}
    if ema is not None:
        summary["student_ema_best_accuracy"] = ema
    with open(os.path.join(path, "summary.json"), "w") as f:
        json.dump(summary, f)


def test_recipe_table_by_hand(tmp_path):
    """Mean, sample std and the per-seed difference to `modern`, over the seeds each run has;
    the reference rows from a paper_study root; unfinished runs left out."""
    root, ref = tmp_path / "recipe", tmp_path / "study"
    for seed, (modern, ema, no_tet, base) in {
        1: (0.80, 0.81, 0.78, 0.70),
        2: (0.84, 0.83, 0.80, 0.72),
    }.items():
        _summary(root / f"seed_{seed}" / "modern", modern, ema)
        _summary(root / f"seed_{seed}" / "no_tet", no_tet, ema)
        _summary(ref / f"seed_{seed}" / "baseline", base)
    _summary(root / "seed_3" / "modern", 0.9, 0.9)  # only modern finished for seed 3
    (root / "seed_3" / "no_tet").mkdir()
    rows = {r["run"]: r for r in recipe_study.table(str(root), str(ref))["rows"]}
    assert set(rows) == {"modern", "no_tet", "reference_baseline"}
    assert rows["modern"]["best"]["mean"] == pytest.approx((0.80 + 0.84 + 0.9) / 3)
    assert rows["modern"]["best"]["std"] == pytest.approx(0.05033, abs=1e-5)  # by hand
    assert rows["no_tet"]["best"]["mean"] == pytest.approx(0.79)
    assert rows["no_tet"]["minus_modern"]["mean"] == pytest.approx(-0.03)  # -0.02, -0.04
    assert rows["no_tet"]["minus_modern"]["std"] == pytest.approx(0.0141421, abs=1e-6)
    assert rows["reference_baseline"]["ema"] is None
    assert rows["modern"]["minus_modern"] is None
    md = recipe_study.markdown({"rows": list(rows.values())})
    assert "| no_tet | 2 | 79.00 ± 1.41 | 82.00 ± 1.41 | -3.00 ± 1.41 | 78.00 / 80.00 |" in md


def test_recipe_runs_in_priority_order_with_the_overrides():
    """Every seed's main comparison first; each variant's config is the modern one with its
    overrides, the seed and the teacher, and nothing else changed."""
    order = recipe_study.run_order([1, 2])
    assert order[:4] == [(1, "modern"), (2, "modern"), (1, "baseline"), (2, "baseline")]
    assert len(order) == 2 * len(recipe_study.VARIANTS)
    base = fashion_mnist_modern.get_config()
    config = recipe_study.variant_config(base, "no_cosine", 2, "/t/{seed}")
    assert (config.seed, config.teacher.checkpoint) == (2, "/t/{seed}")
    assert (config.optimizer.schedule, config.optimizer.warmup_epochs) == ("step", 0)
    changed = {
        k
        for k in dotted(config.to_dict())
        if dotted(config.to_dict())[k] != dotted(base.to_dict())[k]
    }
    assert changed == {
        "seed",
        "teacher.checkpoint",
        "optimizer.schedule",
        "optimizer.warmup_epochs",
        "compare_baseline",
    }
