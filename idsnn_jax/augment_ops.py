"""The TrivialAugment-style op set (Müller & Hutter 2021): ten image ops on uint8 (H, W, C),
each at a magnitude m in [0, 1]; which op and magnitude each example gets is drawn in
`augment.auto_augment`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# Magnitude m in [0, 1] -> op parameter. Signed ops take (2 m - 1) * max, so m = 0.5 is identity.
MAGNITUDES = {
    "rotate": 30.0,  # max angle, degrees
    "shear": 0.3,  # max shear factor
    "translate": 0.3,  # max shift, a fraction of the width (translate_x) or height (translate_y)
    "enhance": 0.9,  # brightness / contrast factor 1 + (2 m - 1) * 0.9, in [0.1, 1.9]
    "posterize": 4,  # bits dropped at m = 1: 8 - floor(4 m) bits kept
}
GREY = (0.299, 0.587, 0.114)  # ITU-R 601 luma weights of R, G, B (contrast's mean grey level)


def _signed(m: jax.Array, name: str) -> jax.Array:
    return (2.0 * m - 1.0) * MAGNITUDES[name]


def _warp(image: jax.Array, matrix: jax.Array) -> jax.Array:
    """Nearest-neighbour inverse affine warp of image (H, W, C) float32, zero outside.

    Output pixel (y, x) takes the input pixel at round(A @ [y - cy, x - cx, 1] + (cy, cx)),
    A = `matrix` (2, 3) over (row, column), center (cy, cx) = ((H - 1) / 2, (W - 1) / 2),
    `jnp.round` (half to even). Elementwise, not a matmul, so no backend lowers its precision.
    """
    height, width = image.shape[:2]
    cy, cx = (height - 1) / 2, (width - 1) / 2
    dy = jnp.arange(height, dtype=jnp.float32)[:, None] - cy
    dx = jnp.arange(width, dtype=jnp.float32)[None, :] - cx
    sy = jnp.round(matrix[0, 0] * dy + matrix[0, 1] * dx + matrix[0, 2] + cy).astype(jnp.int32)
    sx = jnp.round(matrix[1, 0] * dy + matrix[1, 1] * dx + matrix[1, 2] + cx).astype(jnp.int32)
    inside = (sy >= 0) & (sy < height) & (sx >= 0) & (sx < width)
    sampled = image[jnp.clip(sy, 0, height - 1), jnp.clip(sx, 0, width - 1)]
    return jnp.where(inside[..., None], sampled, 0.0)


def _rotate(image, m):
    """Counter-clockwise as displayed (row 0 on top) by (2 m - 1) * 30 degrees."""
    angle = jnp.deg2rad(_signed(m, "rotate"))
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    return _warp(image, jnp.array([[cos, sin, 0.0], [-sin, cos, 0.0]]))


def _shear_x(image, m):
    """Output (y, x) takes input x + s (y - cy), s = (2 m - 1) * 0.3 (PIL's ShearX sign)."""
    return _warp(image, jnp.array([[1.0, 0.0, 0.0], [_signed(m, "shear"), 1.0, 0.0]]))


def _shear_y(image, m):
    """Output (y, x) takes input y + s (x - cx), s = (2 m - 1) * 0.3."""
    return _warp(image, jnp.array([[1.0, _signed(m, "shear"), 0.0], [0.0, 1.0, 0.0]]))


def _translate_x(image, m):
    """Content moves right by k = round((2 m - 1) * 0.3 * W) pixels (left if k < 0)."""
    shift = jnp.round(_signed(m, "translate") * image.shape[1])
    return _warp(image, jnp.array([[1.0, 0.0, 0.0], [0.0, 1.0, -shift]]))


def _translate_y(image, m):
    """Content moves down by k = round((2 m - 1) * 0.3 * H) pixels (up if k < 0)."""
    shift = jnp.round(_signed(m, "translate") * image.shape[0])
    return _warp(image, jnp.array([[1.0, 0.0, -shift], [0.0, 1.0, 0.0]]))


def _brightness(image, m):
    """x * f, f = 1 + (2 m - 1) * 0.9."""
    return image * (1.0 + _signed(m, "enhance"))


def _contrast(image, m):
    """mean + f (x - mean), f as brightness, mean: the grey image's mean over all pixels."""
    grey = image[..., 0] if image.shape[-1] == 1 else (image * jnp.asarray(GREY)).sum(-1)
    mean = grey.mean()  # elementwise, not a matmul: no backend lowers its precision
    return mean + (1.0 + _signed(m, "enhance")) * (image - mean)


def _solarize(image, m):
    """Pixels x >= t = round(256 (1 - m)) become 255 - x (m = 0: none, the identity)."""
    return jnp.where(image >= jnp.round(256.0 * (1.0 - m)), 255.0 - image, image)


def _posterize(image, m):
    """Keeps the high bits = clip(8 - floor(4 m), 4, 8) bits of each pixel."""
    dropped = 8 - jnp.clip(8 - jnp.floor(MAGNITUDES["posterize"] * m), 4, 8).astype(jnp.int32)
    return (image.astype(jnp.int32) & ((0xFF << dropped) & 0xFF)).astype(jnp.float32)


_OP_FUNCTIONS = {
    "identity": lambda image, m: image,
    "rotate": _rotate,
    "shear_x": _shear_x,
    "shear_y": _shear_y,
    "translate_x": _translate_x,
    "translate_y": _translate_y,
    "brightness": _brightness,
    "contrast": _contrast,
    "solarize": _solarize,
    "posterize": _posterize,
}
OPS = tuple(_OP_FUNCTIONS)  # op index -> name, the order `apply_op` and `augment.sample_ops` use


def apply_op(
    image: jax.Array, op_index: int | jax.Array, magnitude: float | jax.Array
) -> jax.Array:
    """Op `OPS[op_index]` at `magnitude` in [0, 1] on image (H, W, C) uint8 -> uint8.

    Computes in float32, then rounds (half to even) and clips to [0, 255]; geometric ops fill
    with 0. The op docstrings above give each parameter; `MAGNITUDES` holds the constants.
    """
    m = jnp.asarray(magnitude, jnp.float32)
    out = lax.switch(op_index, tuple(_OP_FUNCTIONS.values()), image.astype(jnp.float32), m)
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
