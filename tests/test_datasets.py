"""Tests for idsnn_jax.datasets: the loaders on real on-disk formats, TFDS, missing data."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile
import tracemalloc

import numpy as np
import pytest
from conftest import _CIFAR_FILES as CIFAR_FILES
from conftest import data_idx_bytes, data_py2_pickle

from idsnn_jax import cifar, datasets

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


# --- CIFAR official archives -------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["tar_gz", "extracted"])
@pytest.mark.parametrize("fmt", ["binary", "python"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_official_formats(tmp_path, data_cifar_writer, name, fmt, packed):
    written = data_cifar_writer(tmp_path, name, fmt, packed, per_file=3)
    for split in ("train", "test"):
        loaded = datasets.load_split(name, split, str(tmp_path))
        images, labels = written[split]
        assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int32
        assert loaded.images.flags.c_contiguous
        np.testing.assert_array_equal(loaded.images, images)  # HWC from the CHW bytes
        np.testing.assert_array_equal(loaded.labels, labels)  # the fine label for CIFAR-100
    assert len(datasets.load_split(name, "train", str(tmp_path))) == (
        15 if name == "cifar10" else 3
    )


def test_cifar_binary_pixel_layout_is_chw(tmp_path):
    # One hand-made record: R plane = 1, G plane = 2, B plane row y = y; label 7.
    planes = np.stack(
        [np.full((32, 32), 1), np.full((32, 32), 2), np.tile(np.arange(32), (32, 1)).T]
    )
    record = bytes([7]) + planes.astype(np.uint8).tobytes()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(record)
    loaded = datasets.load_split("cifar10", "test", str(tmp_path))
    assert loaded.labels.tolist() == [7]
    assert loaded.images[0, 5, 9].tolist() == [1, 2, 5]
    assert loaded.images[0, 31, 0].tolist() == [1, 2, 31]


def test_cifar_binary_preferred_and_max_examples(tmp_path, data_cifar_writer):
    binary = data_cifar_writer(tmp_path, "cifar10", "binary", packed=True, per_file=4, seed=1)
    data_cifar_writer(tmp_path, "cifar10", "python", packed=True, per_file=4, seed=2)
    loaded = datasets.load_split("cifar10", "train", str(tmp_path), max_examples=6)
    np.testing.assert_array_equal(loaded.images, binary["train"][0][:6])
    np.testing.assert_array_equal(loaded.labels, binary["train"][1][:6])


def test_pickle_written_by_modern_numpy_loads(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = {b"data": data, b"fine_labels": [3, 99], b"coarse_labels": [0, 1]}
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=5))
    loaded = datasets.load_split("cifar100", "test", str(tmp_path))
    np.testing.assert_array_equal(loaded.images, data.reshape(2, 3, 32, 32).transpose(0, 2, 3, 1))
    assert loaded.labels.tolist() == [3, 99]


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("packed", [True, False])
def test_malicious_pickle_is_refused(tmp_path, packed):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": _Exploit(marker), b"labels": [0]}, protocol=4)
    if packed:
        with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
            info = tarfile.TarInfo("cifar-10-batches-py/test_batch")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    else:
        (tmp_path / "cifar-10-batches-py").mkdir()
        (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(payload)
    with pytest.raises(ValueError, match=r"Refusing to load global (posix|os|nt)\.system"):
        datasets.load_split("cifar10", "test", str(tmp_path))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        cifar._ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(eval))).load()


def test_truncated_binary_gives_clear_error(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "test.bin").write_bytes(bytes(2 * 3074 + 100))
    with pytest.raises(ValueError, match=r"test.bin: 6248 bytes.*3074-byte.*truncated"):
        datasets.load_split("cifar100", "test", str(tmp_path))


def test_bad_cifar_contents_give_clear_errors(tmp_path):
    bad_label, empty_archive, no_labels = (tmp_path / d for d in ("a", "b", "c"))
    (bad_label / "cifar-10-batches-bin").mkdir(parents=True)
    record = bytes([10]) + bytes(3072)  # label 10 of 10 classes
    (bad_label / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(record)
    with pytest.raises(ValueError, match=r"label 10 at index 0 is outside \[0, 10\)"):
        datasets.load_split("cifar10", "test", str(bad_label))
    empty_archive.mkdir()
    with tarfile.open(empty_archive / "cifar-100-binary.tar.gz", "w:gz"):
        pass  # an archive without the batch files
    with pytest.raises(ValueError, match="has no member cifar-100-binary/train.bin"):
        datasets.load_split("cifar100", "train", str(empty_archive))
    (no_labels / "cifar-100-python").mkdir(parents=True)
    (no_labels / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": [1]}))
    with pytest.raises(ValueError, match="keys b'data' and b'fine_labels'"):
        datasets.load_split("cifar100", "test", str(no_labels))


def _truncate(path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


@pytest.mark.parametrize("fmt", ["binary", "python"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: _truncate(p), "EOFError"),  # a download cut in the middle
        (lambda p: _truncate(p, 0.02), "EOFError"),  # ... or at its start
        (lambda p: p.write_bytes(b"<html>404 not found</html>"), "not a gzip file"),
        (lambda p: p.write_bytes(gzip.compress(bytes(range(256)) * 8)), "invalid header"),
    ],
    ids=["truncated", "truncated_early", "not_gzip", "bad_tar"],
)
def test_corrupt_cifar_archive_is_named(tmp_path, data_cifar_writer, name, fmt, damage, message):
    data_cifar_writer(tmp_path, name, fmt, packed=True, per_file=40)
    (archive,) = tmp_path.glob("*.tar.gz")
    damage(archive)
    with pytest.raises(ValueError, match=message) as err:
        datasets.load_split(name, "train", str(tmp_path))
    assert str(err.value).startswith(f"{archive}: not a readable .tar.gz")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "name, member, payload, message",
    [
        ("cifar10", "test_batch.bin", bytes(3073 * 2 - 5), "not a whole number of 3073-byte"),
        ("cifar10", "test_batch.bin", b"", "not a whole number"),  # empty file
        ("cifar100", "test.bin", bytes([0, 100]) + bytes(3072), r"label 100 at index 0"),
        ("cifar10", "test_batch", data_py2_pickle({b"data": 1})[:-3], "truncated or corrupt"),
        ("cifar10", "test_batch", b"\x80\x02garbage", "truncated or corrupt"),
        (
            "cifar10",
            "test_batch",
            pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [1, 2]}),
            r"\(N, 3072\).*\(2, 1024\)",  # images of the wrong shape (32x32 grey)
        ),
        (
            "cifar10",
            "test_batch",
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [1, -1]}),
            r"label -1 at index 1 is outside \[0, 10\)",
        ),
        (
            "cifar100",
            "test",
            pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [1]}),
            "2 images but labels of shape",
        ),
        (
            "cifar100",
            "test",
            pickle.dumps({b"data": np.zeros((1, 3072), np.uint8), b"fine_labels": ["cat"]}),
            "labels must be integers",
        ),
    ],
)
def test_bad_cifar_batch_is_named(tmp_path, name, member, payload, message):
    """A bad batch file, extracted or inside the archive: the error starts with its path."""
    fmt = "binary" if member.endswith(".bin") else "python"
    archive_name, folder, _ = CIFAR_FILES[(name, fmt)]
    for packed in (False, True):
        root = tmp_path / str(packed)
        if packed:
            root.mkdir()
            with tarfile.open(root / archive_name, "w:gz") as tar:  # only the bad test batch
                info = tarfile.TarInfo(f"{folder}/{member}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
            source = f"{root / archive_name}:{folder}/{member}"
        else:
            (root / folder).mkdir(parents=True)
            (root / folder / member).write_bytes(payload)
            source = str(root / folder / member)
        with pytest.raises(ValueError, match=message) as err:
            datasets.load_split(name, "test", str(root))
        assert str(err.value).startswith(f"{source}: "), str(err.value)
        assert "\n" not in str(err.value)


class _Zeros(io.RawIOBase):
    """`size` zero bytes read in chunks: a huge tar member the test never holds in memory."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _load_error_and_peak_mib(*args) -> tuple[str, float]:
    """The ValueError message of `datasets.load_split(*args)` and the peak of the memory
    Python allocated meanwhile (tracemalloc: bytes objects and NumPy arrays), in MiB."""
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as err:
            datasets.load_split(*args)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return str(err.value), peak / 2**20


