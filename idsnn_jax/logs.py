"""Where metrics go: stdout, `<workdir>/metrics.jsonl` and TensorBoard, from process 0.

TensorBoard events are written with tensorboardX, which (unlike CLU's writers) does not
import TensorFlow. A progress bar shows throughput during an epoch when stderr is a TTY.
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

logger = logging.getLogger("idsnn_jax")


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
    (one run per stage under `tensorboard/`) and logs a one-line summary."""

    def __init__(self, workdir: str) -> None:
        self.workdir = workdir
        self.enabled = jax.process_index() == 0
        self._writers: dict[str, Any] = {}
        if self.enabled:
            os.makedirs(workdir, exist_ok=True)

    def write(self, stage: str, epoch: int, metrics: dict[str, float]) -> None:
        """Records `metrics` of `stage` after `epoch` (1-based)."""
        if not self.enabled:
            return
        record = {"stage": stage, "epoch": epoch, "time": time.time(), **metrics}
        with open(os.path.join(self.workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        writer = self._writer(stage)
        for key, value in metrics.items():
            writer.add_scalar(key, value, epoch)
        writer.flush()
        shown = {k: v for k, v in metrics.items() if not k.startswith("firing_rate/")}
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
