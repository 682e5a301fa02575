"""Batch order, evaluation batches and normalization.

The datasets come from `idsnn_jax.datasets` as a `Split` of host NumPy arrays, each process
holding its shards only (`train_rows`, `test_rows`). Training batches never cross the host:
a process's uint8 training shards live on its devices (all of CIFAR's, on one process),
`epoch_indices` draws each epoch's order there from `(seed, epoch)` (resuming at an epoch
replays it), and the train loop gathers each batch inside the jitted step, where it is
augmented (`idsnn_jax.augment`) and normalized (`normalize`).
Evaluation batches are padded on the host (`eval_batches`).
"""

from __future__ import annotations

from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from idsnn_jax.datasets import DatasetInfo, Split

# --- Batch order and layout -----------------------------------------------------------------


def num_train_steps(num_examples: int, global_batch_size: int) -> int:
    """Training steps per epoch: full global batches only (the remainder is dropped)."""
    if global_batch_size < 1:
        raise ValueError(f"global_batch_size={global_batch_size} must be >= 1.")
    return num_examples // global_batch_size


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size < 1 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}."
        )
    return global_batch_size // process_count


def train_rows(
    num_examples: int, *, num_shards: int, process_index: int, process_count: int
) -> slice:
    """The rows of a training split of `num_examples` that process p of P holds.

    The split is cut into `num_shards` (S, a multiple of P) contiguous shards of
    n = num_examples // S examples (the remainder is dropped); process p holds shards
    p*S/P .. (p+1)*S/P - 1, so one process with one shard holds the whole split.
    """
    held = num_examples // num_shards * (num_shards // process_count)
    return slice(process_index * held, (process_index + 1) * held)


def test_rows(num_examples: int, *, process_index: int, process_count: int) -> slice:
    """The rows of an evaluation split of `num_examples` that process p of P holds: its
    contiguous part of ceil(N / P) examples (the last parts shorter, or empty)."""
    part = -(-num_examples // process_count)
    return slice(process_index * part, min((process_index + 1) * part, num_examples))


def _check_shards(num_shards: int, global_batch_size: int, process_count: int) -> None:
    """ValueError unless the shards divide the global batch and split evenly over processes."""
    if num_shards < 1 or global_batch_size % num_shards or num_shards % process_count:
        raise ValueError(
            f"num_shards={num_shards} must be a multiple of process_count={process_count} "
            f"that divides global_batch_size={global_batch_size}."
        )


def epoch_indices(
    num_examples: int,
    global_batch_size: int,
    *,
    seed: int,
    epoch: int,
    num_shards: int = 1,
    process_count: int = 1,
    first_step: int = 0,
    steps_multiple: int = 1,
    sharding: jax.sharding.Sharding | None = None,
) -> jax.Array:
    """The example rows of one epoch's full global batches: int32 (steps, B), on device.

    The `num_examples` examples are `num_shards` (S) contiguous shards of n = N // S
    (`train_rows`). Shard s is permuted on the device with `fold_in(key, s)`, key =
    `fold_in(PRNGKey(seed), epoch)` (one shard: with key itself, the order of every run before
    shards existed); global batch i is, for s = 0 .. S-1 in turn, entries i*B/S .. (i+1)*B/S
    of shard s's permutation. Threefry draws the same on every backend and device count, so a
    resumed epoch is identical and no index crosses the host. Steps: n // (B/S); the rest of
    each shard is dropped.

    An entry is the example's row in the data of the process that holds its shard (process p
    of `process_count` holds shards p*S/P .. (p+1)*S/P - 1): its shard's place there times n,
    plus its place in the shard. Devices are ordered by process, so each process's slice of
    a global batch lies in its own shards. Only the steps from `first_step` on are returned
    (an epoch resumed midway), and rows of zeros pad them to a multiple of `steps_multiple`
    (for loops of that many steps; `num_train_steps` counts the real ones).
    `sharding` places the result (e.g. each device's slice of every batch: `P(None, 'batch')`).
    """
    _check_shards(num_shards, global_batch_size, process_count)
    size, per_shard = num_examples // num_shards, global_batch_size // num_shards
    steps = num_train_steps(size * num_shards, global_batch_size)
    if steps < 1:
        raise ValueError(f"global_batch_size={global_batch_size} > {size * num_shards} examples.")

    def draw():
        key = jax.random.fold_in(jax.random.PRNGKey(seed), epoch)
        shards = jnp.arange(num_shards)
        fold = jax.vmap(lambda s: jax.random.fold_in(key, s))
        keys = key[None] if num_shards == 1 else fold(shards)  # one shard: key, as before shards
        order = jax.vmap(lambda k: jax.random.permutation(k, size))(keys)  # (S, n)
        order = order[:, : steps * per_shard].reshape(num_shards, steps, per_shard)
        order += (shards % (num_shards // process_count) * size)[:, None, None]
        order = order.transpose(1, 0, 2).reshape(steps, global_batch_size).astype(jnp.int32)
        order = order[first_step:]
        return jnp.pad(order, ((0, -len(order) % steps_multiple), (0, 0)))

    return jax.jit(draw, out_shardings=sharding)()


def eval_batches(
    split: Split, *, global_batch_size: int, total: int | None = None, process_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's part of every global evaluation batch: B / P examples, in order,
    with 'mask' float32, 1 for real examples and 0 for the zero padding at the end.

    `split` is this process's part (`test_rows`) of a split of `total` examples (default:
    `split` is all of it). Every process yields ceil(ceil(total / P) / (B / P)) batches, so
    the processes' i-th batches together form global batch i and each example counts once.
    """
    local = _local_batch_size(global_batch_size, process_count)
    total = len(split) if total is None else total
    for start in range(0, -(-total // process_count), local):
        idx = start + np.arange(local)
        real = idx < len(split)
        image = np.zeros((local, *split.images.shape[1:]), np.uint8)
        label = np.zeros((local,), np.int32)
        image[real] = split.images[idx[real]]
        label[real] = split.labels[idx[real]]
        yield {"image": image, "label": label, "mask": real.astype(np.float32)}


# --- On the device: normalization (augmentation: `augment.preprocess`) -----------------------


def normalize(images: jax.Array, info: DatasetInfo, dtype=jnp.float32) -> jax.Array:
    """(images / 255 - mean) / std per channel; (B, H, W, C) pixels in [0, 255] -> `dtype`."""
    if images.shape[-1] != len(info.mean):
        raise ValueError(f"{info.name} has {len(info.mean)} channels, images {images.shape}.")
    mean = jnp.asarray(info.mean, jnp.float32)
    std = jnp.asarray(info.std, jnp.float32)
    return ((images.astype(jnp.float32) / 255.0 - mean) / std).astype(dtype)
