"""Datasets as host NumPy arrays: CIFAR-10/100 and Fashion-MNIST, read from files.

Why this file exists: training needs CIFAR-10/100 and Fashion-MNIST without TensorFlow (an
optional extra) and, often, without internet. So `load_split` reads, in order,

* the official CIFAR archives (binary or python version, ``.tar.gz`` or extracted) in
  ``data_dir``, parsed with NumPy by `idsnn_jax.cifar` (pickles through an unpickler that
  only resolves the few NumPy globals an array needs);
* Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist`` puts them in
  `DEFAULT_FASHION_MNIST_DIR`);
* TFDS ``data_source`` over prepared ArrayRecord files (random access, no TensorFlow; decoding
  the stored PNGs needs Pillow or OpenCV). ``tensorflow_datasets`` is imported only here.

Bad files fail before any work, each with a one-line error that starts with the file's path:
truncated or corrupt archives and gzip streams, wrong IDX magic or item counts, images of the
wrong shape, labels outside [0, num_classes), empty files, files (or IDX headers) larger than
the official ones, refused from their declared size before reading; a data_dir with nothing
usable is a FileNotFoundError listing every place looked at.

A whole split fits in host memory (CIFAR train: 50,000 x 32 x 32 x 3 uint8); batching and
augmentation are in `idsnn_jax.input_pipeline` and `idsnn_jax.augment`.

Testing note (tfds 4.9.10, no TensorFlow installed): ``tfds.testing.mock_data`` does mock
``tfds.data_source`` (item access ``source[i]`` works; the mock's ``__getitems__`` does not,
hence items are read one at a time); ``tfds.load``/``as_numpy`` under the mock need TensorFlow.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib
from collections.abc import Callable
from typing import BinaryIO

import numpy as np

from idsnn_jax import cifar

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")
Rows = Callable[[int], slice]  # a split's length -> the contiguous rows kept of it


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset; hashable, so it can be a static jit argument."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C)
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]


_CIFAR_MEAN = (0.5071, 0.4867, 0.4408)  # The reference uses CIFAR-100 statistics for both.
_CIFAR_STD = (0.2675, 0.2565, 0.2761)
_INFOS = {
    "cifar10": DatasetInfo("cifar10", 10, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD),
    "cifar100": DatasetInfo("cifar100", 100, (32, 32, 3), _CIFAR_MEAN, _CIFAR_STD),
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, (28, 28, 1), (0.2860,), (0.3530,)),
}


def dataset_info(name: str) -> DatasetInfo:
    """Returns the `DatasetInfo` for `name` ('cifar10', 'cifar100' or 'fashion_mnist')."""
    if name not in _INFOS:
        raise ValueError(f"name={name!r} is an unknown dataset; known: {sorted(_INFOS)}.")
    return _INFOS[name]


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: arrays have no truth value.
class Split:
    """One split in host memory: images uint8 (N, H, W, C), labels int32 (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"Split.images must be uint8 (N, H, W, C), got {self.images.dtype} "
                f"{self.images.shape}."
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"Split.labels must be int32 of shape {self.images.shape[:1]}, got "
                f"{self.labels.dtype} {self.labels.shape}."
            )

    def __len__(self) -> int:
        return len(self.labels)


# --- Fashion-MNIST: IDX files ---------------------------------------------------------------------


_FASHION_MNIST_SHAPE = (28, 28)
_FASHION_MNIST_SIZES = {"train": 60000, "test": 10000}  # examples in the official files


def _idx_dims(f: BinaryIO, source: str, ndim: int) -> tuple[int, ...]:
    """The dims of an IDX file of unsigned bytes, read from its header (magic 0,0,0x08,ndim;
    ndim big-endian uint32 dims), leaving `f` at the first data byte."""
    magic = f.read(4)
    if len(magic) < 4 or magic[:3] != b"\x00\x00\x08" or magic[3] != ndim:
        raise ValueError(
            f"{source}: bad IDX magic {magic.hex()}; expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dims)."
        )
    raw = f.read(4 * ndim)
    if len(raw) < 4 * ndim:
        raise ValueError(
            f"{source}: {4 + len(raw)} bytes, shorter than the {4 + 4 * ndim}-byte IDX header; "
            "the file is truncated."
        )
    return tuple(int(d) for d in np.frombuffer(raw, ">u4"))


def _read_idx_items(f: BinaryIO, source: str, what: str, item_shape: tuple, limit: int):
    """The (N, *item_shape) uint8 array of an IDX file whose header is checked first (item
    shape, 1 <= N <= `limit`), so a crafted header allocates nothing; reads the N items and
    one byte more, to name data past them."""
    dims = _idx_dims(f, source, 1 + len(item_shape))
    if dims[1:] != item_shape or not dims[0]:
        shape = f"(N, {', '.join(map(str, item_shape))})" if item_shape else "(N,)"
        raise ValueError(f"{source}: {what} must be {shape} with N >= 1, got {dims}.")
    if dims[0] > limit:
        raise ValueError(
            f"{source}: the IDX header declares {dims[0]} {what}; the official file has at "
            f"most {limit}: this one is corrupt or crafted, replace it."
        )
    size = math.prod(dims)
    raw = f.read(size + 1)
    if len(raw) > size:
        raise ValueError(
            f"{source}: data continues past the {size} bytes the IDX header dims {dims} "
            "declare; the file is corrupt."
        )
    if len(raw) < size:
        raise ValueError(
            f"{source}: {len(raw)} data bytes do not match the IDX header dims {dims} "
            f"({size} bytes); the file is truncated or corrupt."
        )
    return np.frombuffer(raw, np.uint8).reshape(dims)


