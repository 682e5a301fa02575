"""Tests for idsnn_jax.augment against the NumPy references (tests/references.py) and by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from idsnn_jax import augment as aug
from idsnn_jax import augment_ops, datasets
from idsnn_jax import input_pipeline as ip

H, W = 8, 10  # non-square on purpose: a swapped axis shows


# --- TrivialAugment-style policy ------------------------------------------------------------


def test_auto_augment_matches_reference_per_example():
    images = np.random.default_rng(5).integers(0, 256, (32, H, W, 3), dtype=np.uint8)
    rng = jax.random.PRNGKey(3)
    out = np.asarray(jax.jit(aug.auto_augment)(rng, images))
    ops, ms = map(np.asarray, aug.sample_ops(rng, 32))
    assert ops.dtype == np.int32 and ms.dtype == np.float32
    for got, image, op, m in zip(out, images, ops, ms, strict=True):
        np.testing.assert_array_equal(got, ref.trivial_augment_op(image, augment_ops.OPS[op], m))
    with pytest.raises(ValueError, match="uint8"):
        aug.auto_augment(rng, images.astype(np.float32))


def test_sample_ops_differ_per_example_and_cover_ops():
    ops, ms = map(np.asarray, aug.sample_ops(jax.random.PRNGKey(0), 512))
    assert len(np.unique(ops[:64])) > 1 and len(np.unique(ms[:64])) == 64
    assert set(ops.tolist()) == set(range(len(augment_ops.OPS))) and 0 <= ms.min() < ms.max() < 1


# --- Cutout -----------------------------------------------------------------------------------


def test_cutout_hole_sizes_by_hand():
    ones = jnp.ones((H, W, 1))
    hole = lambda center, size: 1 - np.asarray(aug.apply_cutout(ones, jnp.array(center), size))
    inside = hole((4, 5), 4)
    assert inside.sum() == 16 and inside[2:6, 3:7].all()  # rows 2..5, columns 3..6
    assert hole((0, 0), 4).sum() == 4  # rows and columns 0..1: cut off at the border
    assert hole((7, 9), 4).sum() == 9  # rows 5..7, columns 7..9
    assert hole((4, 5), 3).sum() == 4 and hole((4, 5), 3)[3:5, 4:6].all()  # odd: (3 - 1)**2


def test_cutout_matches_numpy_reference():
    images = np.random.default_rng(1).normal(size=(64, H, W, 3)).astype(np.float32)
    rng = jax.random.PRNGKey(7)
    centers = np.asarray(aug.sample_centers(rng, 64, H, W))
    assert centers.dtype == np.int32 and len(np.unique(centers, axis=0)) > 1
    assert centers.min(0).tolist() == [0, 0] and (centers.max(0) < [H, W]).all()
    for size in (4, 5):
        out = np.asarray(aug.cutout(rng, images, size=size))
        assert out.dtype == np.float32
        for got, image, (cy, cx) in zip(out, images, centers, strict=True):
            np.testing.assert_array_equal(got, ref.cutout(image, cy, cx, size))
    assert aug.cutout(rng, images, size=0) is images
    with pytest.raises(ValueError, match="size=-1"):
        aug.cutout(rng, images, size=-1)


# --- Per-example keying -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fn",
    [
        lambda rng, x, offset: aug.cutout(rng, x, size=4, example_offset=offset),
        lambda rng, x, offset: aug.auto_augment(rng, x, example_offset=offset),
    ],
    ids=["cutout", "auto_augment"],
)
def test_split_batch_augmented_as_whole_batch(fn):
    images = np.random.default_rng(2).integers(0, 256, (8, H, W, 3), dtype=np.uint8)
    rng, step = jax.random.PRNGKey(11), jax.jit(fn)
    whole = np.asarray(step(rng, images, jnp.int32(0)))
    halves = [step(rng, images[i : i + 4], jnp.int32(i)) for i in (0, 4)]  # traced offsets
    np.testing.assert_array_equal(np.concatenate(halves), whole)
    assert not np.array_equal(whole[4:], np.asarray(step(rng, images[4:], jnp.int32(0))))


# --- Crop and flip ---------------------------------------------------------------------------


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
    out = aug.crop_and_flip(rng, jnp.asarray(images), crop_padding=2)
    offsets, flips = map(np.asarray, aug.crop_flip_params(rng, 64, 2, True))
    assert out.dtype == dtype and out.shape == images.shape
    assert 0 < flips.sum() < 64 and len(np.unique(offsets)) == 5  # the batch mixes decisions
    np.testing.assert_array_equal(np.asarray(out), _numpy_augment(images, offsets, flips, 2))
    jitted = jax.jit(aug.crop_and_flip, static_argnames=("crop_padding", "flip"))
    np.testing.assert_array_equal(np.asarray(jitted(rng, images, crop_padding=2)), out)


def test_augment_flip_only_and_identity():
    images = np.random.default_rng(1).integers(0, 256, (400, 3, 4, 1), dtype=np.uint8)
    out = np.asarray(aug.crop_and_flip(jax.random.key(0), images, crop_padding=0))
    same = (out == images).all(axis=(1, 2, 3))
    mirrored = (out == images[:, :, ::-1]).all(axis=(1, 2, 3))
    assert (same ^ mirrored).all()  # random images are never symmetric
    assert 0.43 < mirrored.mean() < 0.57
    unchanged = aug.crop_and_flip(jax.random.key(0), images, crop_padding=0, flip=False)
    np.testing.assert_array_equal(np.asarray(unchanged), images)


def test_augment_offsets_uniform_from_output():
    pad, size, n = 2, 6, 5000
    marker = (np.arange(size * size).reshape(1, size, size, 1) + 1).astype(np.float32)
    out = np.asarray(
        aug.crop_and_flip(jax.random.key(3), np.repeat(marker, n, 0), crop_padding=pad, flip=False)
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
    out = np.asarray(aug.crop_and_flip(rng, images, crop_padding=pad, flip=False))
    offsets, _ = aug.crop_flip_params(rng, n, pad, False)
    for img, (dy, dx) in zip(out, np.asarray(offsets), strict=True):
        rows = np.flatnonzero(img.any(axis=(1, 2)))
        cols = np.flatnonzero(img.any(axis=(0, 2)))
        assert (rows[0], rows[-1]) == (max(pad - dy, 0), 7 - max(dy - pad, 0))
        assert (cols[0], cols[-1]) == (max(pad - dx, 0), 7 - max(dx - pad, 0))
        assert set(np.unique(img)) <= {0, 200}


def test_preprocess_pads_before_normalizing():
    info = datasets.dataset_info("cifar100")
    images = jnp.full((16, 32, 32, 3), 128, jnp.uint8)
    rng = jax.random.key(5)
    step = jax.jit(lambda r, x: aug.preprocess(r, x, info, train=True))
    out = np.asarray(step(rng, images))
    expected = ip.normalize(aug.crop_and_flip(rng, images), info)
    np.testing.assert_allclose(out, np.asarray(expected), rtol=1e-6, atol=1e-6)
    pad_value = -np.array(info.mean) / np.array(info.std)  # a zero pixel, normalized
    is_pad = np.isclose(out, pad_value, atol=1e-5).all(axis=-1)
    assert is_pad.any() and not is_pad.all()
    evaluated = aug.preprocess(None, images, info, train=False)
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(ip.normalize(images, info)))
