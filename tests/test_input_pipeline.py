"""Tests for idsnn_jax.input_pipeline: loaders on real on-disk formats, batching, augmentation."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import subprocess
import sys
import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import data_idx_bytes

from idsnn_jax import input_pipeline as ip

FASHION_DIR = ip.DEFAULT_FASHION_MNIST_DIR
HAVE_FASHION = os.path.isfile(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz"))


def _split(n: int, shape=(4, 4, 3), seed: int = 0) -> ip.Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return ip.Split(images, np.arange(n, dtype=np.int32))


# --- DatasetInfo, Split ------------------------------------------------------------------------


def test_dataset_info():
    cifar10, cifar100 = ip.dataset_info("cifar10"), ip.dataset_info("cifar100")
    assert (cifar10.num_classes, cifar100.num_classes) == (10, 100)
    assert cifar10.image_shape == cifar100.image_shape == (32, 32, 3)
    assert cifar10.mean == cifar100.mean == (0.5071, 0.4867, 0.4408)
    assert cifar10.std == cifar100.std == (0.2675, 0.2565, 0.2761)
    fmnist = ip.dataset_info("fashion_mnist")
    assert (fmnist.image_shape, fmnist.mean, fmnist.std) == ((28, 28, 1), (0.2860,), (0.3530,))
    with pytest.raises(ValueError, match="dataset='mnist'.*cifar10.*fashion_mnist"):
        ip.dataset_info("mnist")


def test_split_validates_dtypes_and_shapes():
    images = np.zeros((3, 2, 2, 1), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ip.Split(images.astype(np.float32), np.zeros(3, np.int32))
    with pytest.raises(ValueError, match="int32"):
        ip.Split(images, np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="int32"):
        ip.Split(images, np.zeros(2, np.int32))
    assert len(ip.Split(images, np.zeros(3, np.int32))) == 3


def test_load_split_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="split='val'"):
        ip.load_split("cifar10", "val", str(tmp_path))
    with pytest.raises(ValueError, match="max_examples=0"):
        ip.load_split("cifar10", "train", str(tmp_path), max_examples=0)


# --- CIFAR official archives -------------------------------------------------------------------


@pytest.mark.parametrize("packed", [True, False], ids=["tar_gz", "extracted"])
@pytest.mark.parametrize("fmt", ["binary", "python"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_cifar_official_formats(tmp_path, data_cifar_writer, name, fmt, packed):
    written = data_cifar_writer(tmp_path, name, fmt, packed, per_file=3)
    for split in ("train", "test"):
        loaded = ip.load_split(name, split, str(tmp_path))
        images, labels = written[split]
        assert loaded.images.dtype == np.uint8 and loaded.labels.dtype == np.int32
        assert loaded.images.flags.c_contiguous
        np.testing.assert_array_equal(loaded.images, images)  # HWC from the CHW bytes
        np.testing.assert_array_equal(loaded.labels, labels)  # the fine label for CIFAR-100
    assert len(ip.load_split(name, "train", str(tmp_path))) == (15 if name == "cifar10" else 3)


def test_cifar_binary_pixel_layout_is_chw(tmp_path):
    # One hand-made record: R plane = 1, G plane = 2, B plane row y = y; label 7.
    planes = np.stack(
        [np.full((32, 32), 1), np.full((32, 32), 2), np.tile(np.arange(32), (32, 1)).T]
    )
    record = bytes([7]) + planes.astype(np.uint8).tobytes()
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes(record)
    loaded = ip.load_split("cifar10", "test", str(tmp_path))
    assert loaded.labels.tolist() == [7]
    assert loaded.images[0, 5, 9].tolist() == [1, 2, 5]
    assert loaded.images[0, 31, 0].tolist() == [1, 2, 31]


def test_cifar_binary_preferred_and_max_examples(tmp_path, data_cifar_writer):
    binary = data_cifar_writer(tmp_path, "cifar10", "binary", packed=True, per_file=4, seed=1)
    data_cifar_writer(tmp_path, "cifar10", "python", packed=True, per_file=4, seed=2)
    loaded = ip.load_split("cifar10", "train", str(tmp_path), max_examples=6)
    np.testing.assert_array_equal(loaded.images, binary["train"][0][:6])
    np.testing.assert_array_equal(loaded.labels, binary["train"][1][:6])


def test_pickle_written_by_modern_numpy_loads(tmp_path):
    data = np.arange(2 * 3072, dtype=np.uint8).reshape(2, 3072)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    batch = {b"data": data, b"fine_labels": [3, 99], b"coarse_labels": [0, 1]}
    (folder / "test").write_bytes(pickle.dumps(batch, protocol=5))
    loaded = ip.load_split("cifar100", "test", str(tmp_path))
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
        ip.load_split("cifar10", "test", str(tmp_path))
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError, match="builtins.eval"):
        ip._ArrayOnlyUnpickler(io.BytesIO(pickle.dumps(eval))).load()


def test_truncated_binary_gives_clear_error(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "test.bin").write_bytes(bytes(2 * 3074 + 100))
    with pytest.raises(ValueError, match=r"test.bin: 6248 bytes.*3074-byte.*truncated"):
        ip.load_split("cifar100", "test", str(tmp_path))


def test_bad_cifar_contents_give_clear_errors(tmp_path):
    bad_label, empty_archive, no_labels = (tmp_path / d for d in ("a", "b", "c"))
    (bad_label / "cifar-10-batches-bin").mkdir(parents=True)
    record = bytes([10]) + bytes(3072)  # label 10 of 10 classes
    (bad_label / "cifar-10-batches-bin" / "test_batch.bin").write_bytes(record)
    with pytest.raises(ValueError, match=r"labels must be N values in \[0, 10\)"):
        ip.load_split("cifar10", "test", str(bad_label))
    empty_archive.mkdir()
    with tarfile.open(empty_archive / "cifar-100-binary.tar.gz", "w:gz"):
        pass  # an archive without the batch files
    with pytest.raises(ValueError, match="has no member cifar-100-binary/train.bin"):
        ip.load_split("cifar100", "train", str(empty_archive))
    (no_labels / "cifar-100-python").mkdir(parents=True)
    (no_labels / "cifar-100-python" / "test").write_bytes(pickle.dumps({b"data": [1]}))
    with pytest.raises(ValueError, match="keys b'data' and b'fine_labels'"):
        ip.load_split("cifar100", "test", str(no_labels))


def test_offline_path_never_imports_tensorflow(data_cifar10_dir):
    code = (
        "import sys; from idsnn_jax import input_pipeline as ip; "
        f"s = ip.load_split('cifar10', 'train', {str(data_cifar10_dir)!r}); "
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
    loaded = ip.load_split("fashion_mnist", "test", str(tmp_path), max_examples=4)
    np.testing.assert_array_equal(loaded.images, images[:4, :, :, None])
    assert loaded.labels.dtype == np.int32 and loaded.labels.tolist() == [9, 0, 3, 3]


def test_bad_idx_gives_clear_errors(tmp_path):
    labels = tmp_path / "train-labels-idx1-ubyte"
    (tmp_path / "train-images-idx3-ubyte").write_bytes(data_idx_bytes(np.zeros((2, 28, 28))))
    labels.write_bytes(data_idx_bytes(np.zeros((2, 1))))  # 2 dims where 1 is expected
    with pytest.raises(ValueError, match="bad IDX magic 00000802; expected 00000801"):
        ip.load_split("fashion_mnist", "train", str(tmp_path))
    labels.write_bytes(data_idx_bytes(np.zeros(3))[:-1])
    with pytest.raises(ValueError, match=r"do not match the IDX header dims \(3,\)"):
        ip.load_split("fashion_mnist", "train", str(tmp_path))
    labels.write_bytes(data_idx_bytes(np.zeros(3)))
    with pytest.raises(ValueError, match="2 train images but 3 labels"):
        ip.load_split("fashion_mnist", "train", str(tmp_path))


@pytest.mark.skipif(not HAVE_FASHION, reason="needs `apt-get install dataset-fashion-mnist`")
def test_real_fashion_mnist():
    test = ip.load_split("fashion_mnist", "test")
    assert test.images.shape == (10000, 28, 28, 1) and test.images.dtype == np.uint8
    assert np.bincount(test.labels).tolist() == [1000] * 10
    with gzip.open(os.path.join(FASHION_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
        reference = np.frombuffer(f.read(), np.uint8, offset=8)
    np.testing.assert_array_equal(test.labels, reference)
    assert test.labels[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    train = ip.load_split("fashion_mnist", "train")
    assert train.images.shape == (60000, 28, 28, 1)
    pixels = train.images / 255.0  # DatasetInfo's statistics are those of the train split.
    info = ip.dataset_info("fashion_mnist")
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
        loaded = ip.load_split(name, "test", str(tmp_path))
        short = ip.load_split(name, "test", str(tmp_path), max_examples=4)
        source = tfds.data_source(name, split="test", download=False)
        reference = [source[i] for i in range(6)]
    assert loaded.images.shape == (6, *shape) and loaded.images.dtype == np.uint8
    np.testing.assert_array_equal(loaded.images, np.stack([ex["image"] for ex in reference]))
    assert loaded.labels.dtype == np.int32
    assert loaded.labels.tolist() == [int(ex["label"]) for ex in reference]
    np.testing.assert_array_equal(short.images, loaded.images[:4])
    assert "tensorflow" not in sys.modules


@pytest.mark.parametrize("name", ["cifar10", "fashion_mnist"])
def test_missing_data_lists_every_place_looked(tmp_path, name):
    with pytest.raises(FileNotFoundError) as err:
        ip.load_split(name, "train", str(tmp_path))
    message = str(err.value)
    if name == "cifar10":
        expected = ["cifar-10-batches-bin", "cifar-10-binary.tar.gz", "cifar-10-batches-py"]
        expected += ["cifar-10-python.tar.gz", "cifar-10-binary.tar.gz into data_dir"]
    else:
        expected = ["train-images-idx3-ubyte", "train-images-idx3-ubyte.gz"]
        expected += ["train-labels-idx1-ubyte.gz", "apt-get install dataset-fashion-mnist"]
    for piece in expected + [str(tmp_path), f"TFDS '{name}'", f"tfds build {name}"]:
        assert piece in message, (piece, message)


# --- Host batching -----------------------------------------------------------------------------


def test_num_train_steps():
    assert ip.num_train_steps(50000, 64) == 781
    assert ip.num_train_steps(128, 64) == 2
    with pytest.raises(ValueError, match="global_batch_size=0"):
        ip.num_train_steps(10, 0)


def test_train_batches_shuffle_per_epoch_and_drop_remainder():
    split = _split(10)

    def order(seed, epoch):
        batches = list(ip.train_batches(split, global_batch_size=4, seed=seed, epoch=epoch))
        for b in batches:
            assert b["image"].shape == (4, 4, 4, 3) and b["label"].dtype == np.int32
            np.testing.assert_array_equal(b["image"], split.images[b["label"]])  # pairs intact
        return np.concatenate([b["label"] for b in batches])

    first = order(0, 0)
    assert len(first) == 8 and len(set(first.tolist())) == 8  # 2 steps, remainder 2 dropped
    np.testing.assert_array_equal(first, order(0, 0))
    np.testing.assert_array_equal(first, np.random.default_rng((0, 0)).permutation(10)[:8])
    assert not np.array_equal(first, order(0, 1))
    assert not np.array_equal(first, order(1, 0))


def test_train_batches_process_slices_concatenate_to_global_batch():
    split = _split(50)
    kwargs = dict(global_batch_size=12, seed=3, epoch=2)
    whole = list(ip.train_batches(split, **kwargs))
    parts = [
        list(ip.train_batches(split, **kwargs, process_index=p, process_count=3)) for p in range(3)
    ]
    assert len(whole) == 4 and all(len(p) == 4 for p in parts)
    for step, batch in enumerate(whole):
        for key in ("image", "label"):
            local = [parts[p][step][key] for p in range(3)]
            assert local[0].shape[0] == 4
            np.testing.assert_array_equal(np.concatenate(local), batch[key])


def test_batching_argument_errors():
    split = _split(10)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        next(ip.train_batches(split, global_batch_size=4, seed=0, epoch=0, process_count=3))
    with pytest.raises(ValueError, match="12 > 10 examples"):
        next(ip.train_batches(split, global_batch_size=12, seed=0, epoch=0))
    with pytest.raises(ValueError, match="process_index=2"):
        next(ip.eval_batches(split, global_batch_size=4, process_index=2, process_count=2))


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_batches_cover_every_example_once(process_count):
    split = _split(11)
    batches = [
        b
        for p in range(process_count)
        for b in ip.eval_batches(
            split, global_batch_size=4, process_index=p, process_count=process_count
        )
    ]
    assert len(batches) == 3 * process_count  # ceil(11 / 4) global batches
    for b in batches:
        assert b["image"].shape == (4 // process_count, 4, 4, 3) and b["mask"].dtype == np.float32
    image, label, mask = (
        np.concatenate([b[k] for b in batches]) for k in ("image", "label", "mask")
    )
    assert mask.sum() == 11
    assert sorted(label[mask == 1].tolist()) == list(range(11))
    np.testing.assert_array_equal(image[mask == 1], split.images[label[mask == 1]])
    assert not image[mask == 0].any() and not label[mask == 0].any()


def test_eval_batches_order_and_padding_positions():
    split = _split(5)
    batches = list(ip.eval_batches(split, global_batch_size=4))
    assert [b["label"].tolist() for b in batches] == [[0, 1, 2, 3], [4, 0, 0, 0]]
    assert [b["mask"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    kwargs = dict(global_batch_size=4, process_count=2)
    parts = [list(ip.eval_batches(split, **kwargs, process_index=p)) for p in range(2)]
    for step, batch in enumerate(batches):
        for key in ("image", "label", "mask"):
            local = [parts[p][step][key] for p in range(2)]
            np.testing.assert_array_equal(np.concatenate(local), batch[key])


# --- Device-side augmentation ------------------------------------------------------------------


def _numpy_augment(images, offsets, flips, pad):
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    out = np.empty_like(images)
    height, width = images.shape[1:3]
    for i, ((dy, dx), f) in enumerate(zip(offsets, flips, strict=True)):
        crop = padded[i, dy : dy + height, dx : dx + width]
        out[i] = crop[:, ::-1] if f else crop
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_augment_matches_numpy_reference(dtype):
    rng = jax.random.key(7)
    images = np.random.default_rng(0).integers(1, 256, (64, 6, 5, 2)).astype(dtype)
    out = ip.augment(rng, jnp.asarray(images), crop_padding=2)
    offsets, flips = map(np.asarray, ip._augment_params(rng, 64, 2, True))
    assert out.dtype == dtype and out.shape == images.shape
    assert 0 < flips.sum() < 64 and len(np.unique(offsets)) == 5  # the batch mixes decisions
    np.testing.assert_array_equal(np.asarray(out), _numpy_augment(images, offsets, flips, 2))
    jitted = jax.jit(ip.augment, static_argnames=("crop_padding", "flip"))
    np.testing.assert_array_equal(np.asarray(jitted(rng, images, crop_padding=2)), out)


def test_augment_flip_only_and_identity():
    images = np.random.default_rng(1).integers(0, 256, (400, 3, 4, 1), dtype=np.uint8)
    out = np.asarray(ip.augment(jax.random.key(0), images, crop_padding=0))
    same = (out == images).all(axis=(1, 2, 3))
    mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same ^ mirrored).all()  # random images are never symmetric
    assert 0.43 < mirrored.mean() < 0.57
    unchanged = ip.augment(jax.random.key(0), images, crop_padding=0, flip=False)
    np.testing.assert_array_equal(np.asarray(unchanged), images)


def test_augment_offsets_uniform_from_output():
    pad, size, n = 2, 6, 5000
    marker = (np.arange(size * size).reshape(1, size, size, 1) + 1).astype(np.float32)
    out = np.asarray(
        ip.augment(jax.random.key(3), np.repeat(marker, n, 0), crop_padding=pad, flip=False)
    )
    value = (
        out[:, pad, pad, 0].astype(int) - 1
    )  # = marker at (dy, dx): out[i, j] = img[i+dy-p, j+dx-p]
    dy, dx = value // size, value % size
    for offsets in (dy, dx):
        counts = np.bincount(offsets, minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1
        np.testing.assert_allclose(counts / n, 1 / (2 * pad + 1), atol=0.02)
    assert abs(np.corrcoef(dy, dx)[0, 1]) < 0.05


def test_augment_border_of_shifted_crop_is_zero():
    pad, n = 4, 32
    images = np.full((n, 8, 8, 3), 200, np.uint8)
    rng = jax.random.key(11)
    out = np.asarray(ip.augment(rng, images, crop_padding=pad, flip=False))
    offsets, _ = ip._augment_params(rng, n, pad, False)
    for img, (dy, dx) in zip(out, np.asarray(offsets), strict=True):
        rows = np.flatnonzero(img.any(axis=(1, 2)))
        cols = np.flatnonzero(img.any(axis=(0, 2)))
        assert (rows[0], rows[-1]) == (max(pad - dy, 0), 7 - max(dy - pad, 0))
        assert (cols[0], cols[-1]) == (max(pad - dx, 0), 7 - max(dx - pad, 0))
        assert set(np.unique(img)) <= {0, 200}


def test_normalize_matches_numpy():
    info = ip.dataset_info("cifar10")
    images = np.random.default_rng(2).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    expected = (images / 255.0 - np.array(info.mean)) / np.array(info.std)
    out = ip.normalize(jnp.asarray(images), info)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6, atol=1e-6)
    low = ip.normalize(jnp.asarray(images), info, dtype=jnp.bfloat16)
    assert low.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(low, np.float32), expected, rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="3 channels"):
        ip.normalize(jnp.zeros((1, 2, 2, 1)), info)


def test_preprocess_pads_before_normalizing():
    info = ip.dataset_info("cifar100")
    images = jnp.full((16, 32, 32, 3), 128, jnp.uint8)
    rng = jax.random.key(5)
    step = jax.jit(lambda r, x: ip.preprocess(r, x, info, train=True))
    out = np.asarray(step(rng, images))
    expected = ip.normalize(ip.augment(rng, images), info)
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-6, atol=1e-6)
    pad_value = -np.array(info.mean) / np.array(info.std)  # a zero pixel, normalized
    is_pad = np.isclose(out, pad_value, atol=1e-5).all(axis=-1)
    assert is_pad.any() and not is_pad.all()
    evaluated = ip.preprocess(None, images, info, train=False)
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(ip.normalize(images, info)))
