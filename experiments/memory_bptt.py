"""Training memory and step time of the Spiking ResNet with the memory-saving gradient options.

For each T in `--time_steps` and each variant (default, remat, pack_spikes, both: exact BPTT;
sltt: the online gradient of `idsnn_jax.sltt`, the temporal path cut), compiles
the gradient of the train-mode CE loss (BatchNorm in train mode, new batch statistics out)
with `jax.jit(...).lower(...).compile()` and reads XLA's `memory_analysis()`: temp (the
activations kept for the backward pass and scratch), argument and output bytes. Peak is
reported as temp + arguments + outputs. Then times a few steps after a warm-up (median).
The default of each T is the baseline of the ratios, measured in the same run.

Also reported, independent of any compiler: the bytes of the residuals JAX keeps for the
backward pass (`saved_residuals`, parameters and inputs excluded), the memory that grows
with T. XLA's own numbers depend on its scheduler: XLA:CPU's default (concurrency-optimized)
scheduler allocates every `lax.scan` output buffer at the program start, and its CSE folds
`nn.remat`'s recomputation back into the forward pass, so `remat` alone saves nothing there.

  python experiments/memory_bptt.py --width=0.25 --batch=16 --time_steps=4,6 \
      --out=experiments/results/memory_bptt_cpu.json
  python experiments/memory_bptt.py --width=0.25 --batch=16 --time_steps=2,4,6,8,16 \
      --variants=default,both,sltt,sltt_pack_spikes --steps=3 \
      --out=experiments/results/memory_sltt_cpu.json

The second also writes a plot (peak memory and step time against T) beside the JSON (.png).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags

from idsnn_jax import sltt
from idsnn_jax.models import create_model

_MODEL = flags.DEFINE_string("model", "spiking_resnet18", "Spiking model name.")
_WIDTH = flags.DEFINE_float("width", 0.25, "Width multiplier.")
_BATCH = flags.DEFINE_integer("batch", 16, "Batch size.")
_IMAGE = flags.DEFINE_list("image", ["32", "32", "3"], "H,W,C.")
_CLASSES = flags.DEFINE_integer("num_classes", 100, "Classes.")
_TIME_STEPS = flags.DEFINE_list("time_steps", ["4", "6"], "Values of T.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["default", "remat", "pack_spikes", "both"], "Variants to measure."
)
_POLICY = flags.DEFINE_string("remat_policy", "nothing_saveable", "resnet.REMAT_POLICIES key.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after one warm-up step).")
_OUT = flags.DEFINE_string(
    "out", "experiments/results/memory_bptt_cpu.json", "Write the rows here as JSON."
)

VARIANTS = {
    "default": {},
    "remat": {"remat": True},
    "pack_spikes": {"pack_spikes": True},
    "both": {"remat": True, "pack_spikes": True},
    # SLTT's gradient (`sltt.value_and_grad`) of the default model, and with spikes packed.
    "sltt": {},
    "sltt_pack_spikes": {"pack_spikes": True},
}


def measure(time_steps: int, variant: str) -> dict:
    """Compiled memory (bytes) and median step time (s) of one configuration."""
    h, w, c = (int(v) for v in _IMAGE.value)
    kwargs = dict(VARIANTS[variant])
    if kwargs.get("remat"):
        kwargs["remat_policy"] = _POLICY.value
    model = create_model(
        _MODEL.value,
        num_classes=_CLASSES.value,
        width=_WIDTH.value,
        time_steps=time_steps,
        **kwargs,
    )
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(_BATCH.value, h, w, c)).astype(np.float32))
    labels = jnp.asarray(rng.integers(0, _CLASSES.value, _BATCH.value))
    variables = jax.jit(model.init)(jax.random.key(0), images)

    grad_fn, loss_fn = _grad_fn(model, variant)
    args = (variables["params"], variables["batch_stats"], images, labels)
    t0 = time.perf_counter()
    compiled = grad_fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    residual_bytes = None if variant.startswith("sltt") else _residual_bytes(loss_fn, args)
    times = _step_times(compiled, args)
    temp = int(mem.temp_size_in_bytes)
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    return {
        "model": _MODEL.value,
        "variant": variant,
        "remat_policy": _POLICY.value if kwargs.get("remat") else None,
        "time_steps": time_steps,
        "width": _WIDTH.value,
        "batch": _BATCH.value,
        "image": [h, w, c],
        "num_classes": _CLASSES.value,
        "temp_bytes": temp,
        "argument_bytes": arg,
        "output_bytes": out,
        "peak_bytes": temp + arg + out,
        "jax_residual_bytes": residual_bytes,
        "compile_s": compile_s,
        "step_s_median": statistics.median(times),
        "step_s_all": times,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores visible",
    }


def _grad_fn(model, variant: str):
    """(jitted (params, batch_stats, x, y) -> ((loss, new stats), grads), the BPTT loss
    function): the CE gradient by BPTT, or by SLTT for the sltt variants."""

    def loss_fn(params, batch_stats, x, y):
        logits, updated = model.apply(
            {"params": params, "batch_stats": batch_stats}, x, train=True, mutable=["batch_stats"]
        )
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, updated["batch_stats"]

    if not variant.startswith("sltt"):
        return jax.jit(jax.value_and_grad(loss_fn, has_aux=True)), loss_fn

    def online(params, batch_stats, x, y):
        objective = lambda z: optax.softmax_cross_entropy_with_integer_labels(z, y).mean()
        (loss, (_, stats)), grads = sltt.value_and_grad(model, objective, params, batch_stats, x)
        return (loss, stats), grads

    return jax.jit(online), loss_fn


def _step_times(compiled, args) -> list[float]:
    """Seconds of each of `--steps` calls, after one warm-up call."""
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(_STEPS.value):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return times


def _residual_bytes(loss_fn, args) -> int | None:
    """Bytes of what the forward pass keeps for the backward (not arguments)."""
    try:
        from jax._src.ad_checkpoint import saved_residuals  # private; trace only, no FLOPs
    except ImportError:
        return None
    residuals = saved_residuals(lambda *a: loss_fn(*a)[0], *args)
    return sum(aval.size * aval.dtype.itemsize for aval, src in residuals if "argument" not in src)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f}"


def main(argv: list[str]) -> None:
    del argv
    rows = []
    for t in (int(v) for v in _TIME_STEPS.value):
        base = None
        for variant in _VARIANTS.value:
            row = measure(t, variant)
            if variant == "default":
                base = row
            if base is not None:
                row["peak_vs_default"] = row["peak_bytes"] / base["peak_bytes"]
                row["temp_vs_default"] = row["temp_bytes"] / base["temp_bytes"]
                row["throughput_vs_default"] = base["step_s_median"] / row["step_s_median"]
                if row["jax_residual_bytes"] and base["jax_residual_bytes"]:
                    row["residual_vs_default"] = (
                        row["jax_residual_bytes"] / base["jax_residual_bytes"]
                    )
            rows.append(row)
            print(f"T={t} {variant}: peak {_mib(row['peak_bytes'])} MiB", flush=True)
    header = (
        "| T | variant | temp MiB | args MiB | out MiB | peak MiB | peak vs default "
        "| step s (median) | throughput vs default | JAX residuals MiB | residuals vs default |"
    )
    print(header)
    print("|" + "---|" * 11)
    for r in rows:
        pv = f"{r['peak_vs_default']:.3f}x" if "peak_vs_default" in r else "-"
        tv = f"{r['throughput_vs_default']:.3f}x" if "throughput_vs_default" in r else "-"
        rb = r["jax_residual_bytes"]
        rv = f"{r['residual_vs_default']:.3f}x" if "residual_vs_default" in r else "-"
        print(
            f"| {r['time_steps']} | {r['variant']} | {_mib(r['temp_bytes'])} "
            f"| {_mib(r['argument_bytes'])} | {_mib(r['output_bytes'])} "
            f"| {_mib(r['peak_bytes'])} | {pv} | {r['step_s_median']:.3f} | {tv} "
            f"| {'-' if rb is None else _mib(rb)} | {rv} |"
        )
    if _OUT.value:
        os.makedirs(os.path.dirname(_OUT.value) or ".", exist_ok=True)
        with open(_OUT.value, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {_OUT.value}")
        if len({r["time_steps"] for r in rows}) > 2:
            plot(rows, os.path.splitext(_OUT.value)[0] + ".png")


def plot(rows: list[dict], path: str) -> None:
    """Compiled peak (MiB) and median step time (s) against T, a line per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(11, 4.5))
    for variant in dict.fromkeys(r["variant"] for r in rows):
        mine = sorted((r for r in rows if r["variant"] == variant), key=lambda r: r["time_steps"])
        ts = [r["time_steps"] for r in mine]
        ax_mem.plot(ts, [r["peak_bytes"] / 2**20 for r in mine], "o-", label=variant)
        ax_time.plot(ts, [r["step_s_median"] for r in mine], "o-", label=variant)
    ax_mem.set(xlabel="T", ylabel="MiB", title="compiled peak (XLA temp + args + outputs)")
    ax_time.set(xlabel="T", ylabel="s", title="gradient step, median")
    for ax in (ax_mem, ax_time):
        ax.legend()
        ax.grid(alpha=0.3)
    r = rows[0]
    fig.suptitle(
        f"{r['model']} width {r['width']}, batch {r['batch']}, {r['image']}, "
        f"{r['device']} ({r['machine']})",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(main)
