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
        shown = {k: v for k, v in metrics.items() if "/" not in k}  # per-layer values: files
        logger.info("[%s] epoch %d: %s", stage, epoch, _format(shown))

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


def _format(metrics: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def progress(items: Iterable[Any], *, total: int, desc: str, images_per_item: int) -> Iterator[Any]:
    """`items` with a progress bar in images/s on a TTY (process 0); silent otherwise."""
    quiet = not sys.stderr.isatty() or jax.process_index() != 0
    return tqdm(
        items,
        total=total,
        desc=desc,
        unit="img",
        unit_scale=images_per_item,
        disable=quiet,
        leave=False,
        dynamic_ncols=True,
    )
