"""Losses of IDSNN: cross-entropy and the softened KL distillation term.

`idsnn_loss = CE(z_s, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))`,
batch means throughout (PyTorch's `KLDivLoss(reduction="batchmean")`). The teacher's
logits are wrapped in `stop_gradient`, so the frozen teacher never receives a gradient.
All losses are computed in float32 whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _check_labels(logits: jax.Array, labels: jax.Array) -> None:
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels must have shape logits.shape[:-1] = {logits.shape[:-1]} (integer class ids), "
            f"got labels.shape = {labels.shape}"
        )
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}")


def _weighted_mean(values: jax.Array, weights: jax.Array | None) -> jax.Array:
    if weights is None:
        return jnp.mean(values)
    weights = weights.astype(jnp.float32)
    total = jnp.sum(weights)
    # Guard only the all-zero case (e.g. a fully padded batch): a fractional total is valid.
    return jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0)


def cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy of `logits (B, K)` against integer `labels (B,)`.

    `weights (B,)`, if given, make it a weighted mean (e.g. a padding mask in evaluation).
    """
    _check_labels(logits, labels)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return _weighted_mean(nll, weights)


def kd_loss(student_logits: jax.Array, teacher_logits: jax.Array, tau: float = 4.0) -> jax.Array:
    """`tau^2 * KL(softmax(t / tau) || softmax(s / tau))`, mean over the batch.

    `tau^2` keeps the gradient scale independent of the temperature (Hinton et al.).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {student_logits.shape} and teacher_logits {teacher_logits.shape} "
            "must have the same shape"
        )
    if not tau > 0:
        raise ValueError(f"tau={tau!r} must be > 0")
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    log_p_t = jax.nn.log_softmax(teacher / tau, axis=-1)
    log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / tau, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1)
    return tau**2 * jnp.mean(kl)


def idsnn_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array,
    alpha: float = 0.3,
    tau: float = 4.0,
) -> jax.Array:
    """IDSNN objective: `cross_entropy + alpha * kd_loss` (reference alpha 0.3, tau 4)."""
    return cross_entropy(student_logits, labels) + alpha * kd_loss(
        student_logits, teacher_logits, tau
    )
