"""Per-stage orbax checkpoints: resume where a run stopped, keep the best, reuse a teacher.

One `CheckpointManager` per stage directory (e.g. `<workdir>/teacher`) holds epoch
directories `<epoch>/{state,meta,metrics}`: `state` is the whole `TrainState`, `meta`
(JSON) the metric history up to that epoch, `metrics` the epoch's test accuracy. Its
preservation policy keeps the newest `keep` epochs (for resuming) and the best epoch by
test accuracy (ties go to the earlier epoch, as the reference's strict `acc > best`), so
each epoch is written once and every kept epoch lies on the run's own trajectory.

Orbax writes each checkpoint into a temporary directory and renames it when complete, so
an interrupted save never replaces the latest good checkpoint. Saves are asynchronous
(training goes on while they are written); `close()` waits for them. Restores go against
an abstract target placed on the current devices, so a checkpoint written on N devices
loads on M. With several processes every one of them calls each save and restore (orbax
coordinates them; the workdir must be on a filesystem all hosts share), and the train state
is restored straight onto the mesh that spans them.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from idsnn_jax import faults

METRIC = "test_accuracy"
PARTIAL_DIR = "partial"  # in a stage directory: the state of an epoch stopped midway


def _rank(metrics: dict[str, float]) -> tuple[float, int]:
    """Sort key of an epoch: higher accuracy first, then the earlier epoch."""
    return metrics[METRIC], -metrics["epoch"]


def _manager(directory: str, keep: int, *, create: bool = True) -> ocp.CheckpointManager:
    policy = checkpoint_managers.AnyPreservationPolicy(
        [
            checkpoint_managers.LatestN(n=keep),
            checkpoint_managers.BestN(get_metric_fn=_rank, n=1),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        best_fn=_rank, best_mode="max", preservation_policy=policy, create=create
    )
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def _partial_manager(directory: str, *, create: bool = True) -> ocp.CheckpointManager:
    """The manager of `<stage>/PARTIAL_DIR`: the one newest mid-epoch state."""
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=create)
    return ocp.CheckpointManager(directory, options=options, item_handlers=_handlers())


def _handlers() -> dict[str, ocp.CheckpointHandler]:
    return {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()}


class StageCheckpoints:
    """The checkpoint manager of one training stage (newest `keep` epochs + the best), and the
    state of an epoch stopped midway (`save_partial`), in `<stage>/PARTIAL_DIR`."""

    def __init__(self, directory: str, *, keep: int = 2) -> None:
        self.directory = os.path.abspath(directory)
        self.manager = _manager(self.directory, keep)

    def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """`(state, meta)` of the newest epoch, or of the epoch stopped midway after it (its
        meta has `steps_done`), restored onto `target`'s structure and shardings; None when
        the stage has neither yet."""
        epoch = self._restore(self.manager, self.manager.latest_step(), target)
        partial = None
        if os.path.isdir(self.partial_directory):
            with _partial_manager(self.partial_directory, create=False) as manager:
                partial = self._restore(manager, manager.latest_step(), target)
        done = lambda restored: len(restored[1]["history"])
        if partial is not None and (epoch is None or done(partial) >= done(epoch)):
            return partial  # a stale one (an epoch saved since) is older than `epoch`
        return epoch

    @property
    def partial_directory(self) -> str:
        return os.path.join(self.directory, PARTIAL_DIR)

    def save_partial(self, state: Any, meta: dict[str, Any]) -> None:
        """Saves the state of an epoch stopped midway (meta: its `history` of finished epochs,
        `steps_done` and their `metrics`) and waits until it is written; replaces the last."""
        faults.write_point(self.partial_directory)
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        with _partial_manager(self.partial_directory) as manager:
            manager.save(int(jax.device_get(state.step)), args=args, force=True)
            manager.wait_until_finished()

    def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """`(state, meta)` of the best-accuracy epoch, or None."""
        return self._restore(self.manager, self.manager.best_step(), target)

    def save(self, epoch: int, state: Any, meta: dict[str, Any], test_accuracy: float) -> None:
        """Saves `state` after `epoch` (1-based; greater than every saved epoch)."""
        faults.write_point(os.path.join(self.directory, str(epoch)))
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(epoch, args=args, metrics={METRIC: test_accuracy, "epoch": epoch})

    def close(self) -> None:
        """Waits for pending asynchronous saves and releases the manager."""
        self.manager.wait_until_finished()
        self.manager.close()

    @staticmethod
    def _restore(
        manager: ocp.CheckpointManager, step: int | None, target: Any
    ) -> tuple[Any, dict[str, Any]] | None:
        if step is None:
            return None
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["meta"]


def fingerprint(tree: Any) -> str:
    """Content hash of a pytree of host arrays (tree paths, dtypes, shapes, bytes): sha256,
    the first 16 hex digits. What a resumed stage checks its teacher and data against."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        array = np.ascontiguousarray(np.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)}:{array.dtype}:{array.shape};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def has_checkpoint(directory: str) -> bool:
    """Whether the stage `directory` holds a finished epoch (orbax's temporary directories of
    interrupted saves do not count)."""
    return os.path.isdir(directory) and any(
        name.isdigit() and os.path.isdir(os.path.join(directory, name))
        for name in os.listdir(directory)
    )


def best_epoch(directory: str) -> int | None:
    """The best saved epoch of the stage `directory`, or None when it holds none."""
    if not os.path.isdir(directory):
        return None
    with _manager(directory, keep=1, create=False) as manager:
        return manager.best_step()


def locate(path: str) -> tuple[str, int]:
    """(stage directory, epoch) that `path` names: an epoch, or a stage's best epoch."""
    if os.path.isdir(os.path.join(path, "state")) and os.path.basename(path).isdigit():
        return os.path.dirname(path), int(os.path.basename(path))
    step = best_epoch(path)
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint at {path!r}: expected a stage directory written by idsnn_jax "
            "(holding <epoch>/state) or one epoch's directory"
        )
    return path, step


def load_variables(path: str) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of a saved model, as host NumPy arrays.

    `path` is a stage directory written by this package (its best epoch is used) or one
    epoch's directory. Works whatever the number of devices and processes the checkpoint was
    written on: the arrays are restored onto this process's first device, not the saved
    sharding. With several processes every one calls it, and each gets the whole arrays
    (`steps.replicate` then places them on the mesh).
    """
    directory, step = locate(os.path.abspath(path))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with _manager(directory, keep=1, create=False) as manager:
        metadata = manager.item_metadata(step)["state"]
        target = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata
        )
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )
    state = restored["state"]
    return jax.tree.map(
        np.asarray, {"params": state["params"], "batch_stats": state["batch_stats"]}
    )


def saved_shapes(path: str) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of a saved model as `jax.ShapeDtypeStruct` trees, read from
    the checkpoint's metadata (no array is loaded). `path` as in `load_variables`."""
    directory, step = locate(os.path.abspath(path))
    with _manager(directory, keep=1, create=False) as manager:
        metadata = manager.item_metadata(step)["state"]
    return {
        key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), metadata.get(key, {}))
        for key in ("params", "batch_stats")
    }
