"""Batching of host arrays and device-side augmentation.

The datasets come from `idsnn_jax.datasets` as a `Split` of host NumPy arrays. A whole split
fits in host memory (CIFAR train: 150 MB of uint8), so batching is plain NumPy indexing with a
per-epoch permutation from ``(seed, epoch)``: resuming at an epoch replays the same order.
Augmentation (zero-pad, random crop, flip) and normalization run inside the jitted step, per
example, from a JAX key.
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from idsnn_jax.datasets import DatasetInfo, Split

# --- Batching on the host -------------------------------------------------------------------------


def num_train_steps(num_examples: int, global_batch_size: int) -> int:
    """Training steps per epoch: full global batches only (the remainder is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be >= 1.")
    return num_examples // global_batch_size


def _local_batch_size(global_batch_size: int, process_index: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    return global_batch_size // process_count


def train_batches(
    split: Split,
    *,
    global_batch_size: int,
    seed: int,
    epoch: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """Yields one epoch of shuffled full batches: 'image' uint8 (B, H, W, C), 'label' int32 (B,).

    The order is a permutation drawn from `(seed, epoch)`, so a resumed epoch is identical. B is
    `global_batch_size // process_count`; this process gets its contiguous slice of each global
    batch. The last partial global batch is dropped.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    if global_batch_size > len(split):
        raise ValueError(f"global_batch_size={global_batch_size} > {len(split)} examples.")
    order = np.random.default_rng((seed, epoch)).permutation(len(split))
    for step in range(num_train_steps(len(split), global_batch_size)):
        start = step * global_batch_size + process_index * local
        idx = order[start : start + local]
        yield {"image": split.images[idx], "label": split.labels[idx]}


def eval_batches(
    split: Split, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example once, in order, as full batches with 'mask' float32 (B,).

    The last global batch is zero-padded; 'mask' is 1 for real examples and 0 for padding.
    Keys and process slicing as in `train_batches`.
    """
    local = _local_batch_size(global_batch_size, process_index, process_count)
    n = len(split)
    for start in range(0, n, global_batch_size):
        idx = start + process_index * local + np.arange(local)
        real = idx < n
        image = np.zeros((local, *split.images.shape[1:]), np.uint8)
        label = np.zeros((local,), np.int32)
        image[real] = split.images[idx[real]]
        label[real] = split.labels[idx[real]]
        yield {"image": image, "label": label, "mask": real.astype(np.float32)}


# --- On the device, inside the jitted step --------------------------------------------------------


def _augment_params(
    rng: jax.Array, batch_size: int, crop_padding: int, flip: bool, example_offset=0
):
    """Per-example crop offsets int32 (B, 2) in [0, 2 * crop_padding] and flips bool (B,).

    Example i draws from `fold_in(rng, example_offset + i)` alone, so a global batch split
    over devices (each passing its offset) is augmented exactly as it is on one device.
    """

    def one(index):
        crop_rng, flip_rng = jax.random.split(jax.random.fold_in(rng, index))
        offset = jax.random.randint(crop_rng, (2,), 0, 2 * crop_padding + 1)
        return offset, jax.random.bernoulli(flip_rng, 0.5 if flip else 0.0)

    return jax.vmap(one)(example_offset + jnp.arange(batch_size))


def augment(
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
    `example_offset` is the index of `images[0]` in the global batch (see `_augment_params`).
    """
    batch, height, width, channels = images.shape
    offsets, flips = _augment_params(rng, batch, crop_padding, flip, example_offset)
    pad = ((crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0))

    def one(image, offset, flip_it):
        padded = jnp.pad(image, pad)
        crop = lax.dynamic_slice(padded, (offset[0], offset[1], 0), (height, width, channels))
        return jnp.where(flip_it, crop[:, ::-1], crop)

    return jax.vmap(one)(images, offsets, flips)


def normalize(images: jax.Array, info: DatasetInfo, dtype=jnp.float32) -> jax.Array:
    """(images / 255 - mean) / std per channel; (B, H, W, C) pixels in [0, 255] -> `dtype`."""
    if images.shape[-1] != len(info.mean):
        raise ValueError(f"{info.name} has {len(info.mean)} channels, images {images.shape}.")
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)


def preprocess(
    rng: jax.Array,
    images: jax.Array,
    info: DatasetInfo,
    *,
    train: bool,
    crop_padding: int = 4,
    flip: bool = True,
    example_offset: int | jax.Array = 0,
    dtype=jnp.float32,
) -> jax.Array:
    """Train: `augment` then `normalize`; eval: `normalize` only (`rng` unused). (B,H,W,C)."""
    if train:
        images = augment(
            rng, images, crop_padding=crop_padding, flip=flip, example_offset=example_offset
        )
    return normalize(images, info, dtype)
