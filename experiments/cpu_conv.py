"""CPU speed of the student's convs and LIF loop: XLA's conv vs im2col + one matmul, and the
LIF scan unrolled or not, per layer and for the whole Spiking ResNet18 train step.

Can the SGD step on a CPU go faster with the 3x3 conv written as patches + one matmul (im2col)
instead of `lax.conv_general_dilated`, or with the LIF time loop unrolled? The im2col conv is a
`jax.custom_vjp` whose backward is patches + matmuls too (dW = patches^T @ g, patches
recomputed; dX = the im2col conv of g, dilated by the stride, with the flipped, transposed
kernel), checked against XLA's conv before anything is timed. It lives here, not in the model,
because it lost: on jaxlib 0.10.2 XLA:CPU hands convs to YNNPACK, which never materializes the
9x patches, and im2col ran at 0.2-0.9x its GFLOP/s per layer and took 1.38x the CPU time (and
3x the temp memory) per step. Unrolling the LIF loop won (8% less CPU time, 46% less temp
memory at T=4) and is `lif_scan`'s default. Numbers: `experiments/results/cpu_conv.json`.

1. Per layer (batch `--batch`, float32): GFLOP/s of forward, forward + input gradient and
   forward + weight gradient (each gradient counted as one more conv of FLOPs), XLA vs
   im2col, for 3x3 stride 1 at 32x32x64 -> 64 and 16x16x128 -> 128, and 3x3 stride 2 at
   32x32x64 -> 128.
2. Whole train step (`steps.make_train_step`, CE, SGD; width 1, T=4, batch 16, 32x32x3, 100
   classes): wall and process CPU time per step for conv in {xla, im2col} x LIF unroll in
   {on, off}, plus XLA's compiled temp memory. On a shared machine the CPU time (all threads)
   is the steadier number; wall time moves with the other processes.

Every alternative is timed interleaved (A, B, A, B, ...) in one process; medians over rounds.

  python experiments/cpu_conv.py --rounds=5 --step_rounds=5 --json=experiments/results/cpu_conv.json
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.sharding import PartitionSpec as P

from idsnn_jax import datasets, neuron, optim, steps
from idsnn_jax.models import create_model

resnet = importlib.import_module("idsnn_jax.models.resnet")
spiking_resnet = importlib.import_module("idsnn_jax.models.spiking_resnet")

_BATCH = flags.DEFINE_integer("batch", 64, "Per-layer batch (T * B of the student's step).")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved rounds per layer measurement.")
_STEP_ROUNDS = flags.DEFINE_integer("step_rounds", 5, "Interleaved rounds of the train step.")
_STEP_BATCH = flags.DEFINE_integer("step_batch", 16, "Train-step batch B.")
_TIME_STEPS = flags.DEFINE_integer("time_steps", 4, "T of the student.")
_WIDTH = flags.DEFINE_float("width", 1.0, "Student width multiplier.")
_JSON = flags.DEFINE_string("json", None, "Write the results here as JSON.")

# (H, W, C_in, C_out, stride) of the 3x3 layers timed one by one.
LAYERS = ((32, 32, 64, 64, 1), (16, 16, 128, 128, 1), (32, 32, 64, 128, 2))
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------------------
# The two convolutions: NHWC x HWIO, symmetric padding, no bias.


def xla_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """What `nn.Conv` computes: `lax.conv_general_dilated`, (N, H, W, Ci) -> (N, Ho, Wo, Co)."""
    pad = ((padding, padding), (padding, padding))
    return jax.lax.conv_general_dilated(
        x, kernel, (strides, strides), pad, dimension_numbers=_DIMENSIONS
    )


def patches(x: jax.Array, kh: int, kw: int, strides: int, padding: int) -> jax.Array:
    """(N, H, W, C) -> (N, Ho, Wo, kh * kw * C): each output pixel's receptive field, taps
    ordered (i, j, c) like an HWIO kernel flattened over its first three axes."""
    h, w = x.shape[1:3]
    ho, wo = (h + 2 * padding - kh) // strides + 1, (w + 2 * padding - kw) // strides + 1
    pads = ((0, 0, 0), (padding, padding, 0), (padding, padding, 0), (0, 0, 0))
    xp = jax.lax.pad(x, jnp.zeros((), x.dtype), pads)
    cols = [
        xp[:, i : i + strides * (ho - 1) + 1 : strides, j : j + strides * (wo - 1) + 1 : strides]
        for i in range(kh)
        for j in range(kw)
    ]
    return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)


def _patch_matmul(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    kh, kw, _, co = kernel.shape
    cols = patches(x, kh, kw, strides, padding)
    y = cols.reshape((-1, cols.shape[-1])) @ kernel.reshape((-1, co))
    return y.reshape((*cols.shape[:3], co))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_conv(x: jax.Array, kernel: jax.Array, strides: int, padding: int) -> jax.Array:
    """`xla_conv` as patches + one matmul, with a backward of patches + matmuls."""
    return _patch_matmul(x, kernel, strides, padding)


def _im2col_fwd(x, kernel, strides, padding):
    return _patch_matmul(x, kernel, strides, padding), (x, kernel)


def _im2col_bwd(strides, padding, res, g):
    """dW = patches(x)^T @ g (patches recomputed, not kept); dX = the stride-1 im2col conv
    of g dilated by the stride and padded by (k - 1 - padding) before, with the kernel
    flipped in space and transposed in channels (`lax.pad` crops where that is negative)."""
    x, kernel = res
    kh, kw, ci, co = kernel.shape
    cols = patches(x, kh, kw, strides, padding).reshape((-1, kh * kw * ci))
    d_kernel = (cols.T @ g.reshape((-1, co))).reshape(kernel.shape)
    (h, w), (ho, wo) = x.shape[1:3], g.shape[1:3]
    pads = (
        (0, 0, 0),
        (kh - 1 - padding, h + padding - strides * (ho - 1) - 1, strides - 1),
        (kw - 1 - padding, w + padding - strides * (wo - 1) - 1, strides - 1),
        (0, 0, 0),
    )
    g_full = jax.lax.pad(g, jnp.zeros((), g.dtype), pads)
    flipped = jnp.flip(kernel, (0, 1)).transpose((0, 1, 3, 2))
    return _patch_matmul(g_full, flipped, 1, 0), d_kernel


im2col_conv.defvjp(_im2col_fwd, _im2col_bwd)

CONVS: dict[str, Callable[..., jax.Array]] = {"xla": xla_conv, "im2col": im2col_conv}


def check_im2col() -> None:
    """Raises AssertionError unless `im2col_conv`'s output, dX and dW equal XLA's (float32
    tolerance) for 3x3 and 1x1 kernels, strides 1 and 2, even and odd sizes, paddings 0-3."""
    cases = [(3, 1, 1, 8), (3, 2, 1, 8), (3, 2, 1, 7), (3, 1, 3, 6), (3, 2, 0, 9), (3, 2, 2, 7)]
    cases += [(1, 1, 0, 8), (1, 2, 0, 8), (1, 2, 0, 7)]
    keys = jax.random.split(jax.random.key(0), 3)
    for k, s, p, h in cases:
        x = jax.random.normal(keys[0], (2, h, h + 1, 3))
        kernel = jax.random.normal(keys[1], (k, k, 3, 5))
        outs = []
        for conv in CONVS.values():
            y, vjp = jax.vjp(functools.partial(conv, strides=s, padding=p), x, kernel)
            outs.append((y, *vjp(jax.random.normal(keys[2], y.shape))))
        for name, a, b in zip(("y", "dx", "dw"), *outs, strict=True):
            err = float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-12))
            assert a.shape == b.shape and err < 1e-5, (k, s, p, h, name, a.shape, b.shape, err)


# ----------------------------------------------------------------------------------------
# Timing helpers.


def _seconds(fn: Callable, args: tuple, reps: int) -> tuple[float, float]:
    """(wall, process CPU) seconds per call of `fn(*args)`, averaged over `reps` calls."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - wall) / reps, (time.process_time() - cpu) / reps


