"""Throughput of the sharded train step (images/s), steady state after compilation.

Times the exact step `idsnn_jax.train.fit` runs (`idsnn_jax.steps`: augmentation, forward,
teacher forward with `--distill`, backward, cross-device mean, SGD with weight decay) on
random uint8 data, for each model in `--models`, and prints a table; `--json` also writes
the rows.

  python experiments/benchmark_train_step.py --models=resnet34,spiking_resnet18 \
      --width=0.125 --image=28,28,1 --batch=64 --steps=20 --json=experiments/results/bench.json
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np
from absl import app, flags

from idsnn_jax import datasets, steps
from idsnn_jax.models import create_model, is_spiking

_MODELS = flags.DEFINE_list("models", ["resnet34", "spiking_resnet18"], "Models to time.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Width multiplier.")
_IMAGE = flags.DEFINE_list("image", ["32", "32", "3"], "H,W,C.")
_BATCH = flags.DEFINE_integer("batch", 64, "Global batch size.")
_STEPS = flags.DEFINE_integer("steps", 20, "Timed steps (after 2 warm-up steps).")
_TIME_STEPS = flags.DEFINE_integer("time_steps", 4, "T for spiking models.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_DISTILL = flags.DEFINE_bool(
    "distill",
    False,
    "Time spiking models with distillation (from a resnet34 teacher of the same width).",
)
_JSON = flags.DEFINE_string("json", None, "Write the rows here as JSON.")


def _build(name: str, info: datasets.DatasetInfo, dtype) -> tuple:
    kwargs = dict(
        num_classes=info.num_classes, width=_WIDTH.value, dtype=dtype, bn_axis_name=steps.AXIS
    )
    if is_spiking(name):
        kwargs["time_steps"] = _TIME_STEPS.value
    model = create_model(name, **kwargs)
    return model, steps.init_variables(model, info, 0)


def time_model(name: str) -> dict:
    h, w, c = (int(v) for v in _IMAGE.value)
    info = datasets.DatasetInfo("random", 10, (h, w, c), (0.5,) * c, (0.25,) * c)
    dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[_DTYPE.value]
    model, variables = _build(name, info, dtype)
    mesh = steps.create_mesh()
    tx, _ = steps.create_optimizer(steps.OptimizerOptions(), steps_per_epoch=1, num_epochs=1)
    teacher = _build("resnet34", info, dtype) if is_spiking(name) and _DISTILL.value else None
    step = steps.make_train_step(model, tx, info, teacher=None if teacher is None else teacher[0])
    train_fn = steps.compile_train_step(mesh, step)
    state = steps.replicate(steps.create_train_state(variables, tx, 0), mesh)
    teacher_vars = steps.replicate(teacher[1] if teacher else {}, mesh)
    rng = np.random.default_rng(0)
    batch = {
        "image": rng.integers(0, 256, (_BATCH.value, h, w, c), dtype=np.uint8),
        "label": rng.integers(0, 10, (_BATCH.value,), dtype=np.int32),
    }
    batch = steps.shard_batch(batch, mesh)
    start = time.perf_counter()
    state, metrics = train_fn(state, batch, teacher_vars)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    state, metrics = train_fn(state, batch, teacher_vars)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
        state, metrics = train_fn(state, batch, teacher_vars)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - start
    return {
        "model": name,
        "distill": teacher is not None,
        "width": _WIDTH.value,
        "image": f"{h}x{w}x{c}",
        "time_steps": _TIME_STEPS.value if is_spiking(name) else 1,
        "batch": _BATCH.value,
        "dtype": _DTYPE.value,
        "devices": jax.device_count(),
        "platform": jax.devices()[0].platform,
        "compile_s": round(compile_s, 2),
        "step_ms": round(1000 * seconds / _STEPS.value, 2),
        "images_per_s": round(_STEPS.value * _BATCH.value / seconds, 1),
    }


def main(argv: list[str]) -> None:
    del argv
    rows = [time_model(name) for name in _MODELS.value]
    keys = list(rows[0])
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
