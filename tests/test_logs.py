"""Metric records: JSONL lines (a crash's cut-short line repaired, bad lines skipped and
counted), TensorBoard events, quiet progress off a TTY."""

from __future__ import annotations

import json

from idsnn_jax.logs import MetricLogger, epoch_line, progress, read_records


def test_metric_logger_writes_jsonl_and_tensorboard(tmp_path):
    writer = MetricLogger(str(tmp_path))
    writer.write("teacher", 1, {"test_accuracy": 0.5, "lr": 0.05})
    writer.write("student", 1, {"test_accuracy": 0.25, "firing_rate/stem/act": 0.1})
    writer.close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [(r["stage"], r["epoch"], r["test_accuracy"]) for r in records] == [
        ("teacher", 1, 0.5),
        ("student", 1, 0.25),
    ]
    assert records[1]["firing_rate/stem/act"] == 0.1
    for stage in ("teacher", "student"):
        events = list((tmp_path / "tensorboard" / stage).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0


def test_progress_is_plain_lines_off_a_tty(capsys, log_lines):
    """No bar off a TTY (pytest captures stderr): a line at each quarter of a long epoch."""
    assert list(progress(range(3), total=3, desc="x", images_per_item=8)) == [0, 1, 2]
    assert capsys.readouterr().err == "" and log_lines == []
    assert list(progress(range(12), total=12, desc="s epoch 1", images_per_item=8)) == list(
        range(12)
    )
    assert capsys.readouterr().err == ""
    assert [line.split(",")[0] for line in log_lines] == [
        "[s epoch 1] 25% (3 of 12)",
        "[s epoch 1] 50% (6 of 12)",
        "[s epoch 1] 75% (9 of 12)",
    ]


def test_epoch_line_shows_the_key_figures_only():
    metrics = {
        "train_loss": 0.5,
        "train_accuracy": 0.8,
        "images_per_sec": 123.4,
        "epoch_seconds": 81.2,
        "lr": 0.05,
        "test_accuracy": 0.8168,
        "test_loss": 0.5,
        "test_macs": 1e5,
        "firing_rate/a": 0.1,
        "firing_rate/b": 0.3,
        "test_energy_uj": 6.695,
    }
    assert epoch_line("student", 2, metrics) == (
        "[student] epoch 2: test top-1 81.68%, train 80.00%, train loss 0.500, lr 0.05, "
        "firing 20.0%, 6.7 uJ/image, 123 img/s, 81 s"
    )


def test_a_line_cut_short_by_a_crash_does_not_wedge_the_log(tmp_path, log_lines):
    """A record half-written when the run was killed: the next run removes it on opening the
    log, appends whole records after it and reads them all back (before: the next record was
    glued onto it and every later epoch failed reading the log, before its checkpoint)."""
    writer = MetricLogger(str(tmp_path), plots=False)
    writer.write("teacher", 1, {"test_accuracy": 0.5})
    writer.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "teacher", "epoch": 2, "test_acc')
    writer = MetricLogger(str(tmp_path))  # plots on: they read the log back at every write
    writer.write("teacher", 2, {"test_accuracy": 0.75})
    writer.write("teacher", 3, {"test_accuracy": 0.8})
    writer.close()
    records = read_records(str(tmp_path))
    assert [(r["epoch"], r["test_accuracy"]) for r in records] == [(1, 0.5), (2, 0.75), (3, 0.8)]
    assert any("removed a last line cut short" in line for line in log_lines)


def test_read_records_skips_and_counts_bad_lines(tmp_path, log_lines):
    good = [{"stage": "teacher", "epoch": e, "test_accuracy": 0.1 * e} for e in (1, 2)]
    lines = [json.dumps(good[0]), "not json", "[1, 2]", json.dumps(good[1]), '{"stage": "t']
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    assert read_records(str(tmp_path)) == good
    assert any("skipped 3 line(s) that are not records (line 2)" in line for line in log_lines)
