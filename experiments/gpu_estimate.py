"""What the recipe's steps should take on an H100, on paper: FLOPs and bytes per step from XLA's
cost analysis, turned into time and images/s at the H100's datasheet peaks. No GPU is used and
every figure is an estimate, to be replaced by measurements (`gpu_run.sh`).

  python experiments/gpu_estimate.py --out=experiments/results/gpu_estimate.json
  python experiments/gpu_estimate.py --preset=tiny --out=/tmp/estimate.json   # CI smoke test

Steps, on one device, as `train.fit` compiles them for configs/cifar100.py with `dtype="auto"`
resolved as on a GPU (bfloat16; `gpu_lowering.stage_steps`): the IDSNN train step (Spiking
ResNet18 at each T, KD from a frozen ResNet34) and the teacher's own train step at each batch
size, and both eval steps (`eval_batch` images, counting SOPs/MACs as the recipe does).

- FLOPs: XLA's HLO cost analysis of the step lowered for CUDA (`Lowered.cost_analysis()`, 2 per
  multiply-add of a convolution or dot, 1 per elementwise op), before any compiler pass.
- bytes: the same analysis counts every op's operands and result as memory traffic
  (`bytes_unfused`, as if nothing were fused: far above what XLA:GPU moves). The step compiled
  for this machine's CPU, whose XLA fuses elementwise ops into their neighbours as XLA:GPU does
  (not identically), gives `bytes_fused`, used for the estimate: XLA:GPU's own count needs a
  GPU to compile for. It overstates a GPU's traffic: XLA:CPU computes bfloat16 convolutions
  and dots in float32 (converting around them), where cuDNN and cuBLAS read bfloat16; and
  neither count knows what the 50 MB L2 cache keeps out of HBM. The device holds only the
  step's batch here, not the whole split: XLA counts a gather's operand as read whole.
- time: the roofline, max(FLOPs / peak, bytes_fused / bandwidth), at 100% of the datasheet
  peaks (`H100`): the optimistic end; and with both peaks at the `ACHIEVABLE` fraction that
  tuned convnet training reaches of the compute peak (its source is in the output): a
  likelier figure, pessimistic where the memory term decides (bandwidth is usually reached
  at a higher fraction than compute, and the bytes are overstated).
- recipe: the teacher's and the student's epochs of `configs/default.py`, each a pass over
  CIFAR's training split in full global batches and an evaluation of its test split.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os

import gpu_lowering as gl  # beside this script (pytest: pythonpath)
import jax
from absl import app, flags
from benchmark import define_flags, machine, settings_from_flags
from benchmark_report import markdown, num

from idsnn_jax import input_pipeline, steps
from idsnn_jax.configs import cifar100

H100 = {
    "gpu": "NVIDIA H100 SXM5 80GB (HBM3)",
    "bf16_flops_per_s": 989.4e12,  # dense; the datasheet's 1,979 TFLOPS is with 2:4 sparsity
    "hbm_bytes_per_s": 3.35e12,
    "source": "NVIDIA H100 Tensor Core GPU datasheet, SXM column: BF16 Tensor Core 1,979 "
    "TFLOPS with sparsity (dense: half, 989.4 TFLOPS as in the H100 architecture whitepaper), "
    "GPU memory bandwidth 3.35 TB/s",
}
ACHIEVABLE = {
    "fraction": 0.20,
    "source": "NVIDIA DeepLearningExamples, PyTorch ResNet-50 v1.5 README: 2,470 images/s "
    "training on one A100 80GB with AMP; at about 24.6 GFLOP per training image (3 x 2 x 4.1 G "
    "multiply-adds) that is 61 TFLOP/s, 20% of the A100's 312 dense FP16/BF16 TFLOP/s. CIFAR's "
    "32x32 maps at batch 64 give smaller kernels, and LIF neurons add elementwise work: the "
    "fraction reached here may well be lower",
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """What to estimate; `--flag`s of the same names override the defaults (or a preset)."""

    time_steps: tuple[int, ...] = (4, 6)
    batch: tuple[int, ...] = (64, 128, 256)
    width: float = 1.0
    teacher: str = "resnet34"
    eval_batch: int = 512  # configs/default.py's eval_batch_size
    compile_cpu: bool = True  # bytes_fused from a CPU compile (else only the CUDA lowering)


TINY = Settings(
    time_steps=(2,), batch=(16,), width=0.0625, teacher="resnet18", eval_batch=16, compile_cpu=False
)


def recipe(s: Settings, batch: int, time_steps: int | None = None):
    """configs/cifar100.py with `s`'s sizes, as lowered for CUDA (bfloat16)."""
    config = cifar100.get_config()
    config.teacher.model, config.eval_batch_size = s.teacher, s.eval_batch
    config.teacher.width = config.student.width = s.width
    config.batch_size = batch
    config.student.time_steps = time_steps or config.student.time_steps
    return gl.for_platform(config, "cuda")


