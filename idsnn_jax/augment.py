"""Cutout and a TrivialAugment-style policy: training augmentations beyond crop and flip.

`input_pipeline.augment` gives the recipe's zero-pad, random crop and flip. This module adds
two stronger regularizers that run in the same place, on the device inside the jitted train
step, with the same keying: example i of a device's local batch draws from
`fold_in(rng, example_offset + i)` alone, `example_offset` being its first example's index in
the global batch, so a global batch split over devices is augmented exactly as on one device.
Each augmentation folds the same indices into its key, so give each its own `rng` (split one).

- `cutout` (DeVries & Taylor 2017) zeroes a square per example; call it on normalized images,
  so the hole is the dataset mean.
- `auto_augment` applies one op from `OPS`, drawn uniformly per example, at a magnitude drawn
  uniformly in [0, 1) (TrivialAugment, Müller & Hutter 2021), to raw uint8 images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _example_keys(rng: jax.Array, batch_size: int, example_offset: int | jax.Array) -> jax.Array:
    """Example i's key `fold_in(rng, example_offset + i)`, for i < batch_size: (B, key)."""
    indices = example_offset + jnp.arange(batch_size)
    return jax.vmap(lambda index: jax.random.fold_in(rng, index))(indices)


# --- Cutout -----------------------------------------------------------------------------------


def sample_centers(
    rng: jax.Array, batch_size: int, height: int, width: int, example_offset: int | jax.Array = 0
) -> jax.Array:
    """Per-example hole centers int32 (B, 2): (cy, cx) uniform over [0, H) x [0, W)."""
    limits = jnp.array([height, width])
    draw = lambda key: jax.random.randint(key, (2,), 0, limits)
    return jax.vmap(draw)(_example_keys(rng, batch_size, example_offset))


def apply_cutout(image: jax.Array, center: jax.Array, size: int) -> jax.Array:
    """Zeroes rows y1 <= y < y2 and columns x1 <= x < x2 of image (H, W, C), any dtype.

    The reference code's rule: y1 = clip(cy - size // 2, 0, H), y2 = clip(cy + size // 2, 0,
    H), the same for x. Away from the border an even `size` zeroes size**2 pixels, an odd one
    (size - 1)**2; the hole is cut off at the border.
    """
    height, width = image.shape[:2]
    y1, y2 = jnp.clip(center[0] + jnp.array([-(size // 2), size // 2]), 0, height)
    x1, x2 = jnp.clip(center[1] + jnp.array([-(size // 2), size // 2]), 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    hole = (rows >= y1) & (rows < y2) & (cols >= x1) & (cols < x2)
    return jnp.where(hole[..., None], jnp.zeros((), image.dtype), image)


def cutout(
    rng: jax.Array, images: jax.Array, *, size: int, example_offset: int | jax.Array = 0
) -> jax.Array:
    """Cutout: each example of images (B, H, W, C), any dtype, gets one `size` x `size` hole of
    zeros at a center from `sample_centers` (see `apply_cutout` for its exact extent). Returns
    the same shape and dtype; size 0 returns `images`."""
    if size < 0:
        raise ValueError(f"Cutout size={size} must be >= 0.")
    if size == 0:
        return images
    batch, height, width = images.shape[:3]
    centers = sample_centers(rng, batch, height, width, example_offset)
    return jax.vmap(lambda image, center: apply_cutout(image, center, size))(images, centers)


# --- TrivialAugment-style policy ----------------------------------------------------------------

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
OPS = tuple(_OP_FUNCTIONS)  # op index -> name, the order `apply_op` and `sample_ops` use


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


def sample_ops(
    rng: jax.Array, batch_size: int, example_offset: int | jax.Array = 0
) -> tuple[jax.Array, jax.Array]:
    """Per-example op indices int32 (B,), uniform over `OPS`, and magnitudes float32 (B,),
    uniform in [0, 1)."""

    def one(key):
        op_key, magnitude_key = jax.random.split(key)
        return jax.random.randint(op_key, (), 0, len(OPS)), jax.random.uniform(magnitude_key)

    return jax.vmap(one)(_example_keys(rng, batch_size, example_offset))


def auto_augment(
    rng: jax.Array, images: jax.Array, *, example_offset: int | jax.Array = 0
) -> jax.Array:
    """One op per example of images (B, H, W, C) uint8, drawn by `sample_ops` and applied by
    `apply_op`. Returns uint8 (B, H, W, C)."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"auto_augment takes raw uint8 images, got {images.dtype}.")
    ops, magnitudes = sample_ops(rng, images.shape[0], example_offset)
    return jax.vmap(apply_op)(images, ops, magnitudes)
