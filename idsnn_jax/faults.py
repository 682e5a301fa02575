"""Faults and preemption: where a run may be stopped, and how it stops.

A run may die anywhere (SIGKILL, a lost machine); the checkpoints make a rerun of the same
command end exactly where an uninterrupted run would (README "Faults and preemption").
SIGTERM and SIGINT, what schedulers send before they preempt, stop it more gently: the CLI
installs `install_stop_handlers`, whose handler only records the signal; the training loop
calls `point` at a few safe places (after each train dispatch, after an epoch's checkpoint
was started, at the end of a stage, after a student's transfer), which raises `Preempted`
once a signal was recorded. `train.fit` waits for the pending checkpoint save on the way out
and the CLI prints the exception's one line and exits with 128 + the signal's number. A
second signal while stopping gets the handler that was there before (Python's: SIGINT
raises KeyboardInterrupt, SIGTERM kills).

The same points let tests fault the run deterministically: `IDSNN_FAULT=<point>:<n>` sends
SIGKILL to this process the n-th time (1-based, counted from process start) it reaches
the point named `<point>` (`train_call`, `save`, `stage_end` or `transfer`);
`IDSNN_FAULT=<point>:<n>:TERM` (or `:INT`) sends that signal instead. Unset, `point` costs a
dictionary lookup.
"""

from __future__ import annotations

import collections
import os
import signal
from typing import Any

ENV = "IDSNN_FAULT"
POINTS = ("train_call", "save", "stage_end", "transfer")
_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}

_hits: collections.Counter[str] = collections.Counter()
_stop: list[int] = []  # the signal that asked the run to stop (at most one)
_previous: dict[int, Any] = {}


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run at a safe point; `signum` is the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def install_stop_handlers() -> None:
    """SIGTERM and SIGINT ask the run to stop at the next `point` (main thread only)."""
    for signum in (signal.SIGTERM, signal.SIGINT):
        _previous[signum] = signal.signal(signum, _handle)


def _handle(signum: int, frame: Any) -> None:
    if not _stop:
        _stop.append(signum)
    signal.signal(signum, _previous.get(signum, signal.SIG_DFL))  # a second one is not gentle


def point(name: str, stage: str, epoch: int, saved: int) -> None:
    """A safe place to stop: raises `Preempted` if a stop signal arrived (and fires the
    `IDSNN_FAULT` fault set for `name`, if any). `epoch` (1-based) is the one in progress in
    `stage`, `saved` the stage's newest checkpointed epoch (0: none yet; `saved == epoch`
    once that epoch's save was started, which `train.fit` waits for before it returns)."""
    spec = os.environ.get(ENV)
    if spec:
        _inject(spec, name)
    if not _stop:
        return
    signame = signal.Signals(_stop[0]).name
    if saved == epoch:
        where, resume = f"after epoch {epoch}", f"resume after epoch {epoch}, its last checkpoint"
    elif saved:
        where, resume = f"epoch {epoch}", f"resume from the checkpoint of epoch {saved}"
    else:
        where, resume = f"epoch {epoch}", "resume (the stage has no checkpoint yet: it restarts)"
    raise Preempted(
        _stop[0],
        f"interrupted by {signame} in stage {stage}, {where}: rerun the same command to {resume}",
    )


def _inject(spec: str, name: str) -> None:
    """Sends the signal `spec` ('<point>:<n>[:<signal>]') asks for, if this is its n-th hit."""
    target, _, rest = spec.partition(":")
    count, _, signame = rest.partition(":")
    if target not in POINTS or not count.isdigit() or signame not in ("", *_SIGNALS):
        raise ValueError(
            f"{ENV}={spec!r} is invalid: expected <point>:<n>[:KILL|TERM|INT] with <point> one "
            f"of {', '.join(POINTS)}"
        )
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] == int(count):
        os.kill(os.getpid(), _SIGNALS[signame or "KILL"])  # runs a Python handler before returning
