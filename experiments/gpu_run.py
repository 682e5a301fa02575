"""The GPU measurements of issue 21 in one run of at most `--budget_s` seconds, started by
`gpu_run.sh` (which sets up the environment). Each phase is a subprocess with a time limit;
results are written as they come, so a run cut short still leaves what it measured.

Phases, most important first:
1. env: the GPU, its driver, the versions of every package against pyproject.toml's floors,
   and a bfloat16 matmul's FLOP/s (`run.json`). Without a GPU the run stops here (not with
   `--dry_run`).
2. bench: `benchmark.py`, ours against the PyTorch baseline in the reference's structure
   (eager float32 and bfloat16 AMP), first the main rows: bfloat16, T=4, batch 64, the
   default model at steps_per_call 1 and 8 (`benchmark.{json,md,png}`, rewritten after each
   group of rows).
3. recipe: `idsnn_jax.main` with configs/cifar100.py, a few epochs per stage on synthetic data
   of CIFAR-100's shape (random pixels and labels in the official binary layout): what a
   first GPU run meets (data held on the device, evaluation with SOP/MAC counts, checkpoints),
   with images/s per epoch (`recipe.json`; accuracy means nothing on random data).
4. bench again (`--resume`): the rest of the grid, T 4/6, batch 64/128, bfloat16 and float32,
   default and remat + pack_spikes, steps_per_call 1 and 8, the groups in order of importance,
   while time is left (a group that would end past it is recorded as skipped).

Modes: the full run (8 minutes), `--quick` (a rerun: the main benchmark group and one epoch
per stage, 4 minutes), `--dry_run` (on a CPU: tiny sizes, every phase and path but the GPU).
`--out` (default experiments/results/gpu/<the GPU's name>) gets run.json, benchmark.{json,md,
png}, recipe.json and log.txt: six files.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

import common  # beside this script
import numpy as np
from absl import app, flags
from gpu_lowering import SPLIT_SIZES

HERE = os.path.dirname(os.path.abspath(__file__))
CLASSES, COARSE = 100, 20  # CIFAR-100's fine and coarse labels
GRACE_S = 30  # after SIGTERM, before SIGKILL: a stopping run finishes its checkpoint save
RESERVE_S = 15  # kept for writing the results after the last phase
MIN_PHASE_S = 30  # a phase with less time than this is skipped


@dataclasses.dataclass(frozen=True)
class Mode:
    """Sizes and time shares of one kind of run."""

    budget_s: int
    bench: dict  # benchmark.py flags: the grid
    first: dict | None  # flags changed for the first bench phase (its part of the grid); None: all
    bench_first_s: int  # the first bench phase's time; the second gets what is left
    recipe_s: int
    epochs: int  # per stage
    split: tuple[int, int] = SPLIT_SIZES["cifar100"]  # synthetic train and test images
    recipe: dict = dataclasses.field(default_factory=dict)  # --config overrides
    need_gpu: bool = True


BENCH = {"cases": "idsnn", "variants": "default,both", "steps_per_call": "1,8", "torch": True}
MAIN = {"time_steps": "4", "batch": "64", "dtypes": "bfloat16", "variants": "default"}
MODES = {
    "full": Mode(
        480,
        {**BENCH, "time_steps": "4,6", "batch": "64,128", "dtypes": "bfloat16,float32"},
        MAIN,  # first the main group's default model, k = 1 and 8; the rest after the recipe
        bench_first_s=120,
        recipe_s=240,
        epochs=3,
    ),
    "quick": Mode(240, {**BENCH, **MAIN}, None, bench_first_s=90, recipe_s=120, epochs=1),
    "dry_run": Mode(
        900,
        {"preset": "tiny", "dtypes": "bfloat16,float32", "steps_per_call": "1,2"},
        {"cases": "idsnn", "dtypes": "bfloat16"},
        bench_first_s=150,
        recipe_s=400,
        epochs=1,
        split=(64, 32),
        recipe={
            "teacher.width": 0.0625,
            "student.width": 0.0625,
            "batch_size": 16,
            "eval_batch_size": 32,
        },
        need_gpu=False,
    ),
}

_QUICK = flags.DEFINE_bool("quick", False, "A rerun: the main benchmark group, 1 epoch a stage.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "On a CPU: tiny sizes, every path but the GPU.")
_OUT = flags.DEFINE_string("out", None, "Results folder (default results/gpu/<GPU name>).")
_BUDGET = flags.DEFINE_integer("budget_s", None, "Seconds for everything (default: the mode's).")
_ENV = flags.DEFINE_bool("env", False, "Print the environment as JSON and exit (phase 1).")


def environment() -> dict:
    """The device JAX sees, torch's, nvidia-smi's view, versions against pyproject's floors,
    and a bfloat16 matmul's FLOP/s (`benchmark.matmul_peak`)."""
    import jax
    from benchmark import machine, matmul_peak

    import idsnn_jax

    try:
        import torch  # before machine(), which reports its version when imported
    except ImportError:  # the benchmark's rows then say the baseline could not run
        torch = None

    out = {**machine(), "python": sys.version.split()[0], "floors": version_floors()}
    out["idsnn_jax"] = os.path.dirname(idsnn_jax.__file__)
    git = ["git", "-C", HERE, "rev-parse", "--short", "HEAD"]  # a copied tree may have no .git
    commit = shutil.which("git") and subprocess.run(git, capture_output=True, text=True).stdout
    out["commit"] = (commit or "").strip() or None
    out["backend"] = jax.default_backend()
    out["matmul_bf16"] = matmul_peak(8192 if out["backend"] == "gpu" else 512, "bfloat16")
    cuda = torch is not None and torch.cuda.is_available()
    out["torch_cuda"] = torch.cuda.get_device_name(0) if cuda else None
    query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm"
    smi = shutil.which("nvidia-smi")
    if smi:
        done = subprocess.run([smi, query, "--format=csv,noheader"], capture_output=True, text=True)
        out["nvidia_smi"] = done.stdout.strip() or done.stderr.strip()
    return out


