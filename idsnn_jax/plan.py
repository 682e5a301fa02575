"""From a config to everything a run builds, checked before any work (validate by construction).

`build_plan(config)` builds the dataset facts, both models, their abstract variables
(`jax.eval_shape`: no array is allocated), the per-stage `FitOptions` and, when the
student is initialized from the teacher, the transfer plan. Each builder owns its checks;
a ValueError raised by one names its argument (`surrogate='nope' is unknown ...`) and is
re-raised naming the config key it came from (`config.student.neuron.surrogate='nope'`).
The few rules no builder owns (roles of the two models, device counts, data shards,
paths) are checked here. So a bad student setting fails in a second, not after 200 teacher epochs.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import jax
import ml_collections

from idsnn_jax import optim
from idsnn_jax.augment import AugmentOptions
from idsnn_jax.checks import is_int
from idsnn_jax.configs import default
from idsnn_jax.datasets import DatasetInfo, dataset_info
from idsnn_jax.losses import LossOptions
from idsnn_jax.models import AXIS, create_model, init_variables, is_spiking
from idsnn_jax.precision import DTYPES, compute_dtype
from idsnn_jax.train import FitOptions
from idsnn_jax.transfer import TransferOptions, transfer_report

ROLES = ("teacher", "student")


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a run's examples come from."""

    dataset: str
    data_dir: str | None  # None: the default places, then TFDS
    max_test_examples: int | None  # None: the whole test split
    shards: int  # of the training split, in all processes together (`data_shards`)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """The teacher the students learn from, as the config names it."""

    model: str
    width: float
    checkpoint: str  # a trained teacher to load; "": trained in stage 1


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What `pipeline.run` needs, built from a valid config: the pipeline reads nothing else."""

    info: DatasetInfo
    models: dict[str, nn.Module]  # role -> model
    abstract_variables: dict[str, Any]  # role -> ShapeDtypeStruct tree
    fit_options: dict[str, FitOptions]  # role -> how that stage trains
    needs_teacher: bool
    # role -> the first that many training examples it trains on (None: all), for each role
    # in fit_options (the baseline is a student stage)
    train_examples: dict[str, int | None]
    seed: int
    data: DataSpec
    teacher: TeacherSpec
    students: tuple[tuple[str, bool, bool], ...]  # (stage, init from the teacher, distill)
    transfer: TransferOptions


def get(config: ml_collections.ConfigDict, key: str) -> Any:
    """`config.<key>` for a dotted `key`."""
    value = config
    for name in key.split("."):
        value = value[name]
    return value


def data_shards(config: ml_collections.ConfigDict) -> int:
    """The training split's shard count: `config.data_shards`, 0 meaning one per process."""
    return config.data_shards or jax.process_count()


def train_examples(config: ml_collections.ConfigDict, role: str) -> int | None:
    """The training budget of stage `role`: `config.<role>.max_train_examples`, or the global
    `config.max_train_examples` when that is None (None: the whole training split)."""
    own = config[role].max_train_examples
    return config.max_train_examples if own is None else own


def check(config: ml_collections.ConfigDict, key: str, ok: bool, expected: str) -> None:
    """Raises ValueError naming the dotted `key` unless `ok`."""
    if not ok:
        raise ValueError(f"config.{key}={get(config, key)!r} is invalid: expected {expected}")


def from_config(
    builder: Callable[..., Any], config: ml_collections.ConfigDict, keys: dict[str, str], **fixed
) -> Any:
    """`builder(**{arg: config.<key>}, **fixed)`; a ValueError that names an argument
    (message starting `arg=`) is re-raised naming its config key instead."""
    values = {arg: get(config, key) for arg, key in keys.items()}
    try:
        return builder(**values, **fixed)
    except ValueError as err:
        arg = next((a for a in keys if str(err).startswith(f"{a}=")), None)
        if arg is None:
            raise
        raise ValueError(f"config.{keys[arg]}={str(err)[len(arg) + 1 :]}") from None


def _model_keys(config: ml_collections.ConfigDict, role: str) -> dict[str, str]:
    keys = {"model": f"{role}.model", "width": f"{role}.width"}
    if is_spiking(config[role].model):
        keys |= {
            name: f"{role}.{name}"
            for name in ("time_steps", "stem_padding", "remat", "pack_spikes")
        }
        keys |= {name: f"{role}.neuron.{name}" for name in config[role].neuron}
    return keys


def build_model(config: ml_collections.ConfigDict, role: str, info: DatasetInfo) -> nn.Module:
    """The `role` ('teacher' or 'student') model of `config`, data-parallel BatchNorm."""
    return from_config(
        lambda model, **kw: create_model(model, **kw),
        config,
        _model_keys(config, role),
        num_classes=info.num_classes,
        dtype=compute_dtype(config.dtype),
        bn_axis_name=AXIS,
    )