def cost(lowered: gl.Step, compiled: gl.Step | None) -> dict:
    """FLOPs, transcendentals and unfused bytes of `lowered` for CUDA; fused bytes (and FLOPs)
    of `compiled` built for this CPU, when given."""
    cuda = lowered.fn.trace(*lowered.args).lower(lowering_platforms=("cuda",)).cost_analysis()
    out = {
        "flops": float(cuda["flops"]),
        "transcendentals": float(cuda.get("transcendentals", 0.0)),
    }
    out |= {"bytes_unfused": float(cuda["bytes accessed"]), "bytes_fused": None}
    if compiled is not None:
        cpu = compiled.fn.lower(*compiled.args).compile().cost_analysis()
        out |= {"flops_cpu": float(cpu["flops"]), "bytes_fused": float(cpu["bytes accessed"])}
    return out


def roofline(row: dict) -> dict:
    """Seconds and images/s of a step at 100% of `H100` and at `ACHIEVABLE`, and its bound."""
    compute = row["flops"] / H100["bf16_flops_per_s"]
    memory = (row["bytes_fused"] or row["bytes_unfused"]) / H100["hbm_bytes_per_s"]
    seconds = max(compute, memory)
    slow = seconds / ACHIEVABLE["fraction"]
    return {
        "seconds_compute_100": compute,
        "seconds_memory_100": memory,
        "bound": "compute" if compute >= memory else "memory",
        "seconds_100": seconds,
        "images_per_s_100": row["batch"] / seconds,
        "seconds_achievable": slow,
        "images_per_s_achievable": row["batch"] / slow,
    }


def stage_rows(s: Settings, role: str, time_steps: int | None) -> list[dict]:
    """The train step of `role` at each batch size, then its eval step (once)."""
    rows = []
    for i, batch in enumerate(s.batch):
        config = recipe(s, batch, time_steps)
        # Only this step's batch on the device: XLA counts a gather's whole operand as read.
        build = functools.partial(gl.stage_steps, config, role, train_rows=batch)
        lowered = build(gl.abstract_mesh(1))
        compiled = build(steps.create_mesh(jax.devices()[:1])) if s.compile_cpu else (None, None)
        for kind, low, comp in zip(("train", "eval"), lowered, compiled, strict=True):
            if kind == "eval" and i:
                continue
            size = batch if kind == "train" else s.eval_batch
            row = {"stage": role, "step": kind, "time_steps": time_steps, "batch": size}
            row |= {"width": s.width, **cost(low, comp)}
            rows.append({**row, **roofline(row)})
    return rows


def _epoch_seconds(rows: list[dict], s: Settings, stage: tuple, batch: int, key: str) -> float:
    """One epoch of `stage` (role, T) at `batch`, each step taking its row's `key` seconds:
    CIFAR's training split in full batches, then its test split in eval batches."""
    seconds = {(r["stage"], r["step"], r["time_steps"], r["batch"]): r[key] for r in rows}
    (role, time_steps), (n_train, n_test) = stage, gl.SPLIT_SIZES["cifar100"]
    train = seconds[role, "train", time_steps, batch]
    evaluate = seconds[role, "eval", time_steps, s.eval_batch]
    steps_per_epoch = input_pipeline.num_train_steps(n_train, batch)
    return steps_per_epoch * train + math.ceil(n_test / s.eval_batch) * evaluate


def recipe_rows(s: Settings, rows: list[dict]) -> list[dict]:
    """Hours of the whole recipe (the teacher's epochs, then the student's) per (T, batch)."""
    config = cifar100.get_config()
    out = []
    for t, batch in itertools.product(s.time_steps, s.batch):
        stages = {("teacher", None): config.teacher.num_epochs}
        stages[("student", t)] = config.student.num_epochs
        row = {"time_steps": t, "batch": batch}
        for key in ("seconds_100", "seconds_achievable"):
            total = sum(n * _epoch_seconds(rows, s, st, batch, key) for st, n in stages.items())
            row[key.replace("seconds", "hours")] = total / 3600
        out.append(row)
    return out


