"""Where metrics go: stdout, `<workdir>/metrics.jsonl`, TensorBoard and the run's plots,
from process 0; and how they are read back.

TensorBoard events are written with tensorboardX, which (unlike CLU's writers) does not
import TensorFlow. `<workdir>/curves.png` and `firing_rates.png` are redrawn after every
epoch (`plots.py`). A progress bar shows throughput during an epoch when stderr is a TTY.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax
from tqdm import tqdm

from idsnn_jax import files

logger = logging.getLogger("idsnn_jax")
METRICS_FILE = "metrics.jsonl"


def setup_logging() -> None:
    """Shows this package's INFO messages on stdout unless the caller configured it."""
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class MetricLogger:
    """Appends one JSON record per call to `metrics.jsonl`, mirrors scalars to TensorBoard
    (one run per stage under `tensorboard/`), redraws the run's plots (unless `plots=False`)
    and logs a one-line summary."""

    def __init__(self, workdir: str, plots: bool = True) -> None:
        self.workdir = workdir
        self.plots = plots
        self.enabled = jax.process_index() == 0
        self._writers: dict[str, Any] = {}
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)
            path = os.path.join(workdir, METRICS_FILE)
            if files.repair_last_line(path):
                logger.warning("%s: removed a last line cut short by an earlier crash", path)

    def write(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        """Records `metrics` of `stage` after `epoch` (1-based)."""
        if not self.enabled:
            return
        record = {"stage": stage, "epoch": epoch, "time": time.time(), **metrics}
        files.append_line(os.path.join(self.workdir, METRICS_FILE), json.dumps(record))
        if self.plots:
            from idsnn_jax import plots  # matplotlib only where plots are drawn

            plots.write_run_plots(self.workdir, epochs_by_stage(read_records(self.workdir)))
        writer = self._writer(stage)
        for key, value in metrics.items():
            writer.add_scalar(key, value, epoch)
        writer.flush()
        logger.info("%s", epoch_line(stage, epoch, metrics))

    def _writer(self, stage: str) -> Any:
        if stage not in self._writers:
            from tensorboardX import SummaryWriter

            self._writers[stage] = SummaryWriter(os.path.join(self.workdir, "tensorboard", stage))
        return self._writers[stage]

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def read_records(path: str) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (or of the one in directory `path`), in file order.

    A line that is not a JSON record (half-written by a killed run, damaged) is left out; the
    lines left out are counted in a warning naming the file and the first of them.
    """
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    with open(path) as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    records, bad = [], []
    for line_number, line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and {"stage", "epoch"} <= record.keys():
            records.append(record)
        else:
            bad.append(line_number)
    if bad:
        logger.warning(
            "%s: skipped %d line(s) that are not records (line %d)", path, len(bad), bad[0]
        )
    return records


def epochs_by_stage(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Stage (in order of first appearance) -> its records in epoch order. An epoch logged
    twice (a run killed after logging an epoch but before checkpointing it redoes that epoch
    on resume) counts once, with its last record."""
    stages: dict[str, dict[int, dict[str, Any]]] = {}
    for record in records:
        stages.setdefault(record["stage"], {})[int(record["epoch"])] = record
    return {stage: [by_epoch[e] for e in sorted(by_epoch)] for stage, by_epoch in stages.items()}


FIRING_RATE_PREFIX = "firing_rate/"  # of each spiking layer's rate in a record


def mean_firing_rate(record: dict[str, Any]) -> float | None:
    """The mean over spiking layers of a record's `firing_rate/<layer>` (None: no spikes)."""
    rates = [v for k, v in record.items() if k.startswith(FIRING_RATE_PREFIX)]
    return sum(rates) / len(rates) if rates else None


# What the console shows of an epoch's record, in this order (the rest is in the files).
_SHOWN = (
    ("test_accuracy", "test top-1 {:.2%}"),
    ("test_ema_accuracy", "EMA {:.2%}"),
    ("train_accuracy", "train {:.2%}"),
    ("train_loss", "train loss {:.3f}"),
    ("lr", "lr {:.3g}"),
    (FIRING_RATE_PREFIX, "firing {:.1%}"),  # the mean over layers
    ("test_energy_uj", "{:.3g} uJ/image"),
    ("images_per_sec", "{:.0f} img/s"),
    ("epoch_seconds", "{:.0f} s"),
)


def epoch_line(stage: str, epoch: int, metrics: dict[str, Any]) -> str:
    """The console's line for `stage`'s `epoch` (1-based): test and train top-1, loss, lr,
    the mean firing rate over layers, energy per test image, throughput, seconds."""
    parts = []
    for key, fmt in _SHOWN:
        value = mean_firing_rate(metrics) if key == FIRING_RATE_PREFIX else metrics.get(key)
        if value is not None:
            parts.append(fmt.format(value))
    return f"[{stage}] epoch {epoch}: {', '.join(parts)}"


def progress(items: Iterable[Any], *, total: int, desc: str, images_per_item: int) -> Iterator[Any]:
    """`items` with a progress bar in images/s on a TTY (process 0); elsewhere (a log file,
    a pipe) a plain line at each quarter of a run of at least `PLAIN_MIN_ITEMS` items."""
    first, tty = jax.process_index() == 0, sys.stderr.isatty()
    if first and not tty:
        items = _plain_progress(items, total, desc)
    return tqdm(  # disabled, it still takes set_postfix
        items,
        total=total,
        desc=desc,
        unit="img",
        unit_scale=images_per_item,
        disable=not (first and tty),
        leave=False,
        dynamic_ncols=True,
    )


PLAIN_MIN_ITEMS = 8


def _plain_progress(items: Iterable[Any], total: int, desc: str) -> Iterator[Any]:
    # Elapsed time, not a rate: steps run asynchronously, so a rate here would count steps
    # dispatched, not done (the epoch's line has the measured one).
    marks = {total * q // 4: q for q in (1, 2, 3)} if total >= PLAIN_MIN_ITEMS else {}
    start = time.perf_counter()
    for done, item in enumerate(items, 1):
        yield item
        if done in marks:
            seconds = time.perf_counter() - start
            logger.info(
                "[%s] %d%% (%d of %d), %.0f s", desc, 25 * marks[done], done, total, seconds
            )
