"""Train-step speed and memory of IDSNN in JAX, side by side with a PyTorch baseline.

Cases: `teacher` (the ResNet34 teacher's own step, CE) and `idsnn` (Spiking ResNet18 student,
KD against a frozen ResNet34 teacher forward), over T, batch, dtype and the memory variants of
`create_model` (`remat`, `pack_spikes`, both; the teacher has no spikes, so it gets only the
variants without `pack_spikes`), and steps per dispatch (`--steps_per_call=1,8`: a row each).
Our step is the one training runs (`idsnn_jax.steps`:
augmentation, forward(s), backward, cross-device mean, SGD) on random uint8 data, compiled
once (`.lower().compile()`, whose `memory_analysis()` and `cost_analysis()` give per-device
memory and FLOPs). With `--torch`, the PyTorch baseline (`torch_reference.py`, the reference
code's structure, loaded with the same weights, given normalized float images) is timed in
the same process, alternating with ours (k steps each, repeated) so each ratio comes from one
run. Every timed step is blocked on. Writes `--out` (JSON rows, after every group), and `.md`
and `.png` beside. `--deadline_s` leaves groups that would end past it unmeasured (rows
'skipped: deadline'); `--resume` keeps the measured rows of `--out` and measures the others.

  python experiments/benchmark.py --width=0.25 --time_steps=1,2,4,6 --batch=16 \
      --dtypes=float32 --variants=default,both --torch --out=experiments/results/benchmark_cpu.json
  python experiments/benchmark.py --preset=tiny --out=/tmp/bench.json   # CI smoke test
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from benchmark_report import markdown, write_json, write_outputs  # beside this script
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import datasets, optim, steps
from idsnn_jax.models import create_model, init_variables

VARIANTS = {
    "default": {},
    "remat": {"remat": True},
    "pack_spikes": {"pack_spikes": True},
    "both": {"remat": True, "pack_spikes": True},
}
CASES = {"teacher": "resnet34", "idsnn": "spiking_resnet18"}  # case -> the trained model
SKIPPED = "skipped: deadline"  # the error of a row whose group was not started in time


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to measure; `--flag`s of the same names override the defaults (or a preset)."""

    cases: tuple[str, ...] = ("teacher", "idsnn")
    time_steps: tuple[int, ...] = (1, 2, 4, 6, 8, 16)
    batch: tuple[int, ...] = (16, 64, 256)
    dtypes: tuple[str, ...] = ("float32", "bfloat16")
    variants: tuple[str, ...] = ("default", "remat", "pack_spikes", "both")
    width: float = 1.0
    image: tuple[int, ...] = (32, 32, 3)
    num_classes: int = 100
    steps: int = 10  # timed units (dispatches) per contender, after 2 warm-up units
    chunk: int = 5  # units per turn when alternating ours / torch
    steps_per_call: tuple[int, ...] = (1,)  # our steps per dispatch (`config.steps_per_call`)
    torch: bool = False
    torch_compile: bool = False
    torch_threads: int = 0  # torch's CPU threads; 0: its default (one per core)
    matmul_n: int = 0  # side of the peak-FLOP/s matmul; 0: 2048 on CPU, 8192 on GPU
    deadline_s: float = 0.0  # start no group that would end past this (seconds; 0: no limit)

    def __post_init__(self) -> None:
        known = {"cases": CASES, "variants": VARIANTS, "dtypes": ("float32", "bfloat16")}
        for name, names in known.items():
            if unknown := sorted(set(getattr(self, name)) - set(names)):
                raise ValueError(f"{name}: {unknown} unknown; choose from {sorted(names)}")


TINY = Settings(
    time_steps=(2,),
    batch=(4,),
    dtypes=("float32",),
    variants=("default", "both"),
    width=0.0625,
    image=(8, 8, 3),
    steps=2,
    chunk=1,
    torch=True,
    matmul_n=256,
)