FUSED = (
    "fused: the steps compiled for this CPU (XLA:CPU's fusion, not XLA:GPU's; XLA:CPU computes "
    "bfloat16 convolutions and dots in float32, so these overstate what a GPU moves)"
)
_PCT = f"{ACHIEVABLE['fraction']:.0%}"
STEP_COLUMNS = [
    ("stage", lambda r: r["stage"]),
    ("step", lambda r: r["step"]),
    ("T", lambda r: str(r["time_steps"] or "-")),
    ("batch", lambda r: str(r["batch"])),
    ("GFLOP", lambda r: num(r["flops"], 1e9)),
    ("GB unfused", lambda r: num(r["bytes_unfused"], 1e9, "{:.2f}")),
    ("GB fused (CPU)", lambda r: num(r["bytes_fused"], 1e9, "{:.2f}")),
    ("ms compute", lambda r: num(r["seconds_compute_100"], 1e-3, "{:.2f}")),
    ("ms memory", lambda r: num(r["seconds_memory_100"], 1e-3, "{:.2f}")),
    ("bound", lambda r: r["bound"]),
    ("ms at 100%", lambda r: num(r["seconds_100"], 1e-3, "{:.2f}")),
    ("img/s at 100%", lambda r: num(r["images_per_s_100"], fmt="{:.0f}")),
    (f"ms at {_PCT}", lambda r: num(r["seconds_achievable"], 1e-3, "{:.2f}")),
    (f"img/s at {_PCT}", lambda r: num(r["images_per_s_achievable"], fmt="{:.0f}")),
]
RECIPE_COLUMNS = [
    ("T", lambda r: str(r["time_steps"])),
    ("batch", lambda r: str(r["batch"])),
    ("hours at 100%", lambda r: num(r["hours_100"], fmt="{:.2f}")),
    (f"hours at {_PCT}", lambda r: num(r["hours_achievable"], fmt="{:.2f}")),
]


def run(s: Settings) -> dict:
    """The estimate: every step's row, the recipe's, and what they rest on."""
    rows = []
    for role, t in [("teacher", None)] + [("student", t) for t in s.time_steps]:
        stage = stage_rows(s, role, t)
        print(markdown(stage, header=not rows, columns=STEP_COLUMNS), flush=True)
        rows += stage
    config = cifar100.get_config()
    epochs = {"teacher": config.teacher.num_epochs, "student": config.student.num_epochs}
    return {
        "estimate": "on paper: XLA cost analysis and datasheet peaks, no GPU measured",
        "flops_from": "HLO cost analysis of the steps lowered for CUDA (before any pass)",
        "bytes_from": FUSED if s.compile_cpu else "unfused: the same analysis",
        "hardware": H100,
        "achievable": ACHIEVABLE,
        "epochs": epochs,
        "settings": dataclasses.asdict(s),
        "machine": machine(),
        "steps": rows,
        "recipe": recipe_rows(s, rows),
    }


def report(result: dict) -> str:
    """The estimate as markdown: what it rests on, then the step and recipe tables."""
    hw, frac = result["hardware"], result["achievable"]
    epochs = result["epochs"]
    lines = [
        f"# Estimate, not a measurement: the CIFAR-100 recipe on an {hw['gpu']}",
        "",
        f"- Every figure is an **estimate** ({result['estimate']}); "
        "`experiments/gpu_run.sh` measures on a GPU.",
        f"- FLOPs: {result['flops_from']}. Bytes: {result['bytes_from']}; 'unfused' counts "
        "every op's operands and result as memory traffic.",
        f"- Peaks: {hw['bf16_flops_per_s'] / 1e12:.1f} TFLOP/s bfloat16 dense, "
        f"{hw['hbm_bytes_per_s'] / 1e12:.2f} TB/s HBM ({hw['source']}).",
        f"- Time = max(FLOPs / peak, bytes / bandwidth) at 100%, and that over "
        f"{frac['fraction']:.0%} ({frac['source']}).",
        f"- Recipe: {epochs['teacher']} teacher + {epochs['student']} student epochs, each "
        "a pass over 50,000 training images and an evaluation of 10,000.",
        f"- Made by `python experiments/gpu_estimate.py` (settings in the JSON) with jax "
        f"{result['machine']['jax']} on {result['machine']['cpus']} CPU cores.",
        "",
        "## Per step (one GPU)",
        "",
        markdown(result["steps"], columns=STEP_COLUMNS),
        "",
        "## The whole recipe",
        "",
        markdown(result["recipe"], columns=RECIPE_COLUMNS),
    ]
    return "\n".join(lines) + "\n"


def write(result: dict, out: str) -> None:
    """`out` (JSON) and the markdown `report` beside it (.md)."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.splitext(out)[0] + ".md", "w") as f:
        f.write(report(result))


def main(argv: list[str]) -> None:
    del argv
    result = run(settings_from_flags(Settings(), {"tiny": TINY}))
    print(markdown(result["recipe"], columns=RECIPE_COLUMNS))
    write(result, flags.FLAGS.out)
    print(f"wrote {flags.FLAGS.out} (.md)")


if __name__ == "__main__":
    define_flags(Settings(), {"tiny": TINY}, "experiments/results/gpu_estimate.json")
    app.run(main)
