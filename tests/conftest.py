"""Shared pytest setup. Data fixtures (prefix `data_`) write tiny datasets in the official
on-disk formats, so tests never need a download.

Every test process sees 4 CPU devices, so the data-parallel code paths (shard_map over 4
devices, synchronized BatchNorm) run in every pipeline test; XLA_FLAGS must be set before
JAX initializes its backend, hence here.

The 4 devices are threads sharing the machine's cores. When one lags (a loaded 2-core CI
machine, pytest-xdist), the others wait for it in a collective, and XLA:CPU aborts the
process once a rendezvous waits longer than its termination timeout ("Termination timeout
for `all reduce ...` exceeded"). A lagging fake device is not a bug, so the timeout is 10
minutes here, far above any lag; longer only hides a deadlock (the aborts once "seen in
evaluation" were one: eager device adds between the eval steps' all-reduces, fixed in
`epochs.evaluate`, which with an hour's timeout hung CI past its limit).

Most of the suite's time is XLA compiling the same tiny networks again and again (every
pipeline test compiles a teacher and a student step). JAX's persistent compilation cache,
shared by the pytest-xdist workers and the subprocesses the tests start (they inherit the
environment), compiles each program once per machine; it changes no result.
"""

from __future__ import annotations

import os
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + " --xla_force_host_platform_device_count=4"
    + " --xla_cpu_collective_call_terminate_timeout_seconds=600"
    + " --xla_cpu_collective_call_warn_stuck_timeout_seconds=120"
).strip()

os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"idsnn-jax-test-xla-cache-{os.getuid()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import io  # noqa: E402
import logging
import pathlib
import pickle
import struct
import tarfile
import tracemalloc

import numpy as np
import pytest

_CIFAR_FILES = {  # (archive, folder, {split: member names}) as in the official archives.
    ("cifar10", "binary"): (
        "cifar-10-binary.tar.gz",
        "cifar-10-batches-bin",
        {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]},
    ),
    ("cifar10", "python"): (
        "cifar-10-python.tar.gz",
        "cifar-10-batches-py",
        {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
    ),
    ("cifar100", "binary"): (
        "cifar-100-binary.tar.gz",
        "cifar-100-binary",
        {"train": ["train.bin"], "test": ["test.bin"]},
    ),
    ("cifar100", "python"): (
        "cifar-100-python.tar.gz",
        "cifar-100-python",
        {"train": ["train"], "test": ["test"]},
    ),
}


class _Py2Pickler(pickle._Pickler):
    """Pickles bytes and str as Python 2 `str` (BINSTRING), as in the official CIFAR batches."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_bytes(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    def save_str(self, obj: str) -> None:
        self.save_bytes(obj.encode("latin1"))

    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def data_py2_pickle(obj) -> bytes:
    """`obj` pickled like NumPy 1 under Python 2 (protocol 2, numpy.core globals, str bytes)."""
    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def _cifar_member(name, fmt, images, coarse, fine) -> bytes:
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # official layout: C, H, W
    if fmt == "binary":
        labels = fine[:, None] if name == "cifar10" else np.stack([coarse, fine], 1)
        return np.concatenate([labels.astype(np.uint8), chw], axis=1).tobytes()
    batch = {b"batch_label": b"tiny batch", b"data": chw, b"filenames": [b"x.png"] * len(chw)}
    if name == "cifar10":
        batch[b"labels"] = fine.tolist()
    else:
        batch[b"fine_labels"], batch[b"coarse_labels"] = fine.tolist(), coarse.tolist()
    return data_py2_pickle(batch)


def data_write_cifar(
    root: pathlib.Path, name: str, fmt: str, packed: bool, per_file: int = 3, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Writes a tiny official CIFAR archive (`fmt` 'binary' or 'python'; `.tar.gz` if `packed`,
    else the extracted folder) under `root`. Returns {split: (images uint8 NHWC, fine labels)}."""
    archive, folder, members = _CIFAR_FILES[(name, fmt)]
    num_classes = 10 if name == "cifar10" else 100
    rng = np.random.default_rng(seed)
    written, files = {}, {}
    for split, names in members.items():
        images = rng.integers(0, 256, (per_file * len(names), 32, 32, 3), dtype=np.uint8)
        fine = rng.integers(0, num_classes, len(images))
        coarse = (fine + 1) % 20  # differs from the fine label, so a mix-up shows
        written[split] = (images, fine.astype(np.int32))
        for i, member in enumerate(names):
            rows = slice(i * per_file, (i + 1) * per_file)
            files[member] = _cifar_member(name, fmt, images[rows], coarse[rows], fine[rows])
    if packed:
        with tarfile.open(root / archive, "w:gz") as tar:
            for member, payload in files.items():
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    else:
        (root / folder).mkdir(parents=True, exist_ok=True)
        for member, payload in files.items():
            (root / folder / member).write_bytes(payload)
    return written


@pytest.fixture
def data_cifar10_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A data_dir holding a tiny cifar-10-binary.tar.gz: 5 x 8 train and 8 test examples."""
    data_write_cifar(tmp_path, "cifar10", "binary", packed=True, per_file=8)
    return tmp_path


@pytest.fixture
def data_cifar_writer():
    """`data_write_cifar`, for tests that write their own tiny archives."""
    return data_write_cifar


def data_idx_bytes(array: np.ndarray) -> bytes:
    """`array` as an IDX file of unsigned bytes (magic 0x0000080N, big-endian dims)."""
    header = bytes([0, 0, 8, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture
def data_fashion_mnist_dir(tmp_path: pathlib.Path) -> pathlib.Path:
    """A data_dir holding tiny raw Fashion-MNIST IDX files: 48 train and 12 test examples.

    Each class c has images of mean brightness ~20 * c, so a small network can learn it.
    """
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 48), ("t10k", 12)):
        labels = np.arange(n) % 10
        images = np.clip(rng.normal(20.0 * labels[:, None, None], 10.0, (n, 28, 28)), 0, 255)
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(data_idx_bytes(images))
        (tmp_path / f"{prefix}-labels-idx1-ubyte").write_bytes(data_idx_bytes(labels))
    return tmp_path


class _LogLines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def log_lines():
    """The messages of the package's logger (`idsnn_jax`) during the test, as a list
    (`clear()` it to look at what follows only). INFO and up: with this handler attached,
    `setup_logging` leaves the level alone, and a test run alone would see warnings only."""
    handler = _LogLines()
    logger = logging.getLogger("idsnn_jax")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    yield handler.lines
    logger.removeHandler(handler)
    logger.setLevel(level)


def load_error_and_peak_mib(*args) -> tuple[str, float]:
    """The ValueError message of `datasets.load_split(*args)` and the peak of the memory
    Python allocated meanwhile (tracemalloc: bytes objects and NumPy arrays), in MiB."""
    from idsnn_jax.datasets import load_split

    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            load_split(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(err.value), peak / 2**20
