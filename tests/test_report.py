"""The console's report: the closing table against a tiny run's records (read here with
`json`, the expected values derived independently), the settings line, the next steps."""

from __future__ import annotations

import json

import pytest

from idsnn_jax import pipeline, report, train
from idsnn_jax.configs import tiny


def _tiny_run(data_dir, workdir, monkeypatch) -> dict[str, int]:
    """configs/tiny.py with a baseline, 2 student epochs, the teacher on all 48 training
    images and the students on 32; returns each stage's training-set size as `fit` saw it."""
    config = tiny.get_config()
    config.data_dir = str(data_dir)
    config.max_train_examples, config.max_test_examples = None, None
    config.student.max_train_examples = 32
    config.student.num_epochs = 2
    config.compare_baseline = True
    seen = {}
    fit = train.fit

    def spy(ctx, *, stage, **kwargs):
        seen[stage] = ctx.train_size
        return fit(ctx, stage=stage, **kwargs)

    monkeypatch.setattr(train, "fit", spy)
    pipeline.run(config, str(workdir))
    return seen


@pytest.mark.slow  # a whole (tiny) pipeline: three stages
def test_table_columns_match_a_tiny_runs_records(data_fashion_mnist_dir, tmp_path, monkeypatch):
    seen = _tiny_run(data_fashion_mnist_dir, tmp_path / "run", monkeypatch)
    assert seen == {"teacher": 48, "student": 32, "baseline": 32}  # each stage's own budget

    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    by_stage: dict[str, list[dict]] = {}
    for r in records:
        by_stage.setdefault(r["stage"], []).append(r)
    assert list(by_stage) == ["teacher", "student", "baseline"]

    def best(stage):
        accuracies = [r["test_accuracy"] for r in by_stage[stage]]
        return by_stage[stage][accuracies.index(max(accuracies))]

    target = best("baseline")["test_accuracy"]
    rows = {r["stage"]: r for r in report.stage_rows(records)}
    for stage, epochs in by_stage.items():
        row, b = rows[stage], best(stage)
        assert row["top1"] == b["test_accuracy"]
        assert row["gain"] == pytest.approx(b["test_accuracy"] - target)
        reached = [r["epoch"] for r in epochs if r["test_accuracy"] >= target]
        assert row["epochs_to_baseline"] == (reached[0] if reached else None)
        assert row["energy_uj"] == b["test_energy_uj"] > 0
        ratio = b["test_energy_uj"] / best("teacher")["test_energy_uj"]
        assert row["energy_ratio"] == pytest.approx(ratio)
        rates = [v for k, v in b.items() if k.startswith("firing_rate/")]
        if stage == "teacher":
            assert row["firing_rate"] is None and not rates
        else:
            assert row["firing_rate"] == pytest.approx(sum(rates) / len(rates))
            assert 0 < row["firing_rate"] < 1

    # The printed table: one line per stage, its cells in the header's order.
    lines = report.format_rows(report.stage_rows(records)).splitlines()
    assert lines[0].split("  ")[0] == "stage" and len(lines) == 2 + len(by_stage)
    cells = {line.split()[0]: line.split() for line in lines[2:]}
    baseline = cells["baseline"]
    assert baseline[1] == f"{100 * target:.2f}" and baseline[2] == "-"
    student = cells["student"]
    assert student[1] == f"{100 * best('student')['test_accuracy']:.2f}"
    assert student[2] == f"{100 * (best('student')['test_accuracy'] - target):+.2f}"
    assert cells["teacher"][4] == "-" and cells["teacher"][6] == "1.00x"


def test_table_without_baseline_or_teacher_shows_dashes():
    records = [
        {"stage": "student", "epoch": 1, "test_accuracy": 0.5, "firing_rate/a": 0.2},
        {"stage": "student", "epoch": 2, "test_accuracy": 0.75, "firing_rate/a": 0.1},
    ]
    (row,) = report.stage_rows(records)
    assert (row["top1"], row["best_epoch"], row["firing_rate"]) == (0.75, 2, 0.1)
    assert row["gain"] is row["epochs_to_baseline"] is row["energy_ratio"] is None
    line = report.format_rows([row]).splitlines()[2].split()
    assert line == ["student", "75.00", "-", "-", "10.00", "-", "-"]


def test_settings_line_names_each_stages_budget():
    config = tiny.get_config()
    config.max_train_examples, config.student.max_train_examples = None, 32
    config.compare_baseline = True
    line = report.config_line(config, "runs/x")
    assert "\n" not in line and line.endswith("All settings: runs/x/config.json")
    assert "1 epoch(s) on all images" in line and "1 epoch(s) on 32 images (init + KD)" in line
    assert "baseline SNN" in line


def test_next_steps_name_the_plots_and_the_cifar_commands():
    text = report.next_steps(tiny.get_config(), "runs/fm")
    assert "runs/fm/curves.png" in text and "runs/fm/firing_rates.png" in text
    assert "--config=configs/cifar100.py" in text and "--config=configs/cifar10.py" in text
