"""The CIFAR-100 recipe's steps lowered for CUDA on CPUs (`experiments/gpu_lowering.py`).

What a GPU run compiles first, checked without a GPU: the recipe at a tiny width with
`dtype="auto"` resolved as on a GPU (bfloat16), the student's train loop (distilling from the
ResNet34 teacher) for steps_per_call 1 and 8, the default and the remat + pack_spikes model,
on abstract meshes of 1 and 8 devices (each pair of these once); the eval step and the
teacher's stage on 8 devices.
Lowering only: nothing is compiled, no device is needed. Each lowering must exist, hold no host
callback, unknown custom call or float64, compute its convolutions and matmuls in bfloat16,
and sum in float32 (README "Known differences": precision), with one named exception.
"""

from __future__ import annotations

import gpu_lowering as gl  # experiments/ is on pytest's pythonpath (pyproject.toml)
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from idsnn_jax import optim, plan, steps, train
from idsnn_jax.configs import cifar100
from idsnn_jax.losses import objective

WIDTH, BATCH, CLASSES = 0.0625, 16, 100
MEMORY = {"default": {}, "remat+pack_spikes": {"remat": True, "pack_spikes": True}}
BF16 = "bf16,bf16->bf16"


def tiny_recipe(platform: str = "cuda", **student) -> ml_collections.ConfigDict:
    """configs/cifar100.py at width 1/16, batch 16, as lowered for `platform`."""
    config = cifar100.get_config()
    config.teacher.width = config.student.width = WIDTH
    config.batch_size = config.eval_batch_size = BATCH
    config.student.update(student)
    return gl.for_platform(config, platform)


def kernels(step: gl.Step) -> int:
    """The weighted layers (convs and the head) of the model whose state `step` takes first."""
    params = jax.tree_util.tree_leaves_with_path(step.args[0].params)
    return sum(path[-1].key == "kernel" for path, _ in params)


# Every pair of levels of (devices, steps_per_call, memory) once: 4 lowerings instead of 8.
PAIRWISE = [(1, 1, "default"), (1, 8, "remat+pack_spikes"), (8, 1, "remat+pack_spikes")]
PAIRWISE.append((8, 8, "default"))


@pytest.fixture(scope="module", params=PAIRWISE, ids=lambda p: f"{p[0]}dev-k{p[1]}-{p[2]}")
def student_loop(request) -> tuple[int, gl.Step, dict, list[str]]:
    """(devices, the student's train loop, its `inspect` summary, its problems)."""
    devices, k, memory = request.param
    config = tiny_recipe(**MEMORY[memory])
    step, _ = gl.stage_steps(config, "student", gl.abstract_mesh(devices), steps_per_call=k)
    return (devices, step, *gl.check(step))


def test_auto_dtype_resolves_per_platform():
    assert gl.for_platform(cifar100.get_config(), "cuda").dtype == "bfloat16"
    assert gl.for_platform(cifar100.get_config(), "cpu").dtype == "float32"
    config = cifar100.get_config()
    config.dtype = "float32"
    assert gl.for_platform(config, "cuda").dtype == "float32"
    assert cifar100.get_config().dtype == "auto"  # a copy is changed, not the caller's


def test_student_train_loop_lowers_for_cuda_in_bfloat16(student_loop):
    devices, step, summary, problems = student_loop
    assert problems == []
    # Parameters, BN statistics, optimizer state in float32; data uint8, indices int32, the
    # key uint32, `valid` bool: nothing arrives in bfloat16.
    arg_dtypes = {leaf.dtype.name for leaf in jax.tree.leaves(step.args)}
    assert arg_dtypes == {"float32", "uint8", "int32", "uint32", "bool"}
    assert set(summary["convolution"]) == {BF16} and set(summary["dot_general"]) == {BF16}
    # Every sum (BN statistics, losses, metrics) and all-reduce (gradient means, synchronized BN)
    # is float32 but one: the head's bias gradient, flax's Dense adding its bias in bfloat16.
    assert summary["sums_16bit"] == [f"{BATCH // devices}x{CLASSES}xbf16 -> {CLASSES}xbf16"]
    assert set(summary["all_reduce"]) == {"f32"}


def test_eval_step_and_teacher_stage_lower_for_cuda():
    config = tiny_recipe()
    assert config.energy  # the recipe counts SOPs/MACs in evaluation
    mesh = gl.abstract_mesh(8)
    teacher_loop, teacher_eval = gl.stage_steps(config, "teacher", mesh)
    _, student_eval = gl.stage_steps(config, "student", mesh)
    checked = {s.name: gl.check(s) for s in (student_eval, teacher_loop, teacher_eval)}
    assert all(problems == [] for _, problems in checked.values())
    for summary, _ in checked.values():
        assert set(summary["convolution"]) == {BF16} and set(summary["all_reduce"]) == {"f32"}
    assert checked["teacher/train"][0]["dot_general"].keys() == {BF16}
    # Evaluation's counts are float32 on purpose: one matrix-vector product per weighted layer.
    for step in (student_eval, teacher_eval):
        dots = checked[step.name][0]["dot_general"]
        assert dots.pop("f32,f32->f32") == kernels(step) and dots.keys() == {BF16}


