"""Datasets as host NumPy arrays, batching, and device-side augmentation.

Why this file exists: training needs CIFAR-10/100 and Fashion-MNIST without TensorFlow (an
optional extra) and, often, without internet. So the loaders read, in order,

* the official CIFAR archives (binary or python version, ``.tar.gz`` or extracted) in
  ``data_dir``, parsed with NumPy; the pickled python version goes through an unpickler that
  only resolves the few NumPy globals an array needs;
* Fashion-MNIST IDX files (``apt-get install dataset-fashion-mnist`` puts them in
  ``/usr/share/datasets/fashion-mnist``);
* TFDS ``data_source`` over prepared ArrayRecord files (random access, no TensorFlow; decoding
  the stored PNGs needs Pillow or OpenCV). ``tensorflow_datasets`` is imported only here.

A whole split fits in host memory (CIFAR train: 150 MB of uint8), so batching is plain NumPy
indexing with a per-epoch permutation from ``(seed, epoch)``: resuming at an epoch replays the
same order. Augmentation (zero-pad, random crop, flip) and normalization run inside the jitted
step, per example, from a JAX key.

Testing note (tfds 4.9.10, no TensorFlow installed): ``tfds.testing.mock_data`` does mock
``tfds.data_source`` (item access ``source[i]`` works; the mock's ``__getitems__`` does not,
hence items are read one at a time); ``tfds.load``/``as_numpy`` under the mock need TensorFlow.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import io
import os
import pickle
import tarfile
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
SPLITS = ("train", "test")


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
        raise ValueError(f"Unknown dataset={name!r}; known: {sorted(_INFOS)}.")
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


# --- CIFAR: the official archives -----------------------------------------------------------------


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


def _parse_cifar_binary(raw: bytes, source: str, *, label_bytes: int):
    """Parses records of `label_bytes` label bytes + 3072 CHW pixel bytes (last label = fine)."""
    record = label_bytes + 3 * 32 * 32
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
    except (pickle.UnpicklingError, EOFError, ValueError) as err:
        raise ValueError(f"{source}: not a readable CIFAR python batch ({err}).") from err
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        raise ValueError(f"{source}: expected a dict with keys b'data' and {label_key!r}.")
    return np.asarray(batch[b"data"]), np.asarray(batch[label_key])


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
    archive: str  # file name of the official .tar.gz
    folder: str  # top folder inside it (also the extracted folder)
    members: dict[str, tuple[str, ...]]  # split -> file names inside `folder`
    parse: Callable[[bytes, str], tuple[np.ndarray, np.ndarray]]  # -> pixels, labels


_CIFAR10_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_LAYOUTS = {  # Binary first: it needs no unpickling.
    "cifar10": (
        _CifarLayout(
            "cifar-10-binary.tar.gz",
            "cifar-10-batches-bin",
            {"train": tuple(f"{b}.bin" for b in _CIFAR10_BATCHES), "test": ("test_batch.bin",)},
            functools.partial(_parse_cifar_binary, label_bytes=1),
        ),
        _CifarLayout(
            "cifar-10-python.tar.gz",
            "cifar-10-batches-py",
            {"train": _CIFAR10_BATCHES, "test": ("test_batch",)},
            functools.partial(_parse_cifar_pickle, label_key=b"labels"),
        ),
    ),
    "cifar100": (
        _CifarLayout(
            "cifar-100-binary.tar.gz",
            "cifar-100-binary",
            {"train": ("train.bin",), "test": ("test.bin",)},
            functools.partial(_parse_cifar_binary, label_bytes=2),
        ),
        _CifarLayout(
            "cifar-100-python.tar.gz",
            "cifar-100-python",
            {"train": ("train",), "test": ("test",)},
            functools.partial(_parse_cifar_pickle, label_key=b"fine_labels"),
        ),
    ),
}


def _read_cifar_members(layout: _CifarLayout, split: str, data_dir: str, looked: list[str]):
    """Yields (source, raw bytes) for each batch file of `split`, extracted folder first."""
    folder = os.path.join(data_dir, layout.folder)
    archive = os.path.join(data_dir, layout.archive)
    looked += [folder + os.sep, archive]
    if os.path.isdir(folder):
        for member in layout.members[split]:
            path = os.path.join(folder, member)
            with open(path, "rb") as f:
                yield path, f.read()
    elif os.path.isfile(archive):
        with tarfile.open(archive, "r:gz") as tar:
            for member in layout.members[split]:
                name = f"{layout.folder}/{member}"
                try:
                    yield f"{archive}:{name}", tar.extractfile(name).read()
                except KeyError as err:
                    raise ValueError(f"{archive} has no member {name}; is it corrupt?") from err


def _load_cifar(name: str, split: str, data_dir: str, looked: list[str]) -> Split | None:
    """Loads `split` from the first official CIFAR layout found in `data_dir`, else None."""
    num_classes = dataset_info(name).num_classes
    for layout in _CIFAR_LAYOUTS[name]:
        images, labels = [], []
        for source, raw in _read_cifar_members(layout, split, data_dir, looked):
            data, label = layout.parse(raw, source)
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                raise ValueError(f"{source}: pixel data must be uint8 (N, 3072), got {data.shape}.")
            if label.shape != data.shape[:1] or label.min() < 0 or label.max() >= num_classes:
                raise ValueError(f"{source}: labels must be N values in [0, {num_classes}).")
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW -> HWC
            labels.append(label.astype(np.int32))
        if images:
            return Split(np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels))
    return None


# --- Fashion-MNIST: IDX files ---------------------------------------------------------------------


def _parse_idx(raw: bytes, source: str, ndim: int) -> np.ndarray:
    """Parses an IDX file of unsigned bytes: magic 0,0,0x08,ndim; ndim big-endian uint32 dims."""
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != ndim:
        raise ValueError(
            f"{source}: bad IDX magic {raw[:4].hex()}; expected 000008{ndim:02x} "
            f"(unsigned bytes, {ndim} dims)."
        )
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw[4:header], ">u4")) if len(raw) >= header else ()
    if len(dims) != ndim or len(raw) - header != int(np.prod(dims)):
        raise ValueError(
            f"{source}: {len(raw)} bytes do not match the IDX header dims {dims}; truncated?"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _read_idx(data_dir: str, stem: str, ndim: int, looked: list[str]) -> np.ndarray | None:
    """Reads `stem` or `stem.gz` from `data_dir`, else None."""
    for suffix, opener in (("", open), (".gz", gzip.open)):
        path = os.path.join(data_dir, stem + suffix)
        looked.append(path)
        if os.path.isfile(path):
            with opener(path, "rb") as f:
                return _parse_idx(f.read(), path, ndim)
    return None


def _load_fashion_mnist(split: str, data_dir: str, looked: list[str]) -> Split | None:
    prefix = {"train": "train", "test": "t10k"}[split]
    images = _read_idx(data_dir, f"{prefix}-images-idx3-ubyte", 3, looked)
    labels = _read_idx(data_dir, f"{prefix}-labels-idx1-ubyte", 1, looked)
    if images is None or labels is None:
        return None
    if len(images) != len(labels) or labels.max() >= 10:
        raise ValueError(
            f"{data_dir}: {len(images)} {prefix} images but {len(labels)} labels, or a label "
            "outside [0, 10)."
        )
    return Split(images[..., None], labels.astype(np.int32))


# --- TFDS and the public loader -------------------------------------------------------------------


def _tfds_source(name: str, split: str, data_dir: str | None, looked: list[str]):
    """The `tfds.data_source` of a prepared dataset (no TensorFlow needed), else None."""
    looked.append(f"TFDS {name!r} in data_dir={data_dir or 'the TFDS default'}")
    try:
        import tensorflow_datasets as tfds  # Lazy: slow to import and never needed offline.

        return tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as err:  # TFDS says "not prepared" with many exception types.
        first_line = next(iter(str(err).strip().splitlines()), "")
        looked[-1] += f" ({type(err).__name__}: {first_line})"
        return None


def _read_tfds(name: str, source, max_examples: int | None) -> Split:
    """Reads the first `max_examples` (all if None) items of a TFDS data source into a Split."""
    n = len(source) if max_examples is None else min(len(source), max_examples)
    examples = [source[i] for i in range(n)]  # One at a time: the TFDS mock lacks __getitems__.
    images = np.stack([np.asarray(ex["image"], np.uint8) for ex in examples])
    labels = np.asarray([ex["label"] for ex in examples], np.int32)
    if images.shape[1:] != dataset_info(name).image_shape:
        raise ValueError(f"TFDS {name!r} images are {images.shape[1:]}, expected otherwise.")
    return Split(images, labels)


_HOW_TO_GET = {
    "cifar10": "download https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz into data_dir",
    "cifar100": "download https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz into data_dir",
    "fashion_mnist": "`apt-get install dataset-fashion-mnist` (IDX files in "
    f"{DEFAULT_FASHION_MNIST_DIR}) or put the four *-ubyte(.gz) files in data_dir",
}


def load_split(
    name: str, split: str, data_dir: str | None = None, *, max_examples: int | None = None
) -> Split:
    """Loads a whole split into host memory: images uint8 (N, H, W, C), labels int32 (N,).

    Looks in order at the official CIFAR archives in `data_dir`, the Fashion-MNIST IDX files in
    `data_dir` (default `DEFAULT_FASHION_MNIST_DIR`), then a prepared TFDS dataset in
    `data_dir` (TFDS default when None). `max_examples` keeps the first that many examples.
    """
    info = dataset_info(name)
    if split not in SPLITS:
        raise ValueError(f"Unknown split={split!r}; known: {SPLITS}.")
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples={max_examples} must be >= 1 or None.")
    looked: list[str] = []
    offline = None
    if name == "fashion_mnist":
        offline = _load_fashion_mnist(split, data_dir or DEFAULT_FASHION_MNIST_DIR, looked)
    elif data_dir is None:
        looked.append("the official CIFAR archives: not searched (no data_dir given)")
    else:
        offline = _load_cifar(name, split, data_dir, looked)
    if offline is not None:
        return Split(offline.images[:max_examples], offline.labels[:max_examples])
    source = _tfds_source(name, split, data_dir, looked)
    if source is not None:
        return _read_tfds(name, source, max_examples)
    raise FileNotFoundError(
        f"No {info.name} {split} data found. Looked at:\n  "
        + "\n  ".join(looked)
        + f"\nTo get it: {_HOW_TO_GET[name]}; or prepare it with TFDS: `tfds build {name} "
        "--file_format=array_record` (needs `pip install tensorflow`) and pass its data_dir."
    )


# --- Batching on the host -------------------------------------------------------------------------


def num_train_steps(num_examples: int, global_batch_size: int) -> int:
    """Training steps per epoch: full global batches only (the remainder is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be >= 1.")
    return num_examples // global_batch_size


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    return global_batch_size // process_count


def train_batches(
    split: Split,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled full batches: 'image' uint8 (B, H, W, C), 'label' int32 (B,).

    The order is a permutation drawn from `(seed, epoch)`, so a resumed epoch is identical. B is
    `global_batch_size // process_count`; this process gets its contiguous slice of each global
    batch. The last partial global batch is dropped.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    if global_batch_size > len(split):
        raise ValueError(f"global_batch_size={global_batch_size} > {len(split)} examples.")
    order = np.random.default_rng((seed, epoch)).permutation(len(split))
    for step in range(num_train_steps(len(split), global_batch_size)):
        start = step * global_batch_size + process_index * local
        idx = order[start : start + local]
        yield {"image": split.images[idx], "label": split.labels[idx]}


def eval_batches(
    split: Split, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example once, in order, as full batches with 'mask' float32 (B,).

    The last global batch is zero-padded; 'mask' is 1 for real examples and 0 for padding.
    Keys and process slicing as in `train_batches`.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    n = len(split)
    for start in range(0, n, global_batch_size):
        idx = start + process_index * local + np.arange(local)
        real = idx < n
        image = np.zeros((local, *split.images.shape[1:]), np.uint8)
        label = np.zeros((local,), np.int32)
        image[real] = split.images[idx[real]]
        label[real] = split.labels[idx[real]]
        yield {"image": image, "label": label, "mask": real.astype(np.float32)}


# --- On the device, inside the jitted step --------------------------------------------------------


def _augment_params(
    rng: jax.Array, batch_size: int, crop_padding: int, flip: bool, example_offset=0
):
    """Per-example crop offsets int32 (B, 2) in [0, 2 * crop_padding] and flips bool (B,).

    Example i draws from `fold_in(rng, example_offset + i)` alone, so a global batch split
    over devices (each passing its offset) is augmented exactly as it is on one device.
    """

    def one(index):
        crop_rng, flip_rng = jax.random.split(jax.random.fold_in(rng, index))
        offset = jax.random.randint(crop_rng, (2,), 0, 2 * crop_padding + 1)
        return offset, jax.random.bernoulli(flip_rng, 0.5 if flip else 0.0)

    return jax.vmap(one)(example_offset + jnp.arange(batch_size))


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    example_offset: int | jax.Array = 0,
) -> jax.Array:
    """Random crop of the zero-padded image and random horizontal flip, per example.

    images: (B, H, W, C), uint8 or float, raw pixels (pad before normalizing, as torchvision's
    RandomCrop does). Returns the same shape and dtype. Offsets are uniform in
    [0, 2 * crop_padding] on each axis; each image is flipped with probability 0.5 if `flip`.
    `example_offset` is the index of `images[0]` in the global batch (see `_augment_params`).
    """
    batch, height, width, channels = images.shape
    offsets, flips = _augment_params(rng, batch, crop_padding, flip, example_offset)
    pad = ((crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0))

    def one(image, offset, flip_it):
        padded = jnp.pad(image, pad)
        crop = lax.dynamic_slice(padded, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip_it, crop[:, ::-1], crop)

    return jax.vmap(one)(images, offsets, flips)


def normalize(images: jax.Array, info: DatasetInfo, dtype=jnp.float32) -> jax.Array:
    """(images / 255 - mean) / std per channel; (B, H, W, C) pixels in [0, 255] -> `dtype`."""
    if images.shape[-1] != len(info.mean):
        raise ValueError(f"{info.name} has {len(info.mean)} channels, images {images.shape}.")
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def preprocess(
    rng: jax.Array,
    images: jax.Array,
    info: DatasetInfo,
    *,
    train: bool,
    crop_padding: int = 4,
    flip: bool = True,
    example_offset: int | jax.Array = 0,
    dtype=jnp.float32,
) -> jax.Array:
    """Train: `augment` then `normalize`; eval: `normalize` only (`rng` unused). (B,H,W,C)."""
    if train:
        images = augment(
            rng, images, crop_padding=crop_padding, flip=flip, example_offset=example_offset
        )
    return normalize(images, info, dtype)
