"""Metric records: JSONL lines, TensorBoard events, quiet progress off a TTY."""

from __future__ import annotations

import json

from idsnn_jax.logs import MetricLogger, progress


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
