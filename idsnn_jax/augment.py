"""Training augmentation, per example, on the device inside the jitted train step.

`preprocess` applies `AugmentOptions` in order: the recipe's zero-pad, random crop and flip
(`crop_and_flip`), optionally one TrivialAugment-style op (`auto_augment`, ops in
`augment_ops`) on the raw uint8 images, normalization, then optionally Cutout (DeVries &
Taylor 2017; on normalized images, so the hole is the dataset mean).

One keying rule for all of them: example i of a device's local batch draws from
`fold_in(rng, example_offset + i)` alone (`_example_keys`), `example_offset` being its first
example's index in the global batch, so a global batch split over devices is augmented
exactly as on one device. Each augmentation folds the same indices into its key, so each
has its own `rng` (`_STREAMS`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from idsnn_jax import augment_ops, input_pipeline
from idsnn_jax.checks import check_fields, is_int
from idsnn_jax.datasets import DatasetInfo

# Streams of the per-step key beside the crop/flip draws, which fold in the example index
# itself: each option draws from `fold_in(fold_in(rng, stream), example)`, so turning one on
# changes no other draw (and the reference's crops and flips stay as they were).
_STREAMS = {"auto_augment": 2**31 - 1, "cutout": 2**31 - 2}


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


# --- TrivialAugment-style policy (the ops: `augment_ops`) ------------------------------------


def sample_ops(
    rng: jax.Array, batch_size: int, example_offset: int | jax.Array = 0
) -> tuple[jax.Array, jax.Array]:
    """Per-example op indices int32 (B,), uniform over `augment_ops.OPS`, and magnitudes
    float32 (B,), uniform in [0, 1)."""

    def one(key):
        op_key, magnitude_key = jax.random.split(key)
        op = jax.random.randint(op_key, (), 0, len(augment_ops.OPS))
        return op, jax.random.uniform(magnitude_key)

    return jax.vmap(one)(_example_keys(rng, batch_size, example_offset))


def auto_augment(
    rng: jax.Array, images: jax.Array, *, example_offset: int | jax.Array = 0
) -> jax.Array:
    """One op per example of images (B, H, W, C) uint8, drawn by `sample_ops` and applied by
    `apply_op`. Returns uint8 (B, H, W, C)."""
    if images.dtype != jnp.uint8:
        raise ValueError(f"auto_augment takes raw uint8 images, got {images.dtype}.")
    ops, magnitudes = sample_ops(rng, images.shape[0], example_offset)
    return jax.vmap(augment_ops.apply_op)(images, ops, magnitudes)


# --- Crop and flip (the reference recipe) ----------------------------------------------------


def crop_flip_params(
    rng: jax.Array, batch_size: int, crop_padding: int, flip: bool, example_offset=0
):
    """Per-example crop offsets int32 (B, 2) in [0, 2 * crop_padding] and flips bool (B,).

    Example i draws from `fold_in(rng, example_offset + i)` alone, so a global batch split
    over devices (each passing its offset) is augmented exactly as it is on one device.
    """

    def one(key):
        crop_rng, flip_rng = jax.random.split(key)
        offset = jax.random.randint(crop_rng, (2,), 0, 2 * crop_padding + 1)
        return offset, jax.random.bernoulli(flip_rng, 0.5 if flip else 0.0)

    return jax.vmap(one)(_example_keys(rng, batch_size, example_offset))


def crop_and_flip(
    rng: jax.Array,
    images: jax.Array,
    *,
    crop_padding: int = 4,
    flip: bool = True,
    example_offset: int | jax.Array = 0,
) -> jax.Array:
    """Random crop of the zero-padded image and random horizontal flip, per example.

    images: (B, H, W, C), uint8 or float, raw pixels (pad before normalizing, as torchvision's
    RandomCrop does). Returns the same shape and dtype. Offsets are uniform in
    [0, 2 * crop_padding] on each axis; each image is flipped with probability 0.5 if `flip`.
    `example_offset` is the index of `images[0]` in the global batch (see `crop_flip_params`).
    """
    batch, height, width, channels = images.shape
    offsets, flips = crop_flip_params(rng, batch, crop_padding, flip, example_offset)
    pad = ((crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0))

    def one(image, offset, flip_it):
        padded = jnp.pad(image, pad)
        crop = lax.dynamic_slice(padded, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip_it, crop[:, ::-1], crop)

    return jax.vmap(one)(images, offsets, flips)


@dataclasses.dataclass(frozen=True)
class AugmentOptions:
    """Training augmentation, per example, in this order: random crop of the image zero-padded
    by `crop_padding` pixels and horizontal flip (the reference), then, if `auto_augment`, one
    op of `augment_ops.OPS` at a random magnitude, then normalization, then, if `cutout` > 0, a
    `cutout` x `cutout` square set to 0 (the dataset mean). Invalid values raise ValueError
    naming the field."""

    crop_padding: int = 4
    flip: bool = True
    cutout: int = 0
    auto_augment: bool = False

    def __post_init__(self) -> None:
        checks = (
            (
                "crop_padding",
                is_int(self.crop_padding) and self.crop_padding >= 0,
                "an integer >= 0",
            ),
            ("flip", isinstance(self.flip, bool), "a bool"),
            (
                "cutout",
                is_int(self.cutout) and self.cutout >= 0,
                "an integer >= 0 (pixels; 0: off)",
            ),
            ("auto_augment", isinstance(self.auto_augment, bool), "a bool"),
        )
        check_fields(self, checks)


def preprocess(
    rng: jax.Array,
    images: jax.Array,
    info: DatasetInfo,
    *,
    train: bool,
    options: AugmentOptions = AugmentOptions(),
    example_offset: int | jax.Array = 0,
    dtype=jnp.float32,
) -> jax.Array:
    """Train: `options`' augmentation and `normalize`; eval: `normalize` only (`rng` unused).
    (B, H, W, C) pixels -> `dtype`; `example_offset` as in `crop_and_flip`."""
    if not train:
        return input_pipeline.normalize(images, info, dtype)
    stream = lambda name: jax.random.fold_in(rng, _STREAMS[name])
    images = crop_and_flip(
        rng,
        images,
        crop_padding=options.crop_padding,
        flip=options.flip,
        example_offset=example_offset,
    )
    if options.auto_augment:
        images = auto_augment(stream("auto_augment"), images, example_offset=example_offset)
    images = input_pipeline.normalize(images, info, dtype)
    if options.cutout:
        images = cutout(
            stream("cutout"), images, size=options.cutout, example_offset=example_offset
        )
    return images
