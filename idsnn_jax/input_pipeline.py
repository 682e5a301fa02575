"""Batch order, evaluation batches and device-side augmentation.

The datasets come from `idsnn_jax.datasets` as a `Split` of host NumPy arrays. Training batches
never cross the host: the whole uint8 training split lives on the devices (CIFAR train: 150
MB), `epoch_indices` draws each epoch's order there from `(seed, epoch)` (resuming at an
epoch replays it), and the train loop gathers each batch inside the jitted step.
Augmentation (zero-pad, random crop, flip) and normalization run there too, per example,
from a JAX key. Evaluation batches are padded on the host (`eval_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from idsnn_jax.datasets import DatasetInfo, Split

# --- Batch order and layout -----------------------------------------------------------------


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


def epoch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    steps_multiple: int = 1,
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """The example indices of one epoch's full global batches: int32 (steps, B), on device.

    A permutation drawn on the device from `(seed, epoch)` (threefry: the same on every
    backend and device count), so a resumed epoch is identical and no index crosses the host.
    The last partial global batch is dropped; rows of zeros pad the steps to a multiple of
    `steps_multiple` (for loops of that many steps; `num_train_steps` counts the real ones).
    `sharding` places the result (e.g. each device's slice of every batch: `P(None, 'batch')`).
    """
    steps = num_train_steps(num_examples, global_batch_size)
    if steps < 1:
        raise ValueError(f"global_batch_size={global_batch_size} > {num_examples} examples.")

    def draw():
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        order = jax.random.permutation(key, num_examples)
        order = order[: steps * global_batch_size].astype(jnp.int32)
        order = order.reshape(steps, global_batch_size)
        return jnp.pad(order, ((0, -steps % steps_multiple), (0, 0)))

    return jax.jit(draw, out_shardings=sharding)()


def eval_batches(
    split: Split, *, global_batch_size: int, process_index: int = 0, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields every example once, in order, as full batches with 'mask' float32 (B,).

    The last global batch is zero-padded; 'mask' is 1 for real examples and 0 for padding.
    Process p gets its contiguous slice of each global batch.
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
