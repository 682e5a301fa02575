"""The CIFAR loader (idsnn_jax.cifar) on the official archive formats, written here by the
test fixtures: pixel layout, preferences, and every damaged or hostile input named."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
from conftest import _CIFAR_FILES as CIFAR_FILES
from conftest import data_py2_pickle, load_error_and_peak_mib

from idsnn_jax import cifar, datasets

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


def test_huge_archive_member_is_refused_before_reading(tmp_path):
    """A 0.4 MB .tar.gz whose first batch declares (and holds) 100 MiB of zeros: refused from
    the member's declared size, without reading it (the old reader held it all: 100 MiB)."""
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/data_batch_1.bin")
        info.size = 100 * 2**20
        tar.addfile(info, _Zeros(info.size))
    assert archive.stat().st_size < 2**20
    message, peak = load_error_and_peak_mib("cifar10", "train", str(tmp_path))
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
    error, peak = load_error_and_peak_mib(name, split, str(tmp_path))
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