class Group(NamedTuple):
    """One (case, T, batch, dtype): its variants of ours and torch are timed together."""

    case: str
    time_steps: int | None  # None for the teacher's own step
    batch: int
    dtype: str


@dataclasses.dataclass
class Contender:
    """One timed unit: `run()` does one dispatch of `steps` train steps (ours: a scan of
    `steps_per_call`; torch: 1) on `steps * batch` images and returns what `sync` blocks on."""

    run: Callable[[], Any]
    steps: int
    sync: Callable[[Any], Any]
    facts: dict


def machine() -> dict:
    """Platform, device, versions (torch: when imported) and CPU count, kept in every row."""
    device = jax.devices()[0]
    info = dict(platform=device.platform, device_kind=device.device_kind, jax=jax.__version__)
    torch_version = getattr(sys.modules.get("torch"), "__version__", None)
    return {**info, "torch": torch_version, "devices": jax.device_count(), "cpus": os.cpu_count()}


def _seconds(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def matmul_peak(n: int, dtype: str, repeats: int = 5) -> dict:
    """Dense-matmul FLOP/s on one device: jitted `(n, n) @ (n, n)` in `dtype`, median time
    after a warm-up; FLOPs from XLA's cost analysis (2 n^3)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
    compiled = jax.jit(jnp.matmul).lower(a, a).compile()
    flops = float(compiled.cost_analysis()["flops"])
    times = [_seconds(lambda: jax.block_until_ready(compiled(a, a))) for _ in range(repeats + 1)]
    return {"n": n, "flops": flops, "flops_per_s": flops / statistics.median(times[1:])}


def _info(num_classes: int, image: tuple[int, ...]) -> datasets.DatasetInfo:
    """Random data's facts: `image` (H, W, C) uint8 pixels, normalized by 0.5 and 0.25."""
    c = image[2]
    return datasets.DatasetInfo("random", num_classes, tuple(image), (0.5,) * c, (0.25,) * c)


def _flax_models(s: Settings, g: Group, variant: str) -> tuple:
    """(trained model, frozen teacher or None); BN synchronized over the mesh as in training."""
    kwargs = dict(num_classes=s.num_classes, width=s.width, dtype=jnp.dtype(g.dtype))
    teacher = create_model("resnet34", **kwargs) if g.case == "idsnn" else None
    if g.time_steps is not None:
        kwargs["time_steps"] = g.time_steps
    model = create_model(CASES[g.case], bn_axis_name=steps.AXIS, **kwargs, **VARIANTS[variant])
    return model, teacher


@functools.cache
def _init(name: str, num_classes: int, width: float, image: tuple[int, ...], seed: int) -> dict:
    """Variables of model `name`, initialized once: they do not depend on T, the compute
    dtype or the memory variant (parameters and BN statistics are float32)."""
    model = create_model(name, num_classes=num_classes, width=width)
    return init_variables(model, _info(num_classes, image), seed)


def build_ours(s: Settings, g: Group, variant: str, k: int, variables: tuple, mesh) -> Contender:
    """Our compiled train loop (`steps.make_train_loop`, what `train.fit` runs: batches
    gathered on the device, `k` steps per dispatch) on `variables = (student, teacher)` and a
    random uint8 split of `k` batches held on the devices."""
    model, teacher = _flax_models(s, g, variant)
    tx, _ = optim.create_optimizer(optim.OptimizerOptions(), steps_per_epoch=1, num_epochs=1)
    step = steps.make_train_step(model, tx, _info(s.num_classes, s.image), teacher=teacher)
    train_fn = steps.compile_train_loop(mesh, steps.make_train_loop(step))
    state = steps.replicate(steps.create_train_state(variables[0], tx, 0), mesh)
    teacher_vars = steps.replicate(variables[1], mesh)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (k * g.batch, *s.image), dtype=np.uint8)
    data = steps.device_data(images, rng.integers(0, s.num_classes, k * g.batch), mesh)
    order = np.arange(k * g.batch, dtype=np.int32).reshape(k, g.batch)
    indices = jax.device_put(order, NamedSharding(mesh, P(None, steps.AXIS)))
    valid = np.ones(k, bool)
    args = (data, indices, valid, teacher_vars)
    start = time.perf_counter()
    compiled = train_fn.lower(state, *args).compile()
    facts = {"compile_s": time.perf_counter() - start, **_compiled_stats(compiled, mesh.size, k)}
    holder = [state]

    def run():
        holder[0], metrics = compiled(holder[0], *args)
        return metrics

    return Contender(run, k, jax.block_until_ready, facts)


