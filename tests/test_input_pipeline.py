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