def test_huge_archive_member_is_refused_before_reading(tmp_path):
    """A 0.4 MB .tar.gz whose first batch declares (and holds) 100 MiB of zeros: refused from
    the member's declared size, without reading it (the old reader held it all: 100 MiB)."""
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.size = 100 * 2**20
        tar.addfile(info, _Zeros(info.size))
    assert archive.stat().st_size < 2**20
    message, peak = _load_error_and_peak_mib("cifar10", "train", str(tmp_path))
    assert message.startswith(
        f"{archive}:cifar-10-batches-bin/data_batch_1.bin: declares 104857600 bytes; a CIFAR-10 "
        "binary batch has 30730000 (10000 records of 3073 bytes)"
    ), message
    assert "\n" not in message
    assert peak < 8, f"{peak:.0f} MiB allocated to refuse it"


def test_archive_of_many_entries_is_refused(tmp_path):
    """Entries past the 64 an official archive could hold are not scanned: tar headers
    compress well (200,000 empty entries: a 1.9 MB .tar.gz that the old reader indexed
    whole, 83 MiB traced, before saying the batch was missing)."""
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for i in range(65):
            tar.addfile(tarfile.TarInfo(f"cifar-10-batches-bin/empty_{i}"))
    with pytest.raises(ValueError) as err:
        datasets.load_split("cifar10", "test", str(tmp_path))
    assert str(err.value).startswith(
        f"{archive}: more than 64 entries before cifar-10-batches-bin/test_batch.bin"
    ), str(err.value)