def _compiled_stats(compiled, num_devices: int, steps_per_call: int) -> dict:
    """Per-device memory of the compiled loop (XLA) and the FLOPs of one step over all
    devices (XLA's cost analysis counts a scan's body once, whatever its length)."""
    mem = compiled.memory_analysis()
    sizes = (mem.temp_size_in_bytes, mem.argument_size_in_bytes, mem.output_size_in_bytes)
    flops = compiled.cost_analysis().get("flops")
    return {
        "devices": num_devices,
        "compiled_temp_bytes": int(sizes[0]),
        "compiled_peak_bytes": int(sum(sizes)),  # temp + arguments + outputs, per device
        "flops": None if flops is None else float(flops) * num_devices,
    }


def build_torch(s: Settings, g: Group, variables: tuple) -> Contender:
    """The PyTorch baseline's step on the same weights and a fixed random float batch."""
    import torch
    import torch_reference as tr

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    kwargs = dict(num_classes=s.num_classes, width=s.width)
    t_kwargs = {} if g.time_steps is None else {"time_steps": g.time_steps}
    models = [tr.create(CASES[g.case], **kwargs, **t_kwargs)]
    models += [tr.create("resnet34", **kwargs)] if g.case == "idsnn" else []
    for model, model_variables in zip(models, variables, strict=False):
        tr.load_flax_variables(model.to(device), model_variables)
    amp = torch.bfloat16 if g.dtype == "bfloat16" else None
    step = tr.make_torch_step(*models, lr=0.05, compile=s.torch_compile, amp_dtype=amp)
    images = torch.randn(g.batch, s.image[2], *s.image[:2], device=device)
    labels = torch.randint(0, s.num_classes, (g.batch,), device=device)
    facts = {"torch_mode": "compile" if s.torch_compile else "eager"}
    facts["torch_threads"] = torch.get_num_threads()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()

        def peak_and_release() -> int:  # read after the timing
            peak = torch.cuda.max_memory_allocated()
            torch.cuda.empty_cache()  # give the freed activations back to JAX's next group
            return int(peak)

        facts["torch_memory"] = peak_and_release
    return Contender(lambda: step(images, labels), 1, lambda loss: loss.item(), facts)


def time_alternating(contenders: dict[str, Contender], steps: int, chunk: int) -> dict:
    """Seconds per unit for each contender: `chunk` units of each in turn until each has
    `steps`, so slow drifts of a shared machine hit all of them alike."""
    times = {name: [] for name in contenders}
    while any(len(v) < steps for v in times.values()):
        for name, c in contenders.items():
            for _ in range(min(chunk, steps - len(times[name]))):
                times[name].append(_seconds(lambda c=c: c.sync(c.run())))
    return times


def _ready(build: Callable[[], Contender]) -> tuple[Contender | None, str | None]:
    """The built contender after 2 warm-up units (compiling torch.compile), or the error:
    an out-of-memory or a failed torch.compile skips one row, not the whole run."""
    try:
        contender = build()
        for _ in range(2):
            contender.sync(contender.run())
        return contender, None
    except Exception as e:  # noqa: BLE001
        return None, f"{type(e).__name__}: {str(e)[:300]}"


def _speed(times: list[float], steps_per_unit: int, batch: int, prefix: str = "") -> dict:
    """Per train step: median, min and max seconds, and images/s at the median."""
    per_step = [t / steps_per_unit for t in times]
    median = statistics.median(per_step)
    stats = {"median": median, "min": min(per_step), "max": max(per_step)}
    out = {f"{prefix}step_s_{k}": v for k, v in stats.items()}
    return {**out, f"{prefix}images_per_s": batch / median}


