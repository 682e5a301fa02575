"""The plan's own rules: the models `config.dtype` builds on this backend, and the per-stage
options it builds from the config."""

from __future__ import annotations

import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from idsnn_jax import plan
from idsnn_jax.augment import AugmentOptions
from idsnn_jax.configs import fashion_mnist_modern, tiny
from idsnn_jax.losses import LossOptions

CONFIGS = sorted(
    p.stem
    for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
    if p.stem != "__init__"
)


def test_auto_dtype_builds_float32_models_on_cpu():
    config = tiny.get_config()
    config.dtype = "auto"
    built = plan.build_plan(config)
    assert all(m.dtype == jnp.float32 for m in built.models.values())
    assert jax.default_backend() == "cpu"


def test_steps_per_call_reaches_the_fit_options():
    config = tiny.get_config()
    config.steps_per_call = 3
    built = plan.build_plan(config)
    assert {o.steps_per_call for o in built.fit_options.values()} == {3}
    config.steps_per_call = 0
    with pytest.raises(ValueError, match=r"^config\.steps_per_call=0 is invalid"):
        plan.build_plan(config)


@pytest.mark.parametrize(
    "processes, shards, ok",
    [
        (1, 0, True),
        (1, 1, True),
        (1, 2, True),
        (1, 16, True),
        (1, 3, False),  # does not divide batch_size=16
        (1, 32, False),
        (1, -1, False),
        (2, 0, True),  # one per process
        (2, 4, True),
        (2, 1, False),  # not a multiple of the processes
        (2, 6, False),
    ],
)
def test_data_shards_rule(monkeypatch, processes, shards, ok):
    monkeypatch.setattr(jax, "process_count", lambda: processes)
    config = tiny.get_config()
    config.data_shards = shards
    if ok:
        plan.build_plan(config)
        return
    with pytest.raises(ValueError) as err:
        plan.build_plan(config)
    message = str(err.value)
    assert message.startswith(f"config.data_shards={shards!r} is invalid: expected 0 (one per")
    assert f"multiple of the {processes} process(es) dividing batch_size" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_a_plan(name):
    """Every shipped config is valid as written (models, options and transfer plan)."""
    config = importlib.import_module(f"idsnn_jax.configs.{name}").get_config()
    built = plan.build_plan(config)
    assert built.fit_options["student"].num_epochs == config.student.num_epochs


def test_modern_options_reach_the_fit_options():
    """Each config key of the modern recipe lands in the student stage's options."""
    student = plan.build_plan(fashion_mnist_modern.get_config()).fit_options["student"]
    assert student.loss == LossOptions(label_smoothing=0.1, tet_weight=1.0, kd_per_step=True)
    assert student.augment == AugmentOptions(flip=False, cutout=8, auto_augment=True)
    optimizer = student.optimizer
    assert (optimizer.schedule, optimizer.warmup_epochs, student.ema_decay) == ("cosine", 1, 0.99)


@pytest.mark.parametrize(
    "key", ["max_train_examples", "teacher.max_train_examples", "student.max_train_examples"]
)
@pytest.mark.parametrize("value", [8, 0, -1])  # 8: fewer than one batch (batch_size=16)
def test_training_budgets_are_checked_naming_the_key(key, value):
    config = tiny.get_config()
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
        node = node[name]
    node[leaf] = value
    with pytest.raises(ValueError) as err:
        plan.build_plan(config)
    expected = f"config.{key}={value!r} is invalid: expected None or an integer >= batch_size"
    assert str(err.value) == expected


def test_each_stage_has_its_own_budget_or_the_global_one():
    """None inherits `max_train_examples` (None: all); the baseline is a student stage, a
    run without a teacher to train has the student's budget only."""
    config = tiny.get_config()
    config.max_train_examples, config.student.max_train_examples = 48, 32
    assert plan.build_plan(config).train_examples == {"student": 32, "teacher": 48}
    config.max_train_examples, config.teacher.max_train_examples = None, 16
    assert plan.build_plan(config).train_examples == {"student": 32, "teacher": 16}
    config.student.max_train_examples = None
    assert plan.build_plan(config).train_examples == {"student": None, "teacher": 16}
    config.init_from_teacher = config.distill = False
    assert plan.build_plan(config).train_examples == {"student": None}


def test_gradient_options_reach_the_student_and_bad_ones_name_their_key():
    """`student.gradient` / `student.sltt_k` land in the student's options only; refused
    values and combinations fail in one line naming the key."""
    config = tiny.get_config()
    config.student.time_steps = 4
    config.student.gradient, config.student.sltt_k = "sltt", 2
    built = plan.build_plan(config)
    assert (built.fit_options["student"].gradient, built.fit_options["student"].sltt_k) == (
        "sltt",
        2,
    )
    assert built.fit_options["teacher"].gradient == "bptt"
    cases = [
        ({"gradient": "ottt", "sltt_k": None}, "config.student.gradient='ottt' is invalid"),
        ({"sltt_k": 0}, "config.student.sltt_k=0 is invalid: expected None (all time steps)"),
        ({"sltt_k": 5}, "config.student.sltt_k=5 is invalid: expected None or at most"),
        ({"gradient": "bptt", "sltt_k": 2}, "config.student.sltt_k=2 is invalid: expected None"),
        ({"sltt_k": None, "remat": True}, "config.student.remat=True is invalid: expected False"),
    ]
    for changes, message in cases:
        bad = tiny.get_config()
        bad.student.time_steps = 4
        bad.student.gradient = "sltt"
        for key, value in changes.items():
            bad.student[key] = value
        with pytest.raises(ValueError) as err:
            plan.build_plan(bad)
        assert str(err.value).startswith(message), str(err.value)
        assert "\n" not in str(err.value)
