"""Per-stage orbax checkpoints: resume where a run stopped, keep the best, reuse a teacher.

Layout under a stage directory (e.g. `<workdir>/teacher`):
  `last/<epoch>/{state,meta}`: the newest `keep` saved epochs, for resuming;
  `best/<epoch>/{state,meta}`: the epoch with the best test accuracy so far.
`state` is the whole `TrainState`; `meta` (JSON) is the epoch and the metric history.
Orbax writes each checkpoint into a temporary directory and renames it when complete,
so an interrupted save never replaces the latest good checkpoint. Saves are asynchronous
(training goes on while they are written); `close()` waits for them.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


class StageCheckpoints:
    """The `last/` and `best/` checkpoint managers of one training stage."""

    def __init__(self, directory: str, *, keep: int = 2) -> None:
        self.directory = os.path.abspath(directory)
        self.last = _manager(os.path.join(self.directory, "last"), keep)
        self.best = _manager(os.path.join(self.directory, "best"), 1)

    def restore_latest(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """`(state, meta)` of the newest checkpoint, restored onto `target`'s structure
        and shardings, or None when the stage has none yet."""
        return _restore(self.last, target)

    def restore_best(self, target: Any) -> tuple[Any, dict[str, Any]] | None:
        """`(state, meta)` of the best-accuracy checkpoint, or None."""
        return _restore(self.best, target)

    def save(self, epoch: int, state: Any, meta: dict[str, Any], *, last: bool, best: bool) -> None:
        """Saves `state` after `epoch` (1-based) to `last/` and/or `best/`."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        for wanted, manager in ((last, self.last), (best, self.best)):
            if wanted:
                manager.save(epoch, args=args)

    def close(self) -> None:
        """Waits for pending asynchronous saves and releases the managers."""
        for manager in (self.last, self.best):
            manager.wait_until_finished()
            manager.close()


def _restore(manager: ocp.CheckpointManager, target: Any) -> tuple[Any, dict[str, Any]] | None:
    step = manager.latest_step()
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


def load_variables(path: str) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of a saved model, as host arrays.

    `path` may be a stage directory written by this package (its best checkpoint is
    used), a `last/` or `best/` directory (its newest epoch), or one epoch's directory.
    """
    path = os.path.abspath(path)
    if os.path.isdir(os.path.join(path, "best")):
        path = os.path.join(path, "best")
    if not os.path.isdir(os.path.join(path, "state")):
        epochs = [int(d) for d in os.listdir(path) if d.isdigit()] if os.path.isdir(path) else []
        if not epochs:
            raise FileNotFoundError(
                f"no checkpoint at {path!r}: expected a stage directory (with best/ or last/), "
                "a best/ or last/ directory, or an epoch directory holding state/"
            )
        path = os.path.join(path, str(max(epochs)))
    with ocp.StandardCheckpointer() as checkpointer:
        state = checkpointer.restore(os.path.join(path, "state"))
    return {"params": state["params"], "batch_stats": state["batch_stats"]}
