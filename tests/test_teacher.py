"""A given teacher checkpoint (idsnn_jax.teacher): loaded as saved, and refused before any
work when it holds another model, naming the first differing path and both shapes."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest

from idsnn_jax import checkpoints, steps, teacher
from idsnn_jax.datasets import dataset_info
from idsnn_jax.models import create_model, init_variables
from idsnn_jax.plan import TeacherSpec

INFO = dataset_info("cifar10")


def _abstract(width: float):
    model = create_model("resnet18", num_classes=10, width=width, bn_axis_name="batch")
    return jax.eval_shape(lambda: init_variables(model, INFO, 0))


def _save(directory, width: float, seed: int = 0):
    """A teacher stage directory holding one epoch of a resnet18 of `width` (random weights)."""
    model = create_model("resnet18", num_classes=10, width=width, bn_axis_name="batch")
    variables = jax.device_get(init_variables(model, INFO, seed))
    ckpt = checkpoints.StageCheckpoints(str(directory))
    ckpt.save(1, steps.create_train_state(variables, optax.sgd(0.1), 0), {"history": []}, 0.5)
    ckpt.close()
    return variables


def test_a_matching_checkpoint_loads_as_saved(tmp_path):
    saved = _save(tmp_path / "teacher", 0.0625, seed=3)
    spec = TeacherSpec("resnet18", 0.0625, str(tmp_path / "teacher"))
    teacher.check_checkpoint(spec, "cifar10", _abstract(0.0625))
    loaded = teacher.load(spec, "cifar10", _abstract(0.0625))
    jax.tree.map(np.testing.assert_array_equal, loaded, saved)


def test_another_width_names_the_first_path_and_both_shapes(tmp_path):
    _save(tmp_path / "teacher", 0.125)
    spec = TeacherSpec("resnet18", 0.0625, str(tmp_path / "teacher"))
    for check in (teacher.check_checkpoint, teacher.load):
        with pytest.raises(ValueError) as err:
            check(spec, "cifar10", _abstract(0.0625))
        message = str(err.value)
        assert message.startswith(
            f"config.teacher.checkpoint='{tmp_path / 'teacher'}' does not hold a 'resnet18' of "
            "width 0.0625 for cifar10: params/head/kernel is (64, 10) float32 in the checkpoint "
            "but (32, 10) float32 in the model"
        )