def _device_peak_bytes() -> int | None:
    """The device's process-wide memory high-water mark (GPU); None where not reported."""
    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _ours(s: Settings, g: Group) -> list[tuple[str, int]]:
    """(variant, steps per call) of each of our rows in group `g`; the teacher has no spikes,
    so it gets only the variants without `pack_spikes`."""
    variants = (v for v in s.variants if g.case == "idsnn" or v in ("default", "remat"))
    return list(itertools.product(variants, s.steps_per_call))


def _row(s: Settings, g: Group, variant: str, k: int, **facts) -> dict:
    """What every row of ours says about itself."""
    return {
        **g._asdict(),
        "variant": variant,
        "steps_per_call": k,
        "width": s.width,
        "image": s.image,
        **facts,
    }


def measure_group(s: Settings, g: Group, mesh, peak: dict, ours: list | None = None) -> list[dict]:
    """Rows of one group: each (variant, steps per call) in `ours` (default: all, `_ours`),
    alternating with torch (same weights).

    Ours are warmed up one after another, each row's `device_peak_bytes` read after its own
    warm-up: a process-wide high-water mark, exact only where it grows."""
    variables = (_init(CASES[g.case], s.num_classes, s.width, s.image, 0), {})
    if g.case == "idsnn":
        variables = (variables[0], _init("resnet34", s.num_classes, s.width, s.image, 1))
    rows, contenders = {}, {}
    for key in _ours(s, g) if ours is None else ours:
        c, error = _ready(lambda key=key: build_ours(s, g, *key, variables, mesh))
        facts = {**(c.facts if c else {}), "device_peak_bytes": _device_peak_bytes()}
        rows[key] = _row(s, g, *key, error=error, **facts)
        contenders[key] = c
    extra = {}
    if s.torch:
        contenders["torch"], extra["torch_error"] = _ready(lambda: build_torch(s, g, variables))
    times = time_alternating({k: c for k, c in contenders.items() if c}, s.steps, s.chunk)
    if "torch" in times:
        facts = dict(contenders["torch"].facts)
        read = facts.pop("torch_memory", None)
        extra.update(facts, torch_max_memory_bytes=read() if read else None)
        extra.update(_speed(times.pop("torch"), 1, g.batch, "torch_"))
    return [_finish(row, times.get(k), g.batch, extra, peak[g.dtype]) for k, row in rows.items()]


def _finish(row: dict, times: list[float] | None, batch: int, extra: dict, peak: dict) -> dict:
    """Adds speed, FLOP/s (and its fraction of the matmul peak), the torch ratio, machine."""
    if times:
        row.update(_speed(times, row["steps_per_call"], batch))
        if row.get("flops"):
            row["flops_per_s"] = row["flops"] / row["step_s_median"]
            row["peak_fraction"] = row["flops_per_s"] / (peak["flops_per_s"] * row["devices"])
    row.update(extra)
    if row.get("images_per_s") and extra.get("torch_images_per_s"):
        row["ours_vs_torch"] = row["images_per_s"] / extra["torch_images_per_s"]
    return {**row, "matmul_peak": peak, "machine": machine()}


def groups(s: Settings) -> list[Group]:
    """Every group, in the order measured: cases x dtypes x batches x T (the teacher has no T)."""
    return [
        Group(case, t, batch, dtype)
        for case, dtype, batch in itertools.product(s.cases, s.dtypes, s.batch)
        for t in (s.time_steps if case == "idsnn" else (None,))
    ]


def row_key(row: dict) -> tuple:
    """What identifies a row: its group's fields, variant and steps per call."""
    return (*(row[name] for name in Group._fields), row["variant"], row["steps_per_call"])


