"""Tests for idsnn_jax.input_pipeline: host batching and device-side augmentation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idsnn_jax import datasets
from idsnn_jax import input_pipeline as ip


def _split(n: int, shape=(4, 4, 3), seed: int = 0) -> datasets.Split:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return datasets.Split(images, np.arange(n, dtype=np.int32))


# --- Batch order and layout -------------------------------------------------------------------


def test_num_train_steps():
    assert ip.num_train_steps(50000, 64) == 781
    assert ip.num_train_steps(128, 64) == 2
    with pytest.raises(ValueError, match="global_batch_size=0"):
        ip.num_train_steps(10, 0)


def test_epoch_indices_shuffle_per_epoch_and_drop_remainder():
    def order(seed, epoch, **kwargs):
        return np.asarray(ip.epoch_indices(10, 4, seed=seed, epoch=epoch, **kwargs))

    first = order(0, 0)
    assert first.shape == (2, 4) and first.dtype == np.int32  # 2 steps, remainder 2 dropped
    assert len(set(first.ravel().tolist())) == 8 and set(first.ravel()) <= set(range(10))
    np.testing.assert_array_equal(first, order(0, 0))
    # The permutation is jax.random's, from the key folded with the epoch.
    key = jax.random.fold_in(jax.random.PRNGKey(0), 0)
    expected = np.asarray(jax.random.permutation(key, 10))[:8].reshape(2, 4)
    np.testing.assert_array_equal(first, expected)
    assert not np.array_equal(first, order(0, 1))
    assert not np.array_equal(first, order(1, 0))
    # Padding to a multiple of 3 steps appends a row of zeros and keeps the real rows.
    padded = order(0, 0, steps_multiple=3)
    np.testing.assert_array_equal(padded, np.concatenate([first, np.zeros((1, 4), np.int32)]))


def test_epoch_indices_sharded_like_one_device():
    """Placed with each device's slice of every batch, the values are those of one device."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("batch",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "batch"))
    sharded = ip.epoch_indices(50, 12, seed=3, epoch=2, sharding=sharding)
    assert sharded.sharding == sharding
    assert sharded.addressable_shards[1].data.shape == (4, 12 // jax.device_count())
    np.testing.assert_array_equal(sharded, ip.epoch_indices(50, 12, seed=3, epoch=2))


def test_batching_argument_errors():
    split = _split(10)
    with pytest.raises(ValueError, match="12 > 10 examples"):
        ip.epoch_indices(10, 12, seed=0, epoch=0)
    with pytest.raises(ValueError, match="num_shards=3 must be a multiple of process_count=1"):
        ip.epoch_indices(10, 4, seed=0, epoch=0, num_shards=3)
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        next(ip.eval_batches(split, global_batch_size=4, process_count=3))


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_eval_batches_cover_every_example_once(process_count):
    """Each process holds its part (`test_rows`); all yield as many batches, and together
    they count every example once."""
    split = _split(11)
    parts = [
        ip.test_rows(11, process_index=p, process_count=process_count) for p in range(process_count)
    ]
    assert [i for rows in parts for i in range(11)[rows]] == list(range(11))
    per_process = [
        list(
            ip.eval_batches(
                datasets.Split(split.images[rows], split.labels[rows]),
                global_batch_size=4,
                total=11,
                process_count=process_count,
            )
        )
        for rows in parts
    ]
    assert len({len(b) for b in per_process}) == 1  # every process runs each eval step
    batches = [b for bs in per_process for b in bs]
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
    # Two processes: parts [0, 3) and [3, 5), two examples each per batch, padded at the end.
    labels, masks = [], []
    for p in range(2):
        rows = ip.test_rows(5, process_index=p, process_count=2)
        part = datasets.Split(split.images[rows], split.labels[rows])
        local = list(ip.eval_batches(part, global_batch_size=4, total=5, process_count=2))
        labels.append([b["label"].tolist() for b in local])
        masks.append([b["mask"].tolist() for b in local])
    assert labels == [[[0, 1], [2, 0]], [[3, 4], [0, 0]]]
    assert masks == [[[1, 1], [1, 0]], [[1, 1], [0, 0]]]


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
    info = datasets.dataset_info("cifar10")
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
    info = datasets.dataset_info("cifar100")
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
