"""Metric records: JSONL lines (a crash's cut-short line repaired, bad lines skipped and
counted), TensorBoard events, quiet progress off a TTY."""

from __future__ import annotations

import json

from idsnn_jax.logs import MetricLogger, progress, read_records


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


def test_progress_is_silent_off_a_tty(capsys):
    assert list(progress(range(3), total=3, desc="x", images_per_item=8)) == [0, 1, 2]
    assert capsys.readouterr().err == ""  # pytest captures stderr: not a TTY


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
