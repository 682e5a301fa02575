"""The GPU estimate's tiny preset end to end (what CI runs) and its arithmetic, by hand."""

from __future__ import annotations

import json
import math

import gpu_estimate as ge  # experiments/ is on pytest's pythonpath (pyproject.toml)
import gpu_lowering as gl
import jax
import jax.numpy as jnp
import pytest


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, str]:
    out = str(tmp_path_factory.mktemp("estimate") / "estimate.json")
    result = ge.run(ge.TINY)
    ge.write(result, out)
    return result, out


def test_one_row_per_stage_step_and_size(tiny):
    result, _ = tiny
    keys = [(r["stage"], r["step"], r["time_steps"], r["batch"]) for r in result["steps"]]
    assert keys == [
        ("teacher", "train", None, 16),
        ("teacher", "eval", None, 16),
        ("student", "train", 2, 16),
        ("student", "eval", 2, 16),
    ]
    for r in result["steps"]:
        assert r["flops"] > 0 and r["bytes_unfused"] > 0 and r["bytes_fused"] is None
    train = {r["stage"]: r["flops"] for r in result["steps"] if r["step"] == "train"}
    assert train["student"] > train["teacher"]  # T=2 student + the teacher's forward


def test_roofline_by_hand(tiny):
    result, _ = tiny
    peak, bandwidth = ge.H100["bf16_flops_per_s"], ge.H100["hbm_bytes_per_s"]
    for r in result["steps"]:
        compute, memory = r["flops"] / peak, r["bytes_unfused"] / bandwidth  # no CPU compile
        assert (r["seconds_compute_100"], r["seconds_memory_100"]) == (compute, memory)
        assert r["seconds_100"] == pytest.approx(max(compute, memory))
        assert r["bound"] == ("compute" if compute >= memory else "memory")
        assert r["seconds_achievable"] == pytest.approx(r["seconds_100"] / 0.2)
        assert r["images_per_s_100"] == pytest.approx(r["batch"] / r["seconds_100"])


def test_recipe_hours_by_hand(tiny):
    result, _ = tiny
    (row,) = result["recipe"]
    t = {(r["stage"], r["step"]): r["seconds_100"] for r in result["steps"]}
    epoch = lambda stage: (
        50_000 // 16 * t[stage, "train"] + math.ceil(10_000 / 16) * t[stage, "eval"]
    )
    assert row["hours_100"] == pytest.approx(
        (200 * epoch("teacher") + 200 * epoch("student")) / 3600
    )
    assert row["hours_achievable"] == pytest.approx(row["hours_100"] / 0.2)


def test_outputs_are_labelled_estimates(tiny):
    result, out = tiny
    with open(out) as f:
        saved = json.load(f)
    assert saved["estimate"].startswith("on paper") and "datasheet" in saved["hardware"]["source"]
    assert saved["bytes_from"].startswith("unfused") and len(saved["steps"]) == 4
    with open(out.replace(".json", ".md")) as f:
        text = f.read()
    assert text.startswith("# Estimate, not a measurement")
    assert (
        "| stage | step | T | batch | GFLOP |" in text and "| T | batch | hours at 100% |" in text
    )


def test_cost_counts_flops_of_the_cuda_lowering_and_fused_bytes_of_a_cpu_compile():
    a = jax.ShapeDtypeStruct((64, 64), jnp.bfloat16)
    step = gl.Step("matmul", jax.jit(jnp.matmul), (a, a))
    cost = ge.cost(step, step)
    assert cost["flops"] == 2 * 64**3 and cost["bytes_unfused"] == 3 * 64 * 64 * 2  # 2 in, 1 out
    # XLA:CPU multiplies bfloat16 in float32: converts in and out, more FLOPs and bytes.
    assert cost["flops_cpu"] >= cost["flops"] and cost["bytes_fused"] > cost["bytes_unfused"]