def _fit_options(config: ml_collections.ConfigDict, role: str) -> FitOptions:
    optimizer = from_config(
        optim.OptimizerOptions, config, {name: f"optimizer.{name}" for name in config.optimizer}
    )
    loss_keys = ("kd_alpha", "kd_tau", "label_smoothing", "tet_weight", "kd_per_step")
    loss = from_config(LossOptions, config, {name: name for name in loss_keys})
    augment = from_config(
        AugmentOptions, config, {name: f"augment.{name}" for name in config.augment}
    )
    keys = {"num_epochs": f"{role}.num_epochs"}
    if role == "student":
        keys |= {"gradient": "student.gradient", "sltt_k": "student.sltt_k"}
    keys |= {
        name: name
        for name in (
            "batch_size",
            "eval_batch_size",
            "seed",
            "ema_decay",
            "checkpoint_keep",
            "checkpoint_every_epochs",
            "log_every_steps",
            "steps_per_call",
            "energy",
        )
    }
    return from_config(FitOptions, config, keys, optimizer=optimizer, loss=loss, augment=augment)


def dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'student.neuron.v_th': 0.5, ...} of a nested dict."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _check_types(config: ml_collections.ConfigDict) -> None:
    """None only where the reference recipe allows it (ConfigDict takes None for any field);
    every float finite. So no builder meets a None or an inf."""
    reference = dotted(default.get_config().to_dict())
    for key, value in dotted(config.to_dict()).items():
        if value is None and reference.get(key) is not None:
            expected = f"a {type(reference[key]).__name__}"
            raise ValueError(f"config.{key}=None is invalid: expected {expected}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"config.{key}={value!r} is invalid: expected a finite number")


def _check_rules(config: ml_collections.ConfigDict, needs_teacher: bool) -> None:
    """The rules that no builder owns."""
    devices = jax.device_count()
    check(config, "dtype", config.dtype in {"auto", *DTYPES}, f"one of {['auto', *DTYPES]}")
    ok = config.dtype != "float64" or jax.config.jax_enable_x64
    check(config, "dtype", ok, "64-bit JAX (the CLI turns it on; else JAX_ENABLE_X64=1)")
    for key in ("batch_size", "eval_batch_size"):
        value = get(config, key)
        ok = is_int(value) and value >= 1 and value % devices == 0
        check(config, key, ok, f"a positive multiple of the {devices} devices")
    for key in ("max_train_examples", *(f"{role}.max_train_examples" for role in ROLES)):
        n_train = get(config, key)
        ok = n_train is None or (is_int(n_train) and n_train >= config.batch_size)
        check(config, key, ok, "None or an integer >= batch_size")
    n_test = config.max_test_examples
    ok = n_test is None or (is_int(n_test) and n_test >= 1)
    check(config, "max_test_examples", ok, "None or an integer >= 1")
    processes = jax.process_count()
    shards = data_shards(config)
    ok = is_int(shards) and shards > 0 and shards % processes == 0
    ok = ok and config.batch_size % shards == 0
    expected = (
        f"0 (one per process) or a multiple of the {processes} process(es) dividing batch_size"
    )
    check(config, "data_shards", ok, expected)
    check(config, "teacher.model", not is_spiking(config.teacher.model), "an ANN (resnet*)")
    ok = is_spiking(config.student.model)
    check(config, "student.model", ok, "a spiking model (spiking_* or sew_*)")
    if config.student.gradient == "sltt":
        k, steps_ = config.student.sltt_k, config.student.time_steps
        ok = k is None or not is_int(k) or not is_int(steps_) or k <= steps_
        check(config, "student.sltt_k", ok, f"None or at most student.time_steps={steps_}")
        ok = not config.student.remat
        check(config, "student.remat", ok, "False with student.gradient='sltt' (it keeps one step)")
    if needs_teacher and config.teacher.checkpoint:
        ok = os.path.exists(config.teacher.checkpoint)
        check(config, "teacher.checkpoint", ok, "an existing path")


def build_plan(config: ml_collections.ConfigDict) -> RunPlan:
    """Builds and checks everything `config` describes; ValueError names the bad key."""
    _check_types(config)
    info = from_config(dataset_info, config, {"name": "dataset"})
    needs_teacher = bool(config.init_from_teacher or config.distill)
    _check_rules(config, needs_teacher)
    roles = ROLES if needs_teacher else ("student",)
    models = {role: build_model(config, role, info) for role in roles}
    abstract = {
        role: jax.eval_shape(lambda m=model: init_variables(m, info, 0))
        for role, model in models.items()
    }
    fit_options = {"student": _fit_options(config, "student")}
    if needs_teacher and not config.teacher.checkpoint:
        fit_options["teacher"] = _fit_options(config, "teacher")
    transfer_keys = {"block_map": "block_map", "copy_shortcut": "copy_shortcut"}
    transfer = from_config(TransferOptions, config, transfer_keys)
    if config.init_from_teacher:  # the report checks the block map against both trees
        report = lambda **kw: transfer_report(abstract["teacher"], abstract["student"], **kw)
        from_config(report, config, transfer_keys)
    return RunPlan(
        info,
        models,
        abstract,
        fit_options,
        needs_teacher,
        {role: train_examples(config, role) for role in fit_options},
        config.seed,
        DataSpec(config.dataset, config.data_dir, config.max_test_examples, data_shards(config)),
        TeacherSpec(config.teacher.model, config.teacher.width, config.teacher.checkpoint),
        _students(config),
        transfer,
    )


def _students(config: ml_collections.ConfigDict) -> tuple[tuple[str, bool, bool], ...]:
    """The student stages: the student as configured, and the baseline (no init, no KD)."""
    student = ("student", bool(config.init_from_teacher), bool(config.distill))
    return (student, ("baseline", False, False)) if config.compare_baseline else (student,)
