"""Tests for idsnn_jax.augment against the NumPy references (tests/references.py) and by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from idsnn_jax import augment as aug

H, W = 8, 10  # non-square on purpose: a swapped axis shows
MAGNITUDES = (0.0, 0.37, 0.5, 0.81, 1.0)  # none a rounding tie of a translate or threshold
_apply = jax.jit(aug.apply_op)  # one compile per image shape: op and magnitude are traced


def _op(image: np.ndarray, name: str, m: float) -> np.ndarray:
    return np.asarray(_apply(image, aug.OPS.index(name), m))


def _images(channels: int) -> list[np.ndarray]:
    """A random image, a gradient and a single bright pixel, uint8 (H, W, channels)."""
    random = np.random.default_rng(channels).integers(0, 256, (H, W, channels), dtype=np.uint8)
    ramp = np.add.outer(np.arange(H) * 20, np.arange(W) * 7)[..., None] + 40 * np.arange(channels)
    pixel = np.zeros((H, W, channels), np.uint8)
    pixel[2, 7] = 200
    return [random, np.clip(ramp, 0, 255).astype(np.uint8), pixel]


def _pixel(y: int, x: int, shape=(H, W, 1), value: int = 255) -> np.ndarray:
    image = np.zeros(shape, np.uint8)
    image[y, x] = value
    return image


# --- TrivialAugment-style ops -----------------------------------------------------------------


def test_ops_names_and_order():
    assert aug.OPS == (
        "identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
        "brightness", "contrast", "solarize", "posterize",
    )  # fmt: skip


@pytest.mark.parametrize("channels", [1, 3])
def test_apply_op_matches_numpy_reference(channels):
    cases = [(im, op, m) for im in _images(channels) for op in aug.OPS for m in MAGNITUDES]
    images, ops, ms = (np.stack(column) for column in zip(*cases, strict=True))
    indices = np.array([aug.OPS.index(op) for op in ops], np.int32)
    out = np.asarray(jax.jit(jax.vmap(aug.apply_op))(images, indices, ms.astype(np.float32)))
    assert out.dtype == np.uint8 and out.shape == images.shape
    for got, (image, op, m) in zip(out, cases, strict=True):
        np.testing.assert_array_equal(got, ref.trivial_augment_op(image, op, m), f"{op} m={m}")


def test_apply_op_unbatched_matches_batched():
    image = _images(3)[0]
    for index, op in enumerate(aug.OPS):
        np.testing.assert_array_equal(_op(image, op, 0.81), aug.apply_op(image, index, 0.81))


def test_identity_at_middle_magnitude():
    image = _images(3)[0]
    for op in ("identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
        np.testing.assert_array_equal(_op(image, op, 0.5), image, op)
    for op in ("brightness", "contrast"):  # factor 1
        np.testing.assert_array_equal(_op(image, op, 0.5), image, op)


def test_translate_moves_pixel_by_rounded_fraction():
    # translate_x: k = round((2 m - 1) * 0.3 * 10) = +3 at m = 1 (right), -3 at m = 0 (left).
    np.testing.assert_array_equal(_op(_pixel(3, 2), "translate_x", 1.0), _pixel(3, 5))
    np.testing.assert_array_equal(_op(_pixel(3, 6), "translate_x", 0.0), _pixel(3, 3))
    # translate_y: k = round(0.3 * 8) = 2, down at m = 1; a pixel shifted out leaves zeros.
    np.testing.assert_array_equal(_op(_pixel(3, 2), "translate_y", 1.0), _pixel(5, 2))
    assert not _op(_pixel(7, 2), "translate_y", 1.0).any()


def test_rotate_is_counter_clockwise_as_displayed():
    # 9x9, center (4, 4): the pixel 4 right of it at +30 degrees lands near
    # (4 - 4 sin 30, 4 + 4 cos 30) = (2, 7.46); output (2, 7) samples input (3.77, 7.60) -> (4, 8).
    out = _op(_pixel(4, 8, (9, 9, 1)), "rotate", 1.0)
    assert out[2, 7, 0] == 255 and out[4, 8, 0] == 0
    assert _op(_pixel(4, 8, (9, 9, 1)), "rotate", 0.0)[6, 7, 0] == 255  # -30: clockwise, down


def test_shear_x_slides_rows_about_center():
    # s = 0.3 at m = 1: row y samples column x + round(0.3 (y - 3.5)), so a vertical line at
    # x = 5 lands at 6 in rows 0-1 (offset -1.05, -0.75), 5 in rows 2-5, 4 in rows 6-7.
    line = np.zeros((H, W, 1), np.uint8)
    line[:, 5] = 255
    columns = _op(line, "shear_x", 1.0)[..., 0].argmax(axis=1)
    np.testing.assert_array_equal(columns, [6, 6, 5, 5, 5, 5, 4, 4])


def test_photometric_ops_by_hand():
    image = np.array([[0, 100, 200, 255]], np.uint8)[..., None]  # (1, 4, 1)
    np.testing.assert_array_equal(_op(image, "brightness", 1.0)[0, :, 0], [0, 190, 255, 255])
    np.testing.assert_array_equal(_op(image, "brightness", 0.0)[0, :, 0], [0, 10, 20, 26])
    halves = np.array([[0, 200]], np.uint8)[..., None]  # mean 100
    np.testing.assert_array_equal(_op(halves, "contrast", 0.0)[0, :, 0], [90, 110])
    np.testing.assert_array_equal(_op(halves, "contrast", 1.0)[0, :, 0], [0, 255])
    grey_rgb = np.repeat(halves, 3, axis=-1)  # the luma weights sum to 1: same mean
    np.testing.assert_array_equal(_op(grey_rgb, "contrast", 0.0)[0, :, 0], [90, 110])


def test_solarize_and_posterize_by_hand():
    image = np.array([[0, 127, 128, 183, 254, 255]], np.uint8)[..., None]
    solarize = lambda m: _op(image, "solarize", m)[0, :, 0]
    np.testing.assert_array_equal(solarize(0.0), image[0, :, 0])  # t = 256: none
    np.testing.assert_array_equal(solarize(0.5), [0, 127, 127, 72, 1, 0])  # t = 128
    np.testing.assert_array_equal(solarize(1.0), 255 - image[0, :, 0])  # t = 0: all
    posterize = lambda m: _op(image, "posterize", m)[0, :, 0]
    np.testing.assert_array_equal(posterize(0.0), image[0, :, 0])  # 8 bits
    np.testing.assert_array_equal(posterize(0.5), [0, 124, 128, 180, 252, 252])  # 6 bits
    np.testing.assert_array_equal(posterize(1.0), [0, 112, 128, 176, 240, 240])  # 4 bits


def test_auto_augment_matches_reference_per_example():
    images = np.random.default_rng(5).integers(0, 256, (32, H, W, 3), dtype=np.uint8)
    rng = jax.random.PRNGKey(3)
    out = np.asarray(jax.jit(aug.auto_augment)(rng, images))
    ops, ms = map(np.asarray, aug.sample_ops(rng, 32))
    assert ops.dtype == np.int32 and ms.dtype == np.float32
    for got, image, op, m in zip(out, images, ops, ms, strict=True):
        np.testing.assert_array_equal(got, ref.trivial_augment_op(image, aug.OPS[op], m))
    with pytest.raises(ValueError, match="uint8"):
        aug.auto_augment(rng, images.astype(np.float32))


def test_sample_ops_differ_per_example_and_cover_ops():
    ops, ms = map(np.asarray, aug.sample_ops(jax.random.PRNGKey(0), 512))
    assert len(np.unique(ops[:64])) > 1 and len(np.unique(ms[:64])) == 64
    assert set(ops.tolist()) == set(range(len(aug.OPS))) and 0 <= ms.min() < ms.max() < 1


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
