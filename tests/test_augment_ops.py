"""The TrivialAugment-style ops (idsnn_jax.augment_ops) against the NumPy references
(tests/references.py) and by hand."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import references as ref

from idsnn_jax import augment_ops

H, W = 8, 10  # non-square on purpose: a swapped axis shows
MAGNITUDES = (0.0, 0.37, 0.5, 0.81, 1.0)  # none a rounding tie of a translate or threshold
_apply = jax.jit(augment_ops.apply_op)  # one compile per image shape: op and magnitude are traced


def _op(image: np.ndarray, name: str, m: float) -> np.ndarray:
    return np.asarray(_apply(image, augment_ops.OPS.index(name), m))


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
    assert augment_ops.OPS == (
        "identity", "rotate", "shear_x", "shear_y", "translate_x", "translate_y",
        "brightness", "contrast", "solarize", "posterize",
    )  # fmt: skip


@pytest.mark.parametrize("channels", [1, 3])
def test_apply_op_matches_numpy_reference(channels):
    cases = [(im, op, m) for im in _images(channels) for op in augment_ops.OPS for m in MAGNITUDES]
    images, ops, ms = (np.stack(column) for column in zip(*cases, strict=True))
    indices = np.array([augment_ops.OPS.index(op) for op in ops], np.int32)
    out = np.asarray(
        jax.jit(jax.vmap(augment_ops.apply_op))(images, indices, ms.astype(np.float32))
    )
    assert out.dtype == np.uint8 and out.shape == images.shape
    for got, (image, op, m) in zip(out, cases, strict=True):
        np.testing.assert_array_equal(got, ref.trivial_augment_op(image, op, m), f"{op} m={m}")


def test_apply_op_unbatched_matches_batched():
    image = _images(3)[0]
    for index, op in enumerate(augment_ops.OPS):
        np.testing.assert_array_equal(
            _op(image, op, 0.81), augment_ops.apply_op(image, index, 0.81)
        )


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
