"""The official CIFAR-10/100 archives, read with NumPy alone (no TensorFlow, no download).

Why this file exists: `idsnn_jax.datasets.load_split` first looks for the files a user gets from
https://www.cs.toronto.edu/~kriz/cifar.html: the binary or the python version, as the
``.tar.gz`` or extracted. The binary batches are fixed-size records parsed with NumPy. The
python batches are pickles, so they go through an unpickler that resolves only the few NumPy
globals an array needs: a crafted file cannot run code. `load_cifar` is the one entry point.

Every problem with a file (truncated or corrupt archive, bad pickle, wrong record size, pixel
data of the wrong shape, labels out of range) is a one-line ValueError that starts with the
file's path (``archive.tar.gz:member`` inside an archive). A batch file larger than the
official one is refused from its size on disk or the size its tar header declares, before
any of it is read, so a small crafted archive cannot fill memory.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import math
import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Iterator

import numpy as np

_NUMPY_CORE = "numpy._core" if np.lib.NumpyVersion(np.__version__) >= "2.0.0" else "numpy.core"
# The only globals a pickled uint8 array needs. NumPy 1 (the official files) writes numpy.core.*,
# NumPy 2 writes numpy._core.*; both resolve to this NumPy's module.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
    **{
        (f"{core}.{module}", name): (f"{_NUMPY_CORE}.{module}", name)
        for core in ("numpy.core", "numpy._core")
        for module, name in (("multiarray", "_reconstruct"), ("numeric", "_frombuffer"))
    },
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only `_PICKLE_GLOBALS`, so a crafted file cannot run code.

    The CIFAR python batches are Python 2 pickles of dicts of lists, bytes and one uint8 array.
    """

    def find_class(self, module: str, name: str):
        target = _PICKLE_GLOBALS.get((module, name))
        if target is None:
            raise pickle.UnpicklingError(
                f"Refusing to load global {module}.{name}: a CIFAR batch only needs NumPy "
                "array reconstruction."
            )
        return super().find_class(*target)


PIXELS = 3 * 32 * 32  # bytes of one image, CHW


def _parse_cifar_binary(raw: bytes, source: str, *, label_bytes: int):
    """Parses records of `label_bytes` label bytes + 3072 CHW pixel bytes (last label = fine)."""
    record = label_bytes + PIXELS
    if not raw or len(raw) % record:
        raise ValueError(
            f"{source}: {len(raw)} bytes is not a whole number of {record}-byte CIFAR records; "
            "the file is truncated or not a CIFAR binary batch."
        )
    rows = np.frombuffer(raw, np.uint8).reshape(-1, record)
    return rows[:, label_bytes:], rows[:, label_bytes - 1]


def _parse_cifar_pickle(raw: bytes, source: str, *, label_key: bytes):
    """Parses a python-version batch: dict with b'data' uint8 (N, 3072) and `label_key`."""
    try:
        batch = _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except Exception as err:  # A corrupt pickle fails with many exception types.
        raise ValueError(
            f"{source}: not a readable CIFAR python batch ({type(err).__name__}: {err}); "
            "the file is truncated or corrupt."
        ) from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{source}: expected a dict with keys b'data' and {label_key!r}.")
    return np.asarray(batch[b"data"]), np.asarray(batch[label_key])