def version_floors() -> dict:
    """Each dependency of pyproject.toml: its installed version and whether it meets the floor
    ('missing' where not installed)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return {}
    with open(os.path.join(HERE, "..", "pyproject.toml"), "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    out = {}
    for dep in deps:
        name, floor = re.match(r"([\w.-]+)\s*(?:>=\s*([\w.]+))?", dep).groups()
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
            continue
        key = lambda v: tuple(int(x) for x in re.findall(r"\d+", v)[:3])
        out[name] = version + ("" if not floor or key(version) >= key(floor) else f" < {floor}")
    return out


def gpu_slug(env: dict) -> str:
    """A folder name for the device: 'nvidia_h100_80gb_hbm3', or 'dry_run_cpu'."""
    if env["backend"] != "gpu":
        return f"dry_run_{env['backend']}"
    return re.sub(r"[^a-z0-9]+", "_", env["device_kind"].lower()).strip("_")


def write_synthetic_cifar100(root: str, num_train: int, num_test: int, seed: int = 0) -> str:
    """Random images and labels in the official CIFAR-100 binary layout (one row per image:
    coarse label, fine label, 3072 pixel bytes in C, H, W order), extracted, under `root`;
    returns `root` (a `config.data_dir`)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-binary")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train.bin", num_train), ("test.bin", num_test)):
        rows = rng.integers(0, 256, (n, 2 + 32 * 32 * 3), dtype=np.uint8)
        rows[:, 1] = rng.integers(0, CLASSES, n)
        rows[:, 0] = rows[:, 1] % COARSE
        rows.tofile(os.path.join(folder, name))
    return root


