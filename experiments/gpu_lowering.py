"""A run's compiled steps lowered for CUDA on a machine without a GPU, and their StableHLO read.

No GPU has been available to this project, yet the bfloat16 path, `steps_per_call`, the data
held on the devices and the memory options exist for GPUs. JAX lowers a jitted function for a
platform this machine lacks (`jax.export.export(fn, platforms=("cuda",))`): the lowering
fails on an op that has no CUDA rule and on a host callback, and the StableHLO it gives shows
every op's operand types. So the CUDA program of a config can be checked here, and XLA's cost
analysis of it gives the FLOPs of a step (`gpu_estimate.py`).

- `for_platform(config, platform)`: the config with `dtype="auto"` resolved as on that
  platform's backend (`precision.AUTO_DTYPE`: bfloat16 on GPUs).
- `stage_steps(config, role, mesh)`: what `train.fit` compiles for a stage (the train loop,
  distilling from the teacher in the student's stage, and the eval step, counting operations
  when `config.energy` is set), built with the public step layer and given abstract
  arguments shaped as `fit` passes them. `mesh` may be abstract (`abstract_mesh(n)`): lowering
  for n devices needs none of them.
- `check(step, platform)`: `export(step, platform)`, then `inspect(text)`: what the checks
  read (custom calls, float64, the operand types of convolutions and dots, the element types
  of sums and all-reduces), and what no device program may hold (`problems`: host callbacks,
  unknown custom calls, float64; a failed lowering, with the host callbacks of the jaxpr).
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from idsnn_jax import input_pipeline, optim, plan, precision, steps
from idsnn_jax.train import FitOptions

PLATFORM_BACKENDS = {"cuda": "gpu", "rocm": "gpu", "tpu": "tpu", "cpu": "cpu"}  # jax.export names
SPLIT_SIZES = {"cifar10": (50_000, 10_000), "cifar100": (50_000, 10_000)}  # (train, test) images
# Custom calls a lowering for any device may hold (sharding annotations); anything else is reported.
KNOWN_CUSTOM_CALLS = frozenset({"Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape"})

LOW_FLOATS = ("bf16", "f16")  # element types whose sums lose precision (integer sums are exact)
_TYPE = re.compile(r"tensor<((?:\d+x)*)(\w+)>")  # a tensor type: its shape prefix and element type
_FLOAT64 = re.compile(r"[<x]f64>")  # float64 as an element type, scalar or not
_CUSTOM_CALL = re.compile(r'custom_call @([\w.$-]+)|call_target_name = "([^"]+)"')
_ALL_REDUCE = re.compile(r'"stablehlo\.all_reduce"\(.*\n\s*\^bb0\(%\w+: tensor<(\w+)>')


class Step(NamedTuple):
    """A jitted step and abstract arguments it can be lowered with (`fn.trace(*args)`)."""

    name: str
    fn: Callable
    args: tuple


def for_platform(config: ml_collections.ConfigDict, platform: str) -> ml_collections.ConfigDict:
    """A copy of `config` whose `dtype="auto"` names what `precision.compute_dtype` picks on the
    backend of `platform` ('cuda' -> 'gpu': bfloat16); other dtypes are kept."""
    config = config.copy_and_resolve_references()
    if config.dtype == "auto":
        dtype = precision.AUTO_DTYPE.get(PLATFORM_BACKENDS[platform], jnp.float32)
        config.dtype = next(name for name, d in precision.DTYPES.items() if d == dtype)
    return config


def abstract_mesh(num_devices: int) -> AbstractMesh:
    """The 1-D `batch` mesh of `steps.create_mesh` over `num_devices` devices that need not
    exist: enough to lower (not compile) the sharded steps."""
    return AbstractMesh((num_devices,), (steps.AXIS,), axis_types=(AxisType.Auto,))


def _abstract(tree: Any, mesh: Mesh | AbstractMesh, spec: P) -> Any:
    """ShapeDtypeStructs of `tree`'s leaves, each sharded `spec` on `mesh`."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _batches(
    mesh: Mesh | AbstractMesh, image: tuple[int, ...], rows: int, k: int, options: FitOptions
) -> tuple[tuple, dict]:
    """Abstract (data, indices, valid) of the train loop (`rows` uint8 images on every
    device, `k` batches of `options.batch_size` indices) and an eval batch, sharded as
    `train.fit` places them."""
    sds, n = jax.ShapeDtypeStruct, mesh.size
    data = {"image": sds((n * rows, *image), jnp.uint8), "label": sds((n * rows,), jnp.int32)}
    train = (
        _abstract(data, mesh, P(steps.AXIS)),
        _abstract(sds((k, options.batch_size), jnp.int32), mesh, P(None, steps.AXIS)),
        _abstract(sds((k,), jnp.bool_), mesh, P()),
    )
    b = options.eval_batch_size
    evaluation = {"image": sds((b, *image), jnp.uint8), "label": sds((b,), jnp.int32)}
    evaluation["mask"] = sds((b,), jnp.float32)
    return train, _abstract(evaluation, mesh, P(steps.AXIS))