# The python batches hold a pickled dict (pixels, labels, file names). CIFAR-10's largest,
# data_batch_3, is 31,035,999 bytes for 10,000 images (3,104 bytes an image); the bound allows
# 1.1 times that, for CIFAR-100's second label list and longer file names.
_PICKLE_BYTES_PER_IMAGE = math.ceil(1.1 * 31_035_999 / 10_000)  # 3414


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    archive: str  # file name of the official .tar.gz
    folder: str  # top folder inside it (also the extracted folder)
    members: dict[str, tuple[str, ...]]  # split -> file names inside `folder`
    parse: Callable[[bytes, str], tuple[np.ndarray, np.ndarray]]  # -> pixels, labels
    kind: str  # what one file is, in words: 'CIFAR-10 binary batch'
    images: dict[str, int]  # split -> images in each of its official files
    record_bytes: int | None  # bytes of one binary record; None: a pickle

    def max_bytes(self, split: str) -> int:
        """The most bytes one file of `split` may hold: the official file's size (binary) or
        a bound 10% above it (python). Smaller files are read (tiny test sets)."""
        return self.images[split] * (self.record_bytes or _PICKLE_BYTES_PER_IMAGE)

    def size_error(self, source: str, size: str, split: str) -> ValueError:
        """The one-line error for the file of `split` at `source`, of too large a `size`."""
        n, limit = self.images[split], self.max_bytes(split)
        if self.record_bytes:
            official = f"has {limit} ({n} records of {self.record_bytes} bytes)"
        else:
            per = _PICKLE_BYTES_PER_IMAGE
            official = f"has at most {limit} ({n} images of at most {per} bytes, 1.1x official)"
        return ValueError(
            f"{source}: {size}; a {self.kind} {official}: not an official file, delete it "
            "and download it again."
        )


_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR10_IMAGES = {"train": 10000, "test": 10000}  # in each batch file
_CIFAR100_IMAGES = {"train": 50000, "test": 10000}
_CIFAR_LAYOUTS = {  # Binary first: it needs no unpickling.
    "cifar10": (
        _CifarLayout(
            "cifar-10-binary.tar.gz",
            "cifar-10-batches-bin",
            {"train": tuple(f"{b}.bin" for b in _CIFAR10_BATCHES), "test": ("test_batch.bin",)},
            functools.partial(_parse_cifar_binary, label_bytes=1),
            "CIFAR-10 binary batch",
            _CIFAR10_IMAGES,
            1 + PIXELS,
        ),
        _CifarLayout(
            "cifar-10-python.tar.gz",
            "cifar-10-batches-py",
            {"train": _CIFAR10_BATCHES, "test": ("test_batch",)},
            functools.partial(_parse_cifar_pickle, label_key=b"labels"),
            "CIFAR-10 python batch",
            _CIFAR10_IMAGES,
            None,
        ),
    ),
    "cifar100": (
        _CifarLayout(
            "cifar-100-binary.tar.gz",
            "cifar-100-binary",
            {"train": ("train.bin",), "test": ("test.bin",)},
            functools.partial(_parse_cifar_binary, label_bytes=2),
            "CIFAR-100 binary batch",
            _CIFAR100_IMAGES,
            2 + PIXELS,
        ),
        _CifarLayout(
            "cifar-100-python.tar.gz",
            "cifar-100-python",
            {"train": ("train",), "test": ("test",)},
            functools.partial(_parse_cifar_pickle, label_key=b"fine_labels"),
            "CIFAR-100 python batch",
            _CIFAR100_IMAGES,
            None,
        ),
    ),
}


# What a truncated or corrupt .tar.gz raises, depending on where the damage is.
ARCHIVE_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


def _read_cifar_members(
    layout: _CifarLayout, split: str, data_dir: str, looked: list[str]
) -> Iterator[tuple[str, bytes]]:
    """Yields (source, raw bytes) for each batch file of `split`, extracted folder first."""
    folder = os.path.join(data_dir, layout.folder)
    archive = os.path.join(data_dir, layout.archive)
    looked += [folder + os.sep, archive]
    if os.path.isdir(folder):
        for member in layout.members[split]:
            path = os.path.join(folder, member)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: an extracted {layout.folder} must hold "
                    f"{', '.join(layout.members[split])}."
                )
            yield path, _read_file(path, layout, split)
    elif os.path.isfile(archive):
        yield from _read_archive(archive, layout, split)