def run_phase(name: str, cmd: list[str], seconds: float, log: str, **env: str) -> dict:
    """Runs `cmd` (extra environment `env`) for at most `seconds`, then SIGTERM and, `GRACE_S`
    later, SIGKILL; its output is appended to `log`. Returns what happened."""
    start = time.perf_counter()
    status = "done"
    with open(log, "a") as f:
        f.write(f"\n=== {name} ({seconds:.0f} s): {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
        try:
            rc = proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            status = "stopped at its time limit"
            proc.terminate()
            try:
                rc = proc.wait(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait()
    status = status if rc == 0 or status != "done" else "failed"
    took = time.perf_counter() - start
    print(f"[gpu_run] {name}: {status} (exit {rc}) in {took:.0f} s", flush=True)
    return {
        "name": name,
        "cmd": cmd,
        "limit_s": seconds,
        "seconds": took,
        "rc": rc,
        "status": status,
    }


def bench_cmd(mode: Mode, out: str, seconds: float, first: bool) -> list[str]:
    """benchmark.py with the mode's flags (the first phase's part of them, or the rest of the
    grid: `--resume`) and a deadline for new groups inside `seconds`."""
    grid = {**mode.bench, **(mode.first or {})} if first else mode.bench
    args = [f"--{k}" if v is True else f"--{k}={v}" for k, v in grid.items()]
    args += [f"--out={out}", f"--deadline_s={max(seconds - GRACE_S, 1)}"]
    resume = [] if first else ["--resume"]
    return [sys.executable, os.path.join(HERE, "benchmark.py"), *args, *resume]


def recipe_cmd(mode: Mode, data_dir: str, workdir: str) -> list[str]:
    """The CIFAR-100 recipe on `data_dir` for `mode.epochs` per stage, in `workdir`."""
    config = {"data_dir": data_dir, "teacher.num_epochs": mode.epochs}
    config |= {"student.num_epochs": mode.epochs, **mode.recipe}
    overrides = [f"--config.{k}={v}" for k, v in config.items()]
    main = [sys.executable, "-m", "idsnn_jax.main", "--config=configs/cifar100.py"]
    return [*main, f"--workdir={workdir}", *overrides]


def recipe_summary(workdir: str, phase: dict, split: tuple[int, int]) -> dict:
    """What the recipe run logged: per stage and epoch its speed and (meaningless on random
    data) accuracy, and its summary; whatever epochs finished before a stop."""
    from idsnn_jax.logs import METRICS_FILE, epochs_by_stage, read_records

    keys = ("epoch", "images_per_sec", "epoch_seconds", "train_loss", "test_accuracy")
    keys += ("test_sops", "test_macs", "test_energy_uj")
    path = os.path.join(workdir, METRICS_FILE)
    stages = epochs_by_stage(read_records(path)) if os.path.exists(path) else {}
    summary_path = os.path.join(workdir, "summary.json")
    summary = None
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
    return {
        "data": f"synthetic: random pixels and labels, {split[0]} train / {split[1]} test "
        "images in CIFAR-100's binary layout",
        **phase,
        "stages": {k: [{n: r.get(n) for n in keys} for r in v] for k, v in stages.items()},
        "summary": summary,
    }


def _environment_phase() -> dict:
    """Phase 1 in a subprocess (this process keeps off the GPU): `environment()` or its error."""
    cmd = [sys.executable, os.path.abspath(__file__), "--env"]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    except subprocess.TimeoutExpired:
        return {"backend": None, "error": "no answer in 180 s"}
    try:
        return json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return {"backend": None, "error": done.stderr[-2000:]}


class Run:
    """The run's record (`run.json`, rewritten after every phase) and its clock."""

    def __init__(self, mode: str, budget_s: float, env: dict, out: str, start: float):
        """`start`: the run's `time.perf_counter()` at its start; phase 1 counts too."""
        self.start, self.budget_s, self.out = start, budget_s, out
        self.log = os.path.join(out, "log.txt")
        self.record = {"mode": mode, "budget_s": budget_s, "out": out, "env": env, "phases": []}
        self.cache = os.path.join(tempfile.gettempdir(), "idsnn-gpu-run-xla-cache")
        self.record["compilation_cache"] = self.cache  # a rerun on the same machine reuses it
        open(self.log, "w").close()
        self.save()

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.start) - RESERVE_S

    def save(self) -> None:
        self.record["seconds"] = time.perf_counter() - self.start
        with open(os.path.join(self.out, "run.json"), "w") as f:
            json.dump(self.record, f, indent=1)

    def phase(self, name: str, planned: float, command) -> dict:
        """`command(seconds)` run as phase `name` for at most `planned` seconds, or skipped."""
        seconds = min(planned, self.left())
        if seconds < MIN_PHASE_S:
            result = {"name": name, "status": f"skipped: {max(seconds, 0):.0f} s left"}
        else:
            env = {"JAX_COMPILATION_CACHE_DIR": self.cache}
            result = run_phase(name, command(seconds), seconds, self.log, **env)
        self.record["phases"].append(result)
        self.save()
        return result


def measure(mode: Mode, run: Run) -> None:
    """Phases 2-4 (`run` holds phase 1's record)."""
    bench = os.path.join(run.out, "benchmark.json")
    first = run.phase("bench", mode.bench_first_s, lambda t: bench_cmd(mode, bench, t, True))
    scratch = tempfile.mkdtemp(prefix="idsnn-gpu-run-")  # a fresh workdir: nothing to resume
    data = write_synthetic_cifar100(os.path.join(scratch, "data"), *mode.split)
    workdir = os.path.join(scratch, "workdir")
    phase = run.phase("recipe", mode.recipe_s, lambda t: recipe_cmd(mode, data, workdir))
    with open(os.path.join(run.out, "recipe.json"), "w") as f:
        json.dump(recipe_summary(workdir, phase, mode.split), f, indent=1)
    if mode.first is not None or first["status"] != "done":  # the grid is not all done
        run.phase("bench_rest", run.left(), lambda t: bench_cmd(mode, bench, t, False))
    shutil.rmtree(scratch, ignore_errors=True)


def report(out: str) -> str:
    """The end of the output: the phases, the benchmark's table, the recipe's images/s."""
    with open(os.path.join(out, "run.json")) as f:
        phases = json.load(f)["phases"]
    cells = [[p["name"], p["status"], f"{p.get('seconds', 0):.0f}"] for p in phases]
    lines = [common.markdown_table(["phase", "status", "seconds"], cells).rstrip("\n")]
    if os.path.exists(table := os.path.join(out, "benchmark.md")):
        with open(table) as f:
            lines += ["", f.read()]
    with open(os.path.join(out, "recipe.json")) as f:
        stages = json.load(f)["stages"]
    for stage, epochs in stages.items():
        speeds = ", ".join(f"{e['images_per_sec']:.0f}" for e in epochs)
        lines.append(f"recipe {stage}: images/s per epoch {speeds} (epoch 1 compiles)")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    if _ENV.value:
        print(json.dumps(environment()))
        return
    start = time.perf_counter()
    name = "dry_run" if _DRY_RUN.value else "quick" if _QUICK.value else "full"
    mode = MODES[name]
    env = _environment_phase()
    out = _OUT.value or os.path.join(HERE, "results", "gpu", gpu_slug(env))
    os.makedirs(out, exist_ok=True)
    run = Run(name, _BUDGET.value or mode.budget_s, env, out, start)
    print(f"[gpu_run] {name} on {env.get('device_kind')} ({env.get('backend')}), out {out}")
    if mode.need_gpu and env.get("backend") != "gpu":
        run.record["error"] = "no GPU visible to JAX: is its CUDA plugin installed?"
        run.save()
        sys.exit(f"error: {run.record['error']} ({env.get('error') or env.get('backend')})")
    measure(mode, run)
    print(report(out))


if __name__ == "__main__":
    app.run(main)
