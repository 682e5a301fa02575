"""experiments/common.py, the experiment tools' shared helpers, on hand-computed cases."""

from __future__ import annotations

import json
import statistics

import common
import pytest


@pytest.mark.parametrize(
    "seconds,text", [(0, "0m00s"), (59.6, "1m00s"), (185, "3m05s"), (3725, "1h02m")]
)
def test_duration(seconds, text):
    assert common.duration(seconds) == text


def test_tables():
    lines = [["idsnn", "78.19"], ["baseline", "75.4"]]
    assert common.text_table(["run", "top-1"], lines).splitlines() == [
        "run       top-1",
        "--------  -----",
        "idsnn     78.19",
        "baseline  75.4",
    ]
    assert common.markdown_table(["run", "top-1"], lines) == (
        "| run | top-1 |\n| --- | --- |\n| idsnn | 78.19 |\n| baseline | 75.4 |\n"
    )
    assert common.markdown_table(None, lines[:1]) == "| idsnn | 78.19 |\n"


def test_mean_std_is_the_sample_std():
    values = [0.7, 0.8, 0.95]
    got = common.mean_std(values)
    assert got["mean"] == pytest.approx(sum(values) / 3)
    mean = sum(values) / 3
    assert got["std"] == pytest.approx((sum((v - mean) ** 2 for v in values) / 2) ** 0.5)
    assert got["std"] == pytest.approx(statistics.stdev(values))
    assert common.mean_std([0.5]) == {"mean": 0.5, "std": 0.0}


def test_run_directories_and_summaries(tmp_path):
    assert common.seed_dir("/r", 2) == "/r/seed_2"
    assert common.schedule_dir(20, 60) == "idsnn_lr20_e60"
    assert common.load_summary(str(tmp_path)) is None
    (tmp_path / common.SUMMARY_FILE).write_text(json.dumps({"student_epochs": 3}))
    assert common.load_summary(str(tmp_path)) == {"student_epochs": 3}