def _read_file(path: str, layout: _CifarLayout, split: str) -> bytes:
    """The bytes of the extracted batch file `path` of `split`; its size is checked against
    `layout.max_bytes` before reading, and at most one byte more is read."""
    limit = layout.max_bytes(split)
    size = os.path.getsize(path)
    if size > limit:
        raise layout.size_error(path, f"{size} bytes", split)
    with open(path, "rb") as f:
        raw = f.read(limit + 1)
    if len(raw) > limit:  # grew since the size was read
        raise layout.size_error(path, f"more than {limit} bytes", split)
    return raw


_MAX_ENTRIES = 64  # entries scanned in an archive; the official ones hold 5 to 9


def _find_member(tar: tarfile.TarFile, archive: str, name: str) -> tarfile.TarInfo:
    """The entry `name` of `tar`, found by scanning at most `_MAX_ENTRIES` headers (tar headers
    compress well: indexing a crafted archive whole could fill memory)."""
    for i, info in enumerate(tar):  # lazily read; entries seen before are cached by `tar`
        if info.name == name:
            return info
        if i + 1 >= _MAX_ENTRIES:
            raise ValueError(
                f"{archive}: more than {_MAX_ENTRIES} entries before {name}; an official "
                "CIFAR archive holds at most 9: delete it and download it again."
            )
    raise ValueError(f"{archive} has no member {name}; is it corrupt?")


def _read_archive(archive: str, layout: _CifarLayout, split: str) -> Iterator[tuple[str, bytes]]:
    """(source, bytes) of each batch file of `split` in the .tar.gz `archive`; ValueError
    naming it if it is unreadable (truncated download, not a gzip, bad tar), lacks one, or
    one declares more than `layout.max_bytes` (checked before reading it)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in layout.members[split]:
                name = f"{layout.folder}/{member}"
                source = f"{archive}:{name}"
                info = _find_member(tar, archive, name)
                file = tar.extractfile(info)
                if file is None:
                    raise ValueError(f"{source}: not a regular file; is the archive corrupt?")
                if info.size > layout.max_bytes(split):
                    raise layout.size_error(source, f"declares {info.size} bytes", split)
                yield source, file.read(info.size)
    except ARCHIVE_ERRORS as err:
        raise ValueError(
            f"{archive}: not a readable .tar.gz ({type(err).__name__}: {err}); the download "
            "is truncated or corrupt: delete it and download it again."
        ) from err


def check_labels(labels: np.ndarray, num_classes: int, source: str) -> None:
    """ValueError naming `source` unless `labels` are integers in [0, `num_classes`)."""
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{source}: labels must be integers, got {labels.dtype}.")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        more = f" (and {bad.size - 1} more)" if bad.size > 1 else ""
        raise ValueError(
            f"{source}: label {labels[bad[0]]} at index {bad[0]}{more} is outside "
            f"[0, {num_classes})."
        )


def load_cifar(
    name: str, split: str, data_dir: str, looked: list[str], *, num_classes: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """Reads `split` of `name` ('cifar10' or 'cifar100') from the first official layout found.

    Returns images uint8 (N, 32, 32, 3) and labels int32 (N,), or None when `data_dir` holds
    none of the layouts. Appends every path it tried to `looked`; labels must be in
    [0, `num_classes`).
    """
    for layout in _CIFAR_LAYOUTS[name]:
        images, labels = [], []
        for source, raw in _read_cifar_members(layout, split, data_dir, looked):
            data, label = layout.parse(raw, source)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or not len(data):
                raise ValueError(
                    f"{source}: pixel data must be uint8 (N, 3072) with N >= 1, got "
                    f"{data.dtype} {data.shape}."
                )
            if label.shape != data.shape[:1]:
                raise ValueError(
                    f"{source}: {len(data)} images but labels of shape {label.shape}; labels "
                    "must be N values."
                )
            check_labels(label, num_classes, source)
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW -> HWC
            labels.append(label.astype(np.int32))
        if images:
            return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)
    return None