def test_lowered_steps_are_the_ones_train_fit_compiles():
    """Same primitives as `train._compile` on the same arguments (tiny, one CPU device)."""
    config = tiny_recipe("cpu")
    mesh = steps.create_mesh(jax.devices()[:1])
    loop, evaluate = gl.stage_steps(config, "student", mesh)
    run = plan.build_plan(config)
    ctx = train.RunContext("", None, None, run.info, mesh, None)
    options = run.fit_options["student"]
    tx, _ = optim.create_optimizer(options.optimizer, 1, options.num_epochs)
    fit_loop, (fit_eval, _) = train._compile(
        ctx, run.models["student"], tx, options, run.models["teacher"]
    )
    assert gl.primitives(loop) == gl.primitives(gl.Step("fit", fit_loop, loop.args))
    assert gl.primitives(evaluate) == gl.primitives(gl.Step("fit", fit_eval, evaluate.args))


def test_a_host_callback_in_the_step_fails_the_check(monkeypatch):
    def with_callback(*args, **kwargs):
        loss = objective(*args, **kwargs)
        jax.debug.callback(lambda value: None, loss)
        return loss

    monkeypatch.setattr(steps, "objective", with_callback)
    step, _ = gl.stage_steps(tiny_recipe(), "student", gl.abstract_mesh(1))
    _, problems = gl.check(step)
    assert any("host callback(s): debug_callback" in p for p in problems), problems


def test_float64_in_the_step_fails_the_check(monkeypatch):
    def in_float64(*args, **kwargs):
        return objective(*args, **kwargs).astype(jnp.float64).astype(jnp.float32)

    monkeypatch.setattr(steps, "objective", in_float64)
    with jax.enable_x64(True):
        step, _ = gl.stage_steps(tiny_recipe(), "student", gl.abstract_mesh(1))
        summary, problems = gl.check(step)
    assert summary["float64"] > 0 and any("float64" in p for p in problems), problems


STABLEHLO = "\n".join(  # one op of each kind the checks read, as jax.export prints them
    [
        "%3 = stablehlo.convolution(%1, %2) dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"
        " : (tensor<2x8x8x4xbf16>, tensor<3x3x4x8xbf16>) -> tensor<2x8x8x8xbf16> loc(#loc38)",
        "%4 = stablehlo.dot_general %a, %b, contracting_dims = [1] x [0]"
        " : (tensor<2x8xf32>, tensor<8xf32>) -> tensor<2xf32> loc(#loc3)",
        "%5 = stablehlo.reduce(%4 init: %c) applies stablehlo.add across dimensions = [0]"
        " : (tensor<2x100xbf16>, tensor<bf16>) -> tensor<100xbf16> loc(#loc4)",
        "%6 = stablehlo.reduce(%4 init: %c) applies stablehlo.add across dimensions = [0]"
        " : (tensor<2x8xf32>, tensor<f32>) -> tensor<8xf32> loc(#loc4)",
        '%7 = "stablehlo.all_reduce"(%6) <{replica_groups = dense<[[0, 1]]> : tensor<1x2xi64>}> ({',
        '^bb0(%arg4: tensor<f32> loc("psum"), %arg5: tensor<f32> loc("psum")):',
        "%8 = stablehlo.custom_call @xla_ffi_python_gpu_callback(%7)"
        " : (tensor<8xf32>) -> tensor<8xf32>",
        '%9 = "stablehlo.custom_call"(%8) <{call_target_name = "lapack_sgesdd_ffi"}>'
        " : (tensor<8xf32>) -> tensor<8xf32>",
        '%10 = stablehlo.convert %9 : (tensor<8xf32>) -> tensor<8xf64> loc("a/f64/path")',
    ]
)


def test_inspect_reads_each_op_and_problems_name_them():
    summary = gl.inspect(STABLEHLO)
    assert summary == {
        "custom_calls": {"xla_ffi_python_gpu_callback": 1, "lapack_sgesdd_ffi": 1},
        "float64": 1,
        "convolution": {BF16: 1},
        "dot_general": {"f32,f32->f32": 1},
        "sum": {"bf16": 1, "f32": 1},
        "all_reduce": {"f32": 1},
        "sums_16bit": ["2x100xbf16 -> 100xbf16"],
    }
    assert gl.problems(summary) == [
        "1 host callback(s): custom_call xla_ffi_python_gpu_callback",
        "1 unknown custom_call lapack_sgesdd_ffi",
        "1 float64 type(s)",
    ]


def test_an_op_without_a_cuda_lowering_fails_the_check():
    """LAPACK's Schur decomposition: JAX lowers it for CPUs only."""
    schur = jax.jit(lambda x: jax.lax.linalg.schur(x)[0])
    _, problems = gl.check(gl.Step("schur", schur, (jax.ShapeDtypeStruct((4, 4), jnp.float32),)))
    assert len(problems) == 1 and problems[0].startswith("no cuda lowering"), problems
    assert "schur" in problems[0]