def _read_idx(data_dir: str, stem: str, what: str, item_shape: tuple, limit: int, looked: list):
    """(path, array) of the IDX file `stem` or `stem.gz` in `data_dir` (`_read_idx_items`),
    else None."""
    for suffix, opener in (("", open), (".gz", gzip.open)):
        path = os.path.join(data_dir, stem + suffix)
        looked.append(path)
        if os.path.isfile(path):
            try:
                with opener(path, "rb") as f:
                    return path, _read_idx_items(f, path, what, item_shape, limit)
            except (OSError, EOFError, zlib.error) as err:  # truncated or corrupt gzip
                raise ValueError(
                    f"{path}: cannot be read ({type(err).__name__}: {err}); the file is "
                    "truncated or corrupt."
                ) from err
    return None


def _load_fashion_mnist(split: str, data_dir: str, looked: list[str]) -> Split | None:
    prefix, limit = {"train": "train", "test": "t10k"}[split], _FASHION_MNIST_SIZES[split]
    images = _read_idx(
        data_dir, f"{prefix}-images-idx3-ubyte", "images", _FASHION_MNIST_SHAPE, limit, looked
    )
    labels = _read_idx(data_dir, f"{prefix}-labels-idx1-ubyte", "labels", (), limit, looked)
    if images is None or labels is None:
        return None
    (images_path, images), (labels_path, labels) = images, labels
    if len(images) != len(labels):
        raise ValueError(
            f"{labels_path}: {len(labels)} labels but {len(images)} images in {images_path}."
        )
    cifar.check_labels(labels, 10, labels_path)
    return Split(images[..., None], labels.astype(np.int32))


# --- TFDS and the public loader -------------------------------------------------------------------


def _tfds_where(name: str, split: str, data_dir: str | None) -> str:
    """How errors and the places-looked list name a TFDS dataset."""
    return f"TFDS {name!r} {split} in data_dir={data_dir or 'the TFDS default'}"


def _tfds_source(name: str, split: str, data_dir: str | None, looked: list[str]):
    """The `tfds.data_source` of a prepared dataset (no TensorFlow needed), else None."""
    looked.append(_tfds_where(name, split, data_dir))
    try:
        import tensorflow_datasets as tfds  # Lazy: slow to import and never needed offline.

        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # TFDS says "not prepared" with many exception types.
        first_line = next(iter(str(err).strip().splitlines()), "")
        looked[-1] += f" ({type(err).__name__}: {first_line})"
        return None


def _read_tfds(info: DatasetInfo, source, where: str, max_examples: int | None, rows: Rows):
    """Reads the `rows` of the first `max_examples` (all if None) items of a TFDS data source
    into a Split; no other item is read. Errors start with `where` (`_tfds_where`)."""
    n = len(source) if max_examples is None else min(len(source), max_examples)
    # One at a time: the TFDS mock lacks __getitems__.
    examples = [source[i] for i in range(n)[rows(n)]]
    expected = info.image_shape
    images = [np.asarray(ex["image"], np.uint8) for ex in examples]
    images = np.stack(images) if images else np.zeros((0, *expected), np.uint8)  # an empty part
    if images.shape[1:] != expected:
        raise ValueError(f"{where}: images are {images.shape[1:]}, expected {expected}.")
    labels = np.asarray([ex["label"] for ex in examples], np.int64)
    cifar.check_labels(labels, info.num_classes, where)
    return Split(images, labels.astype(np.int32))


_HOW_TO_GET = {
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz into data_dir",
    "cifar100": "download https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz into data_dir",
    "fashion_mnist": "`apt-get install dataset-fashion-mnist` (IDX files in "
    f"{DEFAULT_FASHION_MNIST_DIR}) or put the four *-ubyte(.gz) files in data_dir",
}


def load_split(
    name: str,
    split: str,
    data_dir: str | None = None,
    *,
    max_examples: int | None = None,
    rows: Rows | None = None,
) -> Split:
    """Loads a split into host memory: images uint8 (N, H, W, C), labels int32 (N,).

    Looks in order at the official CIFAR archives in `data_dir`, the Fashion-MNIST IDX files in
    `data_dir` (default `DEFAULT_FASHION_MNIST_DIR`), then a prepared TFDS dataset in
    `data_dir` (TFDS default when None). `max_examples` keeps the first that many examples;
    of these, `rows(n)` (default: all) picks the contiguous rows this process keeps (its shard,
    `input_pipeline.train_rows`): only they stay in memory, and from TFDS only they are read.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split={split!r}; known: {SPLITS}.")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be >= 1 or None.")
    rows = rows or (lambda n: slice(0, n))
    looked: list[str] = []
    offline = None
    if name == "fashion_mnist":
        offline = _load_fashion_mnist(split, data_dir or DEFAULT_FASHION_MNIST_DIR, looked)
    elif data_dir is None:
        looked.append("the official CIFAR archives: not searched (no data_dir given)")
    else:
        arrays = cifar.load_cifar(name, split, data_dir, looked, num_classes=info.num_classes)
        offline = None if arrays is None else Split(*arrays)
    if offline is not None:
        n = len(offline) if max_examples is None else min(len(offline), max_examples)
        keep = rows(n)  # copied, so the arrays of the whole file can be freed
        return Split(offline.images[keep].copy(), offline.labels[keep].copy())
    source = _tfds_source(name, split, data_dir, looked)
    if source is not None:
        return _read_tfds(info, source, _tfds_where(name, split, data_dir), max_examples, rows)
    raise FileNotFoundError(  # One line: the CLI prints it as its whole error message.
        f"No {info.name} {split} data found; looked at: {', '.join(looked)}. To get it: "
        f"{_HOW_TO_GET[name]}; or prepare it with TFDS: `tfds build {name} "
        "--file_format=array_record` (needs `pip install tensorflow`) and pass its data_dir."
    )