@pytest.mark.parametrize(
    "name, member, size, message",
    [
        ("cifar10", "test_batch.bin", 30730000 + 3073, "a CIFAR-10 binary batch has 30730000"),
        ("cifar100", "test.bin", 30740000 + 1, "a CIFAR-100 binary batch has 30740000"),
        ("cifar100", "train", 200_000_000, "a CIFAR-100 python batch has at most 170700000"),
        ("cifar10", "test_batch", 40_000_000, "a CIFAR-10 python batch has at most 34140000"),
    ],
)
def test_huge_extracted_batch_is_refused_before_reading(tmp_path, name, member, size, message):
    """An extracted batch file larger than the official one (sparse: no disk used) is refused
    from its size on disk, before any read (the old reader read it whole)."""
    _, folder, _ = CIFAR_FILES[(name, "binary" if member.endswith(".bin") else "python")]
    path = tmp_path / folder / member
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.truncate(size)
    split = "train" if member == "train" else "test"
    error, peak = _load_error_and_peak_mib(name, split, str(tmp_path))
    assert error.startswith(f"{path}: {size} bytes; {message}"), error
    assert "\n" not in error
    assert peak < 8, f"{peak:.0f} MiB allocated to refuse it"


def test_official_size_binary_batch_still_loads(tmp_path):
    """The bound is the official size itself: a test_batch.bin of exactly 10000 records
    (zeros: label 0, black images) loads whole."""
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    path.parent.mkdir()
    with open(path, "wb") as f:
        f.truncate(10000 * 3073)
    loaded = datasets.load_split("cifar10", "test", str(tmp_path))
    assert loaded.images.shape == (10000, 32, 32, 3) and not loaded.images.any()
    assert not loaded.labels.any()


def test_extracted_cifar_folder_missing_a_batch(tmp_path, data_cifar_writer):
    data_cifar_writer(tmp_path, "cifar10", "binary", packed=False)
    missing = tmp_path / "cifar-10-batches-bin" / "data_batch_4.bin"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"{missing} is missing: .* data_batch_5.bin"):
        datasets.load_split("cifar10", "train", str(tmp_path))


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
    message, peak = _load_error_and_peak_mib("fashion_mnist", "test", str(tmp_path))
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
