"""The benchmark's tiny preset end to end (what CI runs), and the numbers it derives."""

from __future__ import annotations

import json
import time

import benchmark  # experiments/ is on pytest's pythonpath (pyproject.toml)
import numpy as np
import pytest

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane


@pytest.fixture(scope="module")
def tiny_rows(tmp_path_factory) -> tuple[list[dict], str]:
    pytest.importorskip("torch")  # the tiny preset times the PyTorch baseline too
    out = str(tmp_path_factory.mktemp("bench") / "bench.json")
    rows = benchmark.run(benchmark.TINY)
    benchmark.write_outputs(rows, out)
    return rows, out


def test_matmul_peak_counts_2n3_flops():
    peak = benchmark.matmul_peak(64, "float32", repeats=2)
    assert peak["flops"] == 2 * 64**3
    assert peak["flops_per_s"] > 0


def test_one_row_per_case_t_batch_dtype_variant(tiny_rows):
    rows, _ = tiny_rows
    keys = [(r["case"], r["time_steps"], r["batch"], r["dtype"], r["variant"]) for r in rows]
    expected = [("teacher", None, 4, "float32", "default")]  # no spikes: no pack_spikes variants
    expected += [("idsnn", 2, 4, "float32", v) for v in ("default", "both")]
    assert keys == expected
    for r in rows:
        assert r["error"] is None and r["torch_error"] is None
        assert r["machine"]["platform"] == "cpu" and r["machine"]["torch"]


def test_speed_numbers_are_consistent(tiny_rows):
    rows, _ = tiny_rows
    for r in rows:
        assert r["step_s_min"] <= r["step_s_median"] <= r["step_s_max"]
        assert r["images_per_s"] == pytest.approx(r["batch"] / r["step_s_median"])
        assert r["steps_per_call"] == 1
        assert r["torch_step_s_median"] > 0 and r["torch_max_memory_bytes"] is None  # CPU
        assert r["torch_mode"] == "eager" and r["torch_threads"] >= 1
        assert r["torch_images_per_s"] == pytest.approx(r["batch"] / r["torch_step_s_median"])
        assert r["ours_vs_torch"] == pytest.approx(r["images_per_s"] / r["torch_images_per_s"])
        assert r["flops_per_s"] == pytest.approx(r["flops"] / r["step_s_median"])
        peak = r["matmul_peak"]["flops_per_s"] * r["devices"]
        assert r["peak_fraction"] == pytest.approx(r["flops_per_s"] / peak)


def test_memory_options_save_memory(tiny_rows):
    rows, _ = tiny_rows
    by_key = {(r["case"], r["time_steps"], r["variant"]): r for r in rows}
    both, default = by_key["idsnn", 2, "both"], by_key["idsnn", 2, "default"]
    assert 0 < both["compiled_peak_bytes"] < default["compiled_peak_bytes"]
    assert both["compiled_temp_bytes"] < default["compiled_temp_bytes"]
    # The student's step (with the teacher's forward) does more work than the teacher's own.
    assert default["flops"] > by_key["teacher", None, "default"]["flops"]


def test_outputs_written(tiny_rows):
    rows, out = tiny_rows
    with open(out) as f:
        assert len(json.load(f)) == len(rows)
    with open(out.replace(".json", ".md")) as f:
        table = f.read().splitlines()
    assert table[0].startswith("| case | T |") and len(table) == 2 + len(rows)
    with open(out.replace(".json", ".png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_time_alternating_takes_turns():
    calls = []
    contenders = {
        name: benchmark.Contender(lambda n=name: calls.append(n), 1, lambda _: None, {})
        for name in ("a", "b")
    }
    times = benchmark.time_alternating(contenders, steps=3, chunk=2)
    assert calls == ["a", "a", "b", "b", "a", "b"]
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3}
    assert all(np.isfinite(v).all() for v in times.values())


def test_speed_is_per_train_step():
    """A unit of k steps (our scan) is timed whole; rows report seconds per train step."""
    speed = benchmark._speed([2.0, 4.0, 3.0], steps_per_unit=2, batch=8)
    assert speed["step_s_median"] == 1.5 and speed["step_s_min"] == 1.0
    assert speed["step_s_max"] == 2.0 and speed["images_per_s"] == pytest.approx(8 / 1.5)


def test_a_group_that_would_end_past_the_deadline_is_skipped(monkeypatch):
    """The first group is measured; the next would end past the deadline (judged by the
    longest group so far), so its rows say so; the last is done already; `on_rows` sees the
    rows after each group."""

    def measure(s, g, mesh, peak, ours):
        time.sleep(0.05)
        return [benchmark._row(s, g, v, k, error=None) for v, k in ours]

    monkeypatch.setattr(benchmark, "measure_group", measure)
    monkeypatch.setattr(benchmark, "matmul_peak", lambda n, dtype: {"flops_per_s": 1.0})
    s = benchmark.Settings(
        cases=("idsnn",), time_steps=(1, 2, 3), batch=(4,), dtypes=("float32",),
        variants=("default",), steps_per_call=(1, 8), deadline_s=0.04,
    )  # fmt: skip
    seen = []
    done = [("idsnn", 3, 4, "float32", "default", k) for k in (1, 8)]
    rows = benchmark.run(s, done, on_rows=lambda so_far: seen.append(len(so_far)))
    assert [(r["time_steps"], r["steps_per_call"], r["error"]) for r in rows] == [
        (1, 1, None), (1, 8, None), (2, 1, benchmark.SKIPPED), (2, 8, benchmark.SKIPPED)
    ]  # fmt: skip
    assert seen == [2, 4]


def test_resume_keeps_only_measured_rows(tmp_path):
    measured = {"case": "idsnn", "time_steps": 4, "batch": 64, "dtype": "bfloat16", "error": None}
    measured |= {"variant": "both", "steps_per_call": 8}
    skipped = {**measured, "time_steps": 6, "error": benchmark.SKIPPED}
    out = str(tmp_path / "bench.json")
    assert benchmark.measured_rows(out) == []
    benchmark.write_json([measured, skipped], out)
    kept = benchmark.measured_rows(out)
    assert kept == [measured]
    assert benchmark.row_key(kept[0]) == ("idsnn", 4, 64, "bfloat16", "both", 8)
