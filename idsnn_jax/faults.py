"""Faults and preemption: where a run may be stopped, and how it stops.

A run may die anywhere (SIGKILL, a lost machine); the checkpoints make a rerun of the same
command end exactly where an uninterrupted run would (README "Faults and preemption").
SIGTERM and SIGINT, what schedulers send before they preempt, stop it more gently: the
training loop calls `point` at a few safe places (after each train dispatch, after an
epoch's checkpoint was started, at the end of a stage, after a student's transfer), and
`point` returns the stop signal once one arrived; the loop then saves where it is (a
dispatch: the state mid-epoch) and raises `Preempted`, whose one line the CLI prints before
exiting with 128 + the signal's number.

One process: `install_stop_handlers` records SIGTERM/SIGINT in Python. Several processes
(`jax.distributed`): JAX's preemption service owns SIGTERM (it catches it on any process and
makes every process agree on one safe point, `multihost_utils.reached_preemption_sync_point`),
so all of them stop at the same dispatch; SIGINT is forwarded to it as SIGTERM. A second
signal while stopping gets the handler that was there before (Python's: SIGINT raises
KeyboardInterrupt, SIGTERM kills).

The same points let tests fault the run deterministically: `IDSNN_FAULT=<point>:<n>` sends
SIGKILL to this process the n-th time (1-based, counted from process start) it reaches
the point named `<point>` (`train_call`, `save`, `stage_end` or `transfer`);
`IDSNN_FAULT=<point>:<n>:TERM` (or `:INT`) sends that signal instead. Every file write of
the run passes `write_point` (`files.py`, the checkpoint saves): `IDSNN_FAULT=write:<n>:ENOSPC`
(or `:EROFS`) makes the n-th write fail as a full disk (a read-only filesystem) would.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import time
from typing import Any

import jax
from jax.experimental import multihost_utils

ENV = "IDSNN_FAULT"
POINTS = ("train_call", "save", "stage_end", "transfer")
_SIGNALS = {"KILL": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT}
_ERRORS = {"ENOSPC": errno.ENOSPC, "EROFS": errno.EROFS}

_hits: collections.Counter[str] = collections.Counter()
_stop: list[int] = []  # the signal that asked this process to stop (at most one)
_previous: dict[int, Any] = {}
_NOTICE_S = 2.0  # pause after an injected stop signal with several processes (seconds)
_points = 0  # safe points passed: the step id every process gives JAX's preemption sync


class Preempted(Exception):
    """SIGTERM or SIGINT stopped the run at a safe point; `signum` is the signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum


def install_stop_handlers() -> None:
    """SIGTERM and SIGINT ask the run to stop at the next `point` (main thread only). Call it
    after `jax.distributed` is started: with several processes SIGTERM stays JAX's."""
    signums = (signal.SIGTERM, signal.SIGINT) if jax.process_count() == 1 else (signal.SIGINT,)
    for signum in signums:
        _previous[signum] = signal.signal(signum, _handle)


def _handle(signum: int, frame: Any) -> None:
    if not _stop:
        _stop.append(signum)
    signal.signal(signum, _previous.get(signum, signal.SIG_DFL))  # a second one is not gentle
    if jax.process_count() > 1:  # JAX's preemption service tells every process
        os.kill(os.getpid(), signal.SIGTERM)


def point(name: str) -> int | None:
    """A safe place to stop: the stop signal (SIGTERM or SIGINT) once one arrived, agreed by
    every process (all stop at the same point), else None. Fires the `IDSNN_FAULT` fault set
    for `name`, if any, first."""
    global _points
    spec = os.environ.get(ENV)
    if spec:
        _inject(spec, name)
    _points += 1
    if jax.process_count() == 1:
        return _stop[0] if _stop else None
    if multihost_utils.reached_preemption_sync_point(_points):
        return _stop[0] if _stop else signal.SIGTERM
    return None


def stopped(signum: int, stage: str, where: str, resume: str) -> Preempted:
    """The `Preempted` of a stop in `stage` at `where`, saying what the rerun resumes from."""
    signame = signal.Signals(signum).name
    return Preempted(
        signum,
        f"interrupted by {signame} in stage {stage}, {where}: rerun the same command to {resume}",
    )


def write_point(path: str) -> None:
    """Before each write of the run's files: raises the OSError `IDSNN_FAULT=write:<n>:<errno>`
    asks for at the n-th write, naming `path`."""
    spec = os.environ.get(ENV)
    if spec:
        _inject(spec, "write", path)


def _inject(spec: str, name: str, path: str = "") -> None:
    """Sends the signal (or raises the OSError at a write) `spec` ('<point>:<n>[:<kind>]') asks
    for, if this is its n-th hit."""
    target, _, rest = spec.partition(":")
    count, _, kind = rest.partition(":")
    kinds = ("", *_SIGNALS) if target in POINTS else tuple(_ERRORS)
    if target not in (*POINTS, "write") or not count.isdigit() or kind not in kinds:
        raise ValueError(
            f"{ENV}={spec!r} is invalid: expected <point>:<n>[:KILL|TERM|INT] with <point> one "
            f"of {', '.join(POINTS)}, or write:<n>:{'|'.join(_ERRORS)}"
        )
    if target != name:
        return
    _hits[name] += 1
    if _hits[name] != int(count):
        return
    if name == "write":
        raise OSError(_ERRORS[kind], os.strerror(_ERRORS[kind]), path)
    os.kill(os.getpid(), _SIGNALS[kind or "KILL"])  # runs a Python handler before returning
    if jax.process_count() > 1:
        # JAX's preemption notice reaches the coordinator asynchronously; pausing here (the
        # other processes wait in this step's all-reduce) lets an injected stop land at the
        # next safe points however fast the steps run, as a real SIGTERM between steps would.
        time.sleep(_NOTICE_S)
