"""Tests for idsnn_jax.datasets: dataset facts, splits, the IDX loader on real files, TFDS,
missing data (the CIFAR loader: test_cifar.py)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import data_idx_bytes, load_error_and_peak_mib

from idsnn_jax import datasets

FASHION_DIR = datasets.DEFAULT_FASHION_MNIST_DIR
HAVE_FASHION = os.path.isfile(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))


# --- DatasetInfo, Split ------------------------------------------------------------------------


def test_dataset_info():
    cifar10, cifar100 = datasets.dataset_info("cifar10"), datasets.dataset_info("cifar100")
    assert (cifar10.num_classes, cifar100.num_classes) == (10, 100)
    assert cifar10.image_shape == cifar100.image_shape == (32, 32, 3)
    assert cifar10.mean == cifar100.mean == (0.5071, 0.4867, 0.4408)
    assert cifar10.std == cifar100.std == (0.2675, 0.2565, 0.2761)
    fmnist = datasets.dataset_info("fashion_mnist")
    assert (fmnist.image_shape, fmnist.mean, fmnist.std) == ((28, 28, 1), (0.2860,), (0.3530,))
    with pytest.raises(
        ValueError, match="name='mnist' is an unknown dataset.*cifar10.*fashion_mnist"
    ):
        datasets.dataset_info("mnist")


def test_split_validates_dtypes_and_shapes():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        datasets.Split(images.astype(np.float32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="int32"):
        datasets.Split(images, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="int32"):
        datasets.Split(images, np.zeros(2, np.int32))
    assert len(datasets.Split(images, np.zeros(3, np.int32))) == 3


def test_load_split_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="split='val'"):
        datasets.load_split("cifar10", "val", str(tmp_path))
    with pytest.raises(ValueError, match="max_examples=0"):
        datasets.load_split("cifar10", "train", str(tmp_path), max_examples=0)


def test_offline_path_never_imports_tensorflow(data_cifar10_dir):
    code = (
        "import sys; from idsnn_jax import datasets, input_pipeline; "
        f"s = datasets.load_split('cifar10', 'train', {str(data_cifar10_dir)!r}); "
        "assert s.images.shape == (40, 32, 32, 3), s.images.shape; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'tensorflow_datasets')))"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- Fashion-MNIST IDX -------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx(tmp_path, gz):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 1], np.uint8)
    for stem, array in (("t10k-images-idx3-ubyte", images), ("t10k-labels-idx1-ubyte", labels)):
        if gz:
            with gzip.open(tmp_path / f"{stem}.gz", "wb") as f:
                f.write(data_idx_bytes(array))
        else:
            (tmp_path / stem).write_bytes(data_idx_bytes(array))
    loaded = datasets.load_split("fashion_mnist", "test", str(tmp_path), max_examples=4)
    np.testing.assert_array_equal(loaded.images, images[:4, :, :, None])
    assert loaded.labels.dtype == np.int32 and loaded.labels.tolist() == [9, 0, 3, 3]


def _write_idx(directory, prefix, images, labels, *, gz=False):
    """`prefix`-images/labels IDX files (raw bytes are written as they are)."""
    for kind, array in (("images-idx3", images), ("labels-idx1", labels)):
        raw = array if isinstance(array, bytes) else data_idx_bytes(array)
        path = directory / f"{prefix}-{kind}-ubyte{'.gz' if gz else ''}"
        path.write_bytes(gzip.compress(raw) if gz else raw)


def test_bad_idx_gives_clear_errors(tmp_path):
    labels = tmp_path / "train-labels-idx1-ubyte"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data_idx_bytes(np.zeros((2, 28, 28))))
    labels.write_bytes(data_idx_bytes(np.zeros((2, 1))))  # 2 dims where 1 is expected
    with pytest.raises(ValueError, match="bad IDX magic 00000802; expected 00000801"):
        datasets.load_split("fashion_mnist", "train", str(tmp_path))
    labels.write_bytes(data_idx_bytes(np.zeros(3))[:-1])
    with pytest.raises(ValueError, match=r"do not match the IDX header dims \(3,\)"):
        datasets.load_split("fashion_mnist", "train", str(tmp_path))
    labels.write_bytes(data_idx_bytes(np.zeros(3)))
    with pytest.raises(ValueError, match="3 labels but 2 images"):
        datasets.load_split("fashion_mnist", "train", str(tmp_path))


IMAGES = np.random.default_rng(0).integers(0, 256, (4, 28, 28))  # incompressible
LABELS = np.array([9, 0, 3, 3])
IMG, LAB = "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"


def _cut(path, keep: float | int) -> None:
    """Keeps the first `keep` bytes (a fraction of them if a float) of the file at `path`."""
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep) if isinstance(keep, float) else keep])


def _put(path, images=IMAGES, labels=LABELS, gz=False) -> None:
    _write_idx(path, "t10k", images, labels, gz=gz)


@pytest.mark.parametrize(
    "gz, damage, bad_file, message",
    [  # damage(data_dir) after good files are written
        (True, lambda d: _cut(d / f"{IMG}.gz", 0.5), f"{IMG}.gz", "EOFError"),
        (True, lambda d: (d / f"{IMG}.gz").write_bytes(b"\x1f\x8bxyzw" * 4), f"{IMG}.gz", "Gzip"),
        (
            True,
            lambda d: _put(d, labels=data_idx_bytes(LABELS)[:6], gz=True),
            f"{LAB}.gz",
            "shorter than the 8-byte IDX header",
        ),
        (False, lambda d: _cut(d / IMG, 0.9), IMG, r"header dims \(4, 28, 28\).*truncated"),
        (False, lambda d: _put(d, labels=b"\x00\x00\x08\x03" + bytes(8)), LAB, "magic 00000803"),
        (False, lambda d: _put(d, images=np.zeros((4, 32, 32))), IMG, r"\(N, 28, 28\).*32, 32"),
        (False, lambda d: _put(d, np.zeros((0, 28, 28)), LABELS[:0]), IMG, "N >= 1"),
        (False, lambda d: _put(d, labels=np.array([0, 1, 12, 3])), LAB, "label 12 at index 2"),
        (False, lambda d: _put(d, labels=LABELS[:3]), LAB, "3 labels but 4 images"),
    ],
    ids=[
        "truncated_gzip",
        "bad_gzip",
        "truncated_header",
        "fewer_items_than_header",
        "wrong_magic",
        "wrong_image_shape",
        "empty",
        "label_out_of_range",
        "count_mismatch",
    ],
)
def test_bad_idx_files_are_named(tmp_path, gz, damage, bad_file, message):
    """Each corrupt Fashion-MNIST file: a one-line ValueError that starts with its path."""
    _put(tmp_path, gz=gz)
    damage(tmp_path)
    with pytest.raises(ValueError, match=message) as err:
        datasets.load_split("fashion_mnist", "test", str(tmp_path))
    assert str(err.value).startswith(f"{tmp_path / bad_file}: ")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_idx_header_declaring_too_many_images_is_refused(tmp_path, gz):
    """An images file whose header declares 12755103 images (10^10 bytes), followed by
    64 MiB of zeros: refused from its header, reading none of the body (the old reader read
    the whole file first: 64 MiB raw, more through gzip)."""
    header = bytes([0, 0, 8, 3]) + np.asarray((12755103, 28, 28), ">u4").tobytes()
    path = tmp_path / f"{IMG}{'.gz' if gz else ''}"
    with gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb") as f:
        f.write(header)
        for _ in range(64):
            f.write(bytes(2**20))
    (tmp_path / LAB).write_bytes(data_idx_bytes(LABELS))
    message, peak = load_error_and_peak_mib("fashion_mnist", "test", str(tmp_path))
    assert message.startswith(
        f"{path}: the IDX header declares 12755103 images; the official file has at most 10000"
    ), message
    assert "\n" not in message
    assert peak < 8, f"{peak:.0f} MiB allocated to refuse it"


def test_idx_trailing_data_is_named(tmp_path):
    """Bytes after the items the header declares: the reader stops one byte past them."""
    _put(tmp_path, labels=data_idx_bytes(LABELS) + bytes(2**20))
    with pytest.raises(ValueError) as err:
        datasets.load_split("fashion_mnist", "test", str(tmp_path))
    assert str(err.value).startswith(
        f"{tmp_path / LAB}: data continues past the 4 bytes the IDX header dims (4,) declare"
    ), str(err.value)


@pytest.mark.skipif(not HAVE_FASHION, reason="needs `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist():
    test = datasets.load_split("fashion_mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    with gzip.open(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        reference = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(test.labels, reference)
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    train = datasets.load_split("fashion_mnist", "train")
    assert train.images.shape == (60000, 28, 28, 1)
    pixels = train.images / 255.0  # DatasetInfo's statistics are those of the train split.
    info = datasets.dataset_info("fashion_mnist")
    np.testing.assert_allclose(
        [pixels.mean(), pixels.std()], [info.mean[0], info.std[0]], atol=5e-4
    )


# --- TFDS and missing data ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "shape"), [("cifar100", (32, 32, 3)), ("fashion_mnist", (28, 28, 1))]
)
def test_tfds_data_source_under_mock(tmp_path, name, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=6):
        loaded = datasets.load_split(name, "test", str(tmp_path))
        short = datasets.load_split(name, "test", str(tmp_path), max_examples=4)
        source = tfds.data_source(name, split="test", download=False)
        reference = [source[i] for i in range(6)]
    assert loaded.images.shape == (6, *shape) and loaded.images.dtype == np.uint8
    np.testing.assert_array_equal(loaded.images, np.stack([ex["image"] for ex in reference]))
    assert loaded.labels.dtype == np.int32
    assert loaded.labels.tolist() == [int(ex["label"]) for ex in reference]
    np.testing.assert_array_equal(short.images, loaded.images[:4])
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("label, message", [(10, "label 10 at index 2"), (-1, "label -1 at")])
def test_tfds_labels_out_of_range_are_named(tmp_path, label, message):
    """TFDS examples whose labels leave [0, 10): the loader names the dataset and split (the
    data source stands in for prepared files whose labels do not match the dataset)."""
    tfds = pytest.importorskip("tensorflow_datasets")
    labels = [3, 0, label, 9]
    examples = [{"image": np.zeros((32, 32, 3), np.uint8), "label": k} for k in labels]
    mock = tfds.testing.mock_data(as_data_source_fn=lambda *args, **kwargs: examples)
    with mock, pytest.raises(ValueError, match=message) as err:
        datasets.load_split("cifar10", "train", str(tmp_path))
    assert str(err.value).startswith(f"TFDS 'cifar10' train in data_dir={tmp_path}: label")
    assert str(err.value).endswith("is outside [0, 10).")


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_missing_data_lists_every_place_looked(tmp_path, name):
    """An empty data directory: one line that lists every place looked at and how to get it."""
    with pytest.raises(FileNotFoundError) as err:
        datasets.load_split(name, "train", str(tmp_path))
    message = str(err.value)
    assert "\n" not in message
    if name == "cifar10":
        expected = ["cifar-10-batches-bin", "cifar-10-binary.tar.gz", "cifar-10-batches-py"]
        expected += ["cifar-10-python.tar.gz", "cifar-10-binary.tar.gz into data_dir"]
    else:
        expected = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
        expected += ["train-labels-idx1-ubyte.gz", "apt-get install dataset-fashion-mnist"]
    for piece in expected + [str(tmp_path), f"TFDS '{name}'", f"tfds build {name}"]:
        assert piece in message, (piece, message)