def stage_steps(
    config: ml_collections.ConfigDict,
    role: str,
    mesh: Mesh | AbstractMesh,
    *,
    steps_per_call: int = 1,
    train_rows: int | None = None,
) -> tuple[Step, Step]:
    """(train loop, eval step) of stage `role` ('teacher' or 'student') of `config`, as
    `train.fit` compiles them on `mesh`, with abstract arguments: the state and teacher
    variables replicated, `train_rows` training images on every device (uint8; default the
    whole split of `SPLIT_SIZES`, as `fit` holds it), `steps_per_call` batches of
    `config.batch_size` indices, one eval batch of `config.eval_batch_size`. The student's
    stage distils when `config.distill`."""
    run = plan.build_plan(config)
    if role not in run.fit_options:  # a teacher given as a checkpoint trains no stage
        raise ValueError(f"config trains no {role!r} stage; stages: {sorted(run.fit_options)}")
    options, model = run.fit_options[role], run.models[role]
    teacher = run.models["teacher"] if role == "student" and config.distill else None
    n_train = SPLIT_SIZES[config.dataset][0]
    steps_per_epoch = input_pipeline.num_train_steps(n_train, options.batch_size)
    tx, _ = optim.create_optimizer(options.optimizer, steps_per_epoch, options.num_epochs)
    train_step = steps.make_train_step(
        model,
        tx,
        run.info,
        teacher=teacher,
        loss=options.loss,
        augment=options.augment,
        ema_decay=options.ema_decay,
    )
    loop = steps.compile_train_loop(mesh, steps.make_train_loop(train_step))
    eval_step = steps.make_eval_step(model, run.info, count_ops=bool(options.energy))
    make_state = lambda v: steps.create_train_state(v, tx, 0, ema=options.ema_decay > 0)
    state = _abstract(jax.eval_shape(make_state, run.abstract_variables[role]), mesh, P())
    teacher_vars = _abstract(run.abstract_variables["teacher"] if teacher else {}, mesh, P())
    rows = train_rows or n_train
    train, batch = _batches(mesh, run.info.image_shape, rows, steps_per_call, options)
    return (
        Step(f"{role}/train", loop, (state, *train, teacher_vars)),
        Step(f"{role}/eval", steps.compile_eval_step(mesh, eval_step), (state, batch)),
    )


def export(step: Step, platform: str = "cuda") -> jax.export.Exported:
    """`step` exported for `platform`; raises where an op has no lowering there (or needs a
    host callback, which cannot be lowered for a device this machine lacks)."""
    return jax.export.export(step.fn, platforms=(platform,))(*step.args)


def _signature(line: str) -> list[tuple[str, str]]:
    """(shape prefix, element type) of each type in the `: (operands) -> result` part of a
    one-line op."""
    return _TYPE.findall(line.rsplit(" : ", 1)[-1])


def inspect(text: str) -> dict[str, Any]:
    """What the checks read in a StableHLO module's text: custom-call targets, float64
    element types, the operand and result element types of each convolution and dot
    ('bf16,bf16->bf16': count), the element type of each sum (an add-reduce) and all-reduce,
    and the sums in a 16-bit float type, written `input -> output` with shape and type."""
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    low_sums = []
    for line in text.splitlines():
        for op in ("convolution", "dot_general"):
            if f"stablehlo.{op} " in line or f"stablehlo.{op}(" in line:
                types = [t for _, t in _signature(line)]
                ops[op][f"{','.join(types[:2])}->{types[2]}"] += 1
        if "applies stablehlo.add across" in line:
            (shape, dtype), _, (out_shape, out_dtype) = _signature(line)
            ops["sum"][dtype] += 1
            if dtype in LOW_FLOATS:
                low_sums.append(f"{shape}{dtype} -> {out_shape}{out_dtype}")
    calls = collections.Counter(a or b for a, b in _CUSTOM_CALL.findall(text))
    return {
        "custom_calls": dict(calls),
        "float64": len(_FLOAT64.findall(text)),
        "convolution": dict(ops["convolution"]),
        "dot_general": dict(ops["dot_general"]),
        "sum": dict(ops["sum"]),
        "all_reduce": dict(collections.Counter(_ALL_REDUCE.findall(text))),
        "sums_16bit": low_sums,
    }


def problems(summary: dict[str, Any]) -> list[str]:
    """What no device program of this project may hold, one line each: host callbacks (a
    round trip to Python every step), custom calls outside `KNOWN_CUSTOM_CALLS` (often
    CPU-only kernels), float64 (slow or missing on GPUs and TPUs)."""
    found = []
    for target, count in summary["custom_calls"].items():
        if "callback" in target:
            found.append(f"{count} host callback(s): custom_call {target}")
        elif target not in KNOWN_CUSTOM_CALLS:
            found.append(f"{count} unknown custom_call {target}")
    if summary["float64"]:
        found.append(f"{summary['float64']} float64 type(s)")
    return found


def _primitive_names(jaxpr: Any) -> Iterator[str]:
    """Names of the primitives of `jaxpr` and of every jaxpr nested in their parameters."""
    for eqn in jaxpr.eqns:
        yield eqn.primitive.name
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(inner, "eqns"):
                    yield from _primitive_names(inner)


def primitives(step: Step) -> collections.Counter:
    """How often each primitive occurs in `step`'s jaxpr, nested ones included (traced only)."""
    return collections.Counter(_primitive_names(step.fn.trace(*step.args).jaxpr.jaxpr))


def check(step: Step, platform: str = "cuda") -> tuple[dict[str, Any], list[str]]:
    """(`inspect` of `step` lowered for `platform`, what is wrong with it: `problems`). A failed
    lowering gives ({}, its error and the host callbacks of the jaxpr): a host callback cannot
    be lowered for a device this machine lacks, and the error does not say so."""
    try:
        text = export(step, platform).mlir_module()
    except Exception as err:  # noqa: BLE001 - a failed lowering is the finding
        names = primitives(step)
        found = [f"{n} host callback(s): {k}" for k, n in names.items() if "callback" in k]
        return {}, [*found, f"no {platform} lowering: {type(err).__name__}: {str(err)[:300]}"]
    summary = inspect(text)
    return summary, problems(summary)
