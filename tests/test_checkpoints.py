"""Stage checkpoints: round trip, best tracking, crash safety, teacher loading."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity_types

from idsnn_jax import train
from idsnn_jax.checkpoints import StageCheckpoints, load_variables


def _state(value: float) -> train.TrainState:
    variables = {
        "params": {"conv": {"kernel": jnp.full((3, 3, 2, 4), value)}},
        "batch_stats": {"bn": {"mean": jnp.full((4,), -value)}},
    }
    state = train.create_train_state(variables, optax.sgd(0.1, momentum=0.9), seed=3)
    return state.replace(step=jnp.asarray(int(value), jnp.int32))


def _save(directory, epochs_and_values, best_epochs=()):
    ckpt = StageCheckpoints(str(directory), keep=2)
    for epoch, value in epochs_and_values:
        meta = {"epoch": epoch, "history": [{"test_accuracy": value}]}
        ckpt.save(epoch, _state(value), meta, last=True, best=epoch in best_epochs)
    ckpt.close()


def test_round_trip_keeps_last_two_and_the_best(tmp_path):
    _save(tmp_path, [(1, 1.0), (2, 2.0), (3, 3.0)], best_epochs=(2,))
    assert sorted(p.name for p in (tmp_path / "last").iterdir()) == ["2", "3"]
    ckpt = StageCheckpoints(str(tmp_path))
    state, meta = ckpt.restore_latest(_state(0.0))
    best, best_meta = ckpt.restore_best(_state(0.0))
    ckpt.close()
    assert meta["epoch"] == 3 and best_meta["epoch"] == 2
    np.testing.assert_array_equal(state.params["conv"]["kernel"], np.full((3, 3, 2, 4), 3.0))
    np.testing.assert_array_equal(state.batch_stats["bn"]["mean"], np.full((4,), -3.0))
    assert int(state.step) == 3 and state.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(best.params["conv"]["kernel"], np.full((3, 3, 2, 4), 2.0))
    # The optimizer state (momentum trace) round-trips with its structure.
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(_state(0.0).opt_state)


def test_empty_stage_restores_nothing(tmp_path):
    ckpt = StageCheckpoints(str(tmp_path / "new"))
    assert ckpt.restore_latest(_state(0.0)) is None
    assert ckpt.restore_best(_state(0.0)) is None
    ckpt.close()


def test_interrupted_save_leaves_the_latest_good_checkpoint(tmp_path):
    """A save killed before orbax's final rename leaves a temporary directory behind; resuming
    must ignore it and use the newest complete epoch."""
    _save(tmp_path, [(1, 1.0)], best_epochs=(1,))
    partial = tmp_path / "last" / f"2{atomicity_types.TMP_DIR_SUFFIX}1234"
    shutil.copytree(tmp_path / "last" / "1", partial)
    (partial / "state" / "manifest.ocdbt").unlink(missing_ok=True)  # half-written
    ckpt = StageCheckpoints(str(tmp_path))
    state, meta = ckpt.restore_latest(_state(0.0))
    ckpt.close()
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(state.params["conv"]["kernel"], np.full((3, 3, 2, 4), 1.0))


def test_load_variables_resolves_stage_manager_and_epoch_dirs(tmp_path):
    _save(tmp_path, [(1, 1.0), (2, 2.0)], best_epochs=(1,))
    for path, value in [
        (tmp_path, 1.0),  # a stage directory: its best checkpoint
        (tmp_path / "last", 2.0),  # a manager directory: its newest epoch
        (tmp_path / "last" / "1", 1.0),  # one epoch
    ]:
        variables = load_variables(str(path))
        assert set(variables) == {"params", "batch_stats"}
        np.testing.assert_array_equal(variables["params"]["conv"]["kernel"], value)
        np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], -value)


def test_load_variables_names_the_path_when_nothing_is_there(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_variables(str(tmp_path / "empty"))