def run(
    s: Settings, done: Iterable[tuple] = (), on_rows: Callable[[list[dict]], None] | None = None
) -> list[dict]:
    """The rows not in `done` (`row_key`s), group by group, with torch timed again in each
    group that has one; `on_rows(rows so far)` after each group. With `s.deadline_s`, a group
    that would end past it (judged by the longest group so far) is not started: its rows say
    'skipped: deadline'."""
    start, longest, done = time.perf_counter(), 0.0, set(done)
    mesh = steps.create_mesh()
    n = s.matmul_n or (2048 if jax.default_backend() == "cpu" else 8192)
    peak = {dtype: matmul_peak(n, dtype) for dtype in s.dtypes}
    rows: list[dict] = []
    for g in groups(s):
        ours = [key for key in _ours(s, g) if (*g, *key) not in done]
        if not ours:
            continue
        began = time.perf_counter()
        if s.deadline_s and began - start + longest > s.deadline_s:
            skip = {"error": SKIPPED, "machine": machine()}
            group = [_row(s, g, *key, **skip) for key in ours]
        else:
            group = measure_group(s, g, mesh, peak, ours)
            longest = max(longest, time.perf_counter() - began)
        print(markdown(group, header=not rows), flush=True)
        rows += group
        if on_rows:
            on_rows(rows)
    return rows


def define_flags(defaults: Any, presets: dict[str, Any], out: str) -> None:
    """--preset (a name in `presets`), --out (default `out`) and one flag per field of the
    frozen dataclass instance `defaults`, named as the field (lists for tuples). Shared by the
    experiment scripts that take a `Settings` dataclass."""
    flags.DEFINE_enum(
        "preset", None, list(presets), "Start from a preset (tiny: the CI smoke test)."
    )
    flags.DEFINE_string("out", out, "JSON path (.md beside).")
    for field in dataclasses.fields(defaults):
        default = getattr(defaults, field.name)
        if isinstance(default, tuple):
            flags.DEFINE_list(field.name, [str(v) for v in default], f"Settings.{field.name}")
        else:
            define = {bool: flags.DEFINE_bool, int: flags.DEFINE_integer, str: flags.DEFINE_string}
            define.get(type(default), flags.DEFINE_float)(
                field.name, default, f"Settings.{field.name}"
            )


def settings_from_flags(defaults: Any, presets: dict[str, Any]) -> Any:
    """The preset (or `defaults`) with every flag given on the command line applied."""
    base = presets.get(flags.FLAGS.preset, defaults)
    changes = {}
    for field in dataclasses.fields(defaults):
        if flags.FLAGS[field.name].present:
            value, default = flags.FLAGS[field.name].value, getattr(defaults, field.name)
            kind = type(default[0]) if isinstance(default, tuple) else None
            changes[field.name] = tuple(kind(v) for v in value) if kind else value
    return dataclasses.replace(base, **changes)


def measured_rows(path: str) -> list[dict]:
    """The rows of an earlier run's JSON at `path` that were measured (none if absent)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [r for r in json.load(f) if r.get("error") != SKIPPED]


def main(argv: list[str]) -> None:
    del argv
    out = flags.FLAGS.out
    kept = measured_rows(out) if flags.FLAGS.resume else []
    done = {row_key(r) for r in kept}
    s = settings_from_flags(Settings(), {"tiny": TINY})
    rows = kept + run(s, done, lambda new: write_json(kept + new, out))
    order = {g: i for i, g in enumerate(groups(s))}  # resumed rows back in the grid's order
    rows.sort(key=lambda r: order.get(Group(*row_key(r)[:4]), len(order)))
    write_outputs(rows, out)
    print(f"wrote {out} (.md, .png)")


if __name__ == "__main__":
    # JAX must not take 75% of the GPU up front: the PyTorch baseline shares the device.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    define_flags(Settings(), {"tiny": TINY}, "experiments/results/benchmark.json")
    flags.DEFINE_bool("resume", False, "Keep the measured rows of --out; measure the others.")
    app.run(main)
