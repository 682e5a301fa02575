"""Stage checkpoints: round trip, newest + best kept, crash safety, teacher loading."""

from __future__ import annotations

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from orbax.checkpoint._src.path import atomicity_types

from idsnn_jax import steps
from idsnn_jax.checkpoints import StageCheckpoints, has_checkpoint, load_variables, saved_shapes


def _state(value: float) -> steps.TrainState:
    variables = {
        "params": {"conv": {"kernel": jnp.full((3, 3, 2, 4), value)}},
        "batch_stats": {"bn": {"mean": jnp.full((4,), -value)}},
    }
    state = steps.create_train_state(variables, optax.sgd(0.1, momentum=0.9), seed=3)
    return state.replace(step=jnp.asarray(int(value), jnp.int32))


def _save(directory, accuracies: list[float], keep: int = 2) -> None:
    """Epochs 1..n with state value = epoch and the given test accuracies."""
    ckpt = StageCheckpoints(str(directory), keep=keep)
    for epoch, accuracy in enumerate(accuracies, 1):
        meta = {"epoch": epoch, "history": [{"test_accuracy": a} for a in accuracies[:epoch]]}
        ckpt.save(epoch, _state(float(epoch)), meta, accuracy)
    ckpt.close()


def test_round_trip_keeps_the_newest_and_the_best(tmp_path):
    _save(tmp_path, [0.1, 0.6, 0.3, 0.2])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3", "4"]  # best 2; newest 3, 4
    ckpt = StageCheckpoints(str(tmp_path))
    state, meta = ckpt.restore_latest(_state(0.0))
    best, best_meta = ckpt.restore_best(_state(0.0))
    ckpt.close()
    assert meta["epoch"] == 4 and best_meta["epoch"] == 2
    np.testing.assert_array_equal(state.params["conv"]["kernel"], np.full((3, 3, 2, 4), 4.0))
    np.testing.assert_array_equal(state.batch_stats["bn"]["mean"], np.full((4,), -4.0))
    assert int(state.step) == 4 and state.rng.dtype == jnp.uint32
    np.testing.assert_array_equal(best.params["conv"]["kernel"], np.full((3, 3, 2, 4), 2.0))
    # The optimizer state (momentum trace) round-trips with its structure.
    assert jax.tree.structure(state.opt_state) == jax.tree.structure(_state(0.0).opt_state)


def test_ties_go_to_the_earlier_epoch(tmp_path):
    """As the reference's strict `acc > best`: of equal accuracies the first epoch is best."""
    _save(tmp_path, [0.5, 0.7, 0.7, 0.7], keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "4"]
    np.testing.assert_array_equal(load_variables(str(tmp_path))["params"]["conv"]["kernel"], 2.0)


def test_empty_stage_restores_nothing(tmp_path):
    ckpt = StageCheckpoints(str(tmp_path / "new"))
    assert ckpt.restore_latest(_state(0.0)) is None
    assert ckpt.restore_best(_state(0.0)) is None
    ckpt.close()


def test_interrupted_save_leaves_the_latest_good_checkpoint(tmp_path):
    """A save killed before orbax's final rename leaves a temporary directory behind; resuming
    must ignore it and use the newest complete epoch."""
    _save(tmp_path, [0.5])
    partial = tmp_path / f"2{atomicity_types.TMP_DIR_SUFFIX}1234"
    shutil.copytree(tmp_path / "1", partial)
    (partial / "state" / "manifest.ocdbt").unlink(missing_ok=True)  # half-written
    ckpt = StageCheckpoints(str(tmp_path))
    state, meta = ckpt.restore_latest(_state(0.0))
    ckpt.close()
    assert meta["epoch"] == 1
    np.testing.assert_array_equal(state.params["conv"]["kernel"], np.full((3, 3, 2, 4), 1.0))


def test_load_variables_resolves_stage_and_epoch_dirs(tmp_path):
    _save(tmp_path, [0.9, 0.5])
    for path, value in [
        (tmp_path, 1.0),  # a stage directory: its best epoch, not the newest
        (tmp_path / "2", 2.0),  # one epoch
    ]:
        variables = load_variables(str(path))
        assert set(variables) == {"params", "batch_stats"}
        assert isinstance(variables["params"]["conv"]["kernel"], np.ndarray)
        np.testing.assert_array_equal(variables["params"]["conv"]["kernel"], value)
        np.testing.assert_array_equal(variables["batch_stats"]["bn"]["mean"], -value)


def test_load_variables_names_the_path_when_nothing_is_there(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        load_variables(str(tmp_path / "empty"))


def test_saved_shapes_reads_metadata_only(tmp_path):
    _save(tmp_path, [0.9, 0.5])
    shapes = saved_shapes(str(tmp_path / "2"))
    assert shapes["params"]["conv"]["kernel"] == jax.ShapeDtypeStruct((3, 3, 2, 4), jnp.float32)
    assert shapes["batch_stats"]["bn"]["mean"] == jax.ShapeDtypeStruct((4,), jnp.float32)
    assert jax.tree.structure(shapes) == jax.tree.structure(load_variables(str(tmp_path)))


def test_has_checkpoint_ignores_half_written_epochs(tmp_path):
    assert not has_checkpoint(str(tmp_path / "nothing"))
    _save(tmp_path / "done", [0.5])
    assert has_checkpoint(str(tmp_path / "done"))
    partial = tmp_path / "partial" / f"1{atomicity_types.TMP_DIR_SUFFIX}1234"
    shutil.copytree(tmp_path / "done" / "1", partial)
    assert not has_checkpoint(str(tmp_path / "partial"))