def interleaved(fns: dict[str, tuple[Callable, tuple]], rounds: int, reps: int) -> dict:
    """{name: [(wall, cpu), ...]}: each round calls every alternative once, in turn."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            times[name].append(_seconds(fn, args, reps))
    return times


def _median(samples: list[tuple[float, float]], i: int) -> float:
    return statistics.median(s[i] for s in samples)


# ----------------------------------------------------------------------------------------
# 1. Per layer.


def _layer_fn(conv: Callable, mode: str, strides: int) -> Callable:
    """jit of the conv's forward (`fwd`), or forward with its dX (`fwd+dx`) or dW (`fwd+dw`)
    for a given output gradient; the forward output is returned too, so it is computed."""
    f = functools.partial(conv, strides=strides, padding=1)
    if mode == "fwd":
        return jax.jit(lambda x, k, g: f(x, k))
    argnum = {"fwd+dx": 0, "fwd+dw": 1}[mode]

    def with_grad(x, k, g):
        y, vjp = jax.vjp(f, x, k)
        return y, vjp(g)[argnum]

    return jax.jit(with_grad)


def time_layers() -> list[dict]:
    """One row per (layer, mode): median GFLOP/s of XLA and im2col, timed interleaved."""
    rows = []
    n = _BATCH.value
    for h, w, ci, co, s in LAYERS:
        keys = jax.random.split(jax.random.key(1), 3)
        x = jax.random.normal(keys[0], (n, h, w, ci))
        k = jax.random.normal(keys[1], (3, 3, ci, co))
        g = jax.random.normal(keys[2], (n, h // s, w // s, co))
        conv_flops = 2 * n * (h // s) * (w // s) * co * 9 * ci
        for mode in ("fwd", "fwd+dx", "fwd+dw"):
            fns = {name: (_layer_fn(conv, mode, s), (x, k, g)) for name, conv in CONVS.items()}
            for fn, args in fns.values():
                jax.block_until_ready(fn(*args))
            times = interleaved(fns, _ROUNDS.value, reps=3)
            flops = conv_flops * (1 if mode == "fwd" else 2)
            row = {"layer": f"3x3 s{s} {h}x{w}x{ci}->{co}", "mode": mode, "batch": n}
            for name, samples in times.items():
                row[f"{name}_gflops"] = round(flops / _median(samples, 0) / 1e9, 1)
            row["im2col_speedup"] = round(row["im2col_gflops"] / row["xla_gflops"], 2)
            rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# 2. Whole train step.


def _conv_factory(conv: Callable) -> Callable:
    """`resnet.conv` (same module, parameter and init) with `conv` as the convolution."""

    def flax_conv(lhs, rhs, window_strides, padding, **unused):  # how `nn.Conv` calls it
        return conv(lhs, rhs, window_strides[0], padding[0][0])

    def factory(features, kernel=3, strides=1, padding=None, *, name, dtype=jnp.float32):
        pad = kernel // 2 if padding is None else padding
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=strides,
            padding=((pad, pad), (pad, pad)),
            use_bias=False,
            dtype=dtype,
            kernel_init=resnet.torch_default_init,
            name=name,
            conv_general_dilated=flax_conv,
        )

    return factory


@contextlib.contextmanager
def model_variant(conv: str, unroll: bool) -> Iterator[None]:
    """While active, models are built (and traced) with `conv` and LIF `unroll`."""
    saved = resnet.conv, spiking_resnet.lif_scan
    if conv != "xla":
        resnet.conv = _conv_factory(CONVS[conv])
    spiking_resnet.lif_scan = functools.partial(neuron.lif_scan, unroll=True if unroll else 1)
    try:
        yield
    finally:
        resnet.conv, spiking_resnet.lif_scan = saved


def build_step(info: datasets.DatasetInfo) -> dict:
    """The compiled student train step (one device) with its state and a random batch."""
    model = create_model(
        "spiking_resnet18",
        num_classes=info.num_classes,
        width=_WIDTH.value,
        time_steps=_TIME_STEPS.value,
        bn_axis_name=steps.AXIS,
    )
    variables = steps.init_variables(model, info, 0)
    tx, _ = optim.create_optimizer(optim.OptimizerOptions(), steps_per_epoch=1, num_epochs=1)
    mesh = steps.create_mesh(jax.devices()[:1])
    mapped = jax.shard_map(
        steps.make_train_step(model, tx, info),
        mesh=mesh,
        in_specs=(P(), P(steps.AXIS), P()),
        out_specs=P(),
        check_vma=False,
    )
    rng = np.random.default_rng(0)
    b, shape = _STEP_BATCH.value, info.image_shape
    batch = {
        "image": rng.integers(0, 256, (b, *shape), dtype=np.uint8),
        "label": rng.integers(0, info.num_classes, (b,), dtype=np.int32),
    }
    args = (
        steps.replicate(steps.create_train_state(variables, tx, 0), mesh),
        steps.shard_batch(batch, mesh),
        steps.replicate({}, mesh),
    )
    start = time.perf_counter()
    compiled = jax.jit(mapped).lower(*args).compile()
    compile_s = time.perf_counter() - start
    state, metrics = compiled(*args)  # warm-up
    return {
        "fn": compiled,
        "args": (state, *args[1:]),
        "loss": float(metrics["loss"]),
        "params": jax.tree.map(jnp.shape, variables["params"]),
        "compile_s": compile_s,
        "temp_bytes": compiled.memory_analysis().temp_size_in_bytes,
    }


def time_train_step() -> list[dict]:
    """One row per (conv, unroll) variant of the train step, timed interleaved."""
    info = datasets.DatasetInfo("random", 100, (32, 32, 3), (0.5,) * 3, (0.25,) * 3)
    built = {}
    for conv in CONVS:
        for unroll in (True, False):
            with model_variant(conv, unroll):
                built[(conv, unroll)] = build_step(info)
    base = built[("xla", True)]
    for key, entry in built.items():
        # The same model: the same parameter tree, and the first step's loss agrees up to the
        # few near-threshold spikes that another summation order flips in a deep SNN.
        assert entry["params"] == base["params"], key
        assert abs(entry["loss"] - base["loss"]) < 1e-2 * abs(base["loss"]), (key, entry["loss"])
    # Each call is one SGD step from the same state (no donation): the same work each time.
    fns = {key: (entry["fn"], entry["args"]) for key, entry in built.items()}
    times = interleaved(fns, _STEP_ROUNDS.value, reps=2)
    baseline = _median(times[("xla", True)], 1)
    rows = []
    for (conv, unroll), samples in times.items():
        row = {
            "conv": conv,
            "lif_unroll": unroll,
            "step_ms_wall_median": round(1e3 * _median(samples, 0), 1),
            "step_ms_cpu_median": round(1e3 * _median(samples, 1), 1),
            "step_ms_wall_all": [round(1e3 * s[0], 1) for s in samples],
            "step_ms_cpu_all": [round(1e3 * s[1], 1) for s in samples],
            "cpu_vs_xla_unrolled": round(_median(samples, 1) / baseline, 3),
            "temp_mib": round(built[(conv, unroll)]["temp_bytes"] / 2**20, 1),
            "compile_s": round(built[(conv, unroll)]["compile_s"], 1),
        }
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    """Prints `rows` as a plain table (lists of samples left out)."""
    keys = [k for k in rows[0] if not k.endswith("_all")]
    print(" | ".join(keys))
    for row in rows:
        print(" | ".join(str(row[k]) for k in keys))
    print(flush=True)


def main(argv: list[str]) -> None:
    del argv
    check_im2col()
    load_before = os.getloadavg()[0]
    layers = time_layers()
    print_table(layers)
    train_steps = time_train_step()
    print_table(train_steps)
    result = {
        "setting": {
            "step": f"spiking_resnet18 width {_WIDTH.value}, T={_TIME_STEPS.value}, "
            f"batch {_STEP_BATCH.value}, 32x32x3, 100 classes, float32, CE, SGD",
            "layer_batch": _BATCH.value,
            "rounds": _ROUNDS.value,
            "step_rounds": _STEP_ROUNDS.value,
        },
        "machine": {
            "backend": jax.default_backend(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "jax": jax.__version__,
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "loadavg_1min_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        },
        "layers": layers,
        "train_step": train_steps,
    }
    if _JSON.value:
        os.makedirs(os.path.dirname(_JSON.value) or ".", exist_ok=True)
        with open(_JSON.value, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
