"""Losses of IDSNN: cross-entropy and the softened KL distillation term.

`idsnn_loss = CE(z_s, y) + alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))`,
batch means throughout (PyTorch's `KLDivLoss(reduction="batchmean")`). The teacher's
logits are wrapped in `stop_gradient`, so the frozen teacher never receives a gradient.
All losses are computed in at least float32 (`precision.wide`).

Beyond the reference (each off by default, `LossOptions`): label smoothing, the TET loss
(cross-entropy of every time step's logits, Deng et al. 2022, blended with the mean-logit
loss) and per-time-step distillation; `objective` composes them for a train step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from idsnn_jax.checks import check_fields
from idsnn_jax.precision import wide


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
    weights = weights.astype(values.dtype)
    total = jnp.sum(weights)
    # Guard only the all-zero case (e.g. a fully padded batch): a fractional total is valid.
    return jnp.sum(values * weights) / jnp.where(total > 0, total, 1.0)


def cross_entropy(
    logits: jax.Array,
    labels: jax.Array,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Mean softmax cross-entropy of `logits (B, K)` against integer `labels (B,)`.

    `weights (B,)`, if given, make it a weighted mean (e.g. a padding mask in evaluation).
    `label_smoothing` eps: the target is `(1 - eps) * one_hot + eps / K` (PyTorch's
    `CrossEntropyLoss(label_smoothing=eps)`).
    """
    _check_labels(logits, labels)
    log_p = jax.nn.log_softmax(wide(logits), axis=-1)
    nll = -jnp.take_along_axis(log_p, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    if label_smoothing:
        nll = (1 - label_smoothing) * nll - label_smoothing * jnp.mean(log_p, axis=-1)
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
    teacher = jax.lax.stop_gradient(wide(teacher_logits))
    log_p_t = jax.nn.log_softmax(teacher / tau, axis=-1)
    log_p_s = jax.nn.log_softmax(wide(student_logits) / tau, axis=-1)
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


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """What a train step minimizes. The defaults are the reference: CE of the time-mean
    logits, plus `kd_alpha * kd_loss` of them against a teacher when there is one.

    `label_smoothing` in [0, 1) applies to every CE term. `tet_weight` w in [0, 1]: the CE term
    is `(1 - w) * CE(mean_t z_t) + w * mean_t CE(z_t)` (w = 1: TET). `kd_per_step`: the KD
    term is `mean_t kd_loss(z_t, teacher)` instead of that of the mean. Invalid values raise
    ValueError naming the field.
    """

    kd_alpha: float = 0.3
    kd_tau: float = 4.0
    label_smoothing: float = 0.0
    tet_weight: float = 0.0
    kd_per_step: bool = False

    def __post_init__(self) -> None:
        checks = (
            ("kd_alpha", self.kd_alpha >= 0, ">= 0"),
            ("kd_tau", self.kd_tau > 0, "> 0"),
            ("label_smoothing", 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("tet_weight", 0 <= self.tet_weight <= 1, "in [0, 1]"),
            ("kd_per_step", isinstance(self.kd_per_step, bool), "a bool"),
        )
        check_fields(self, checks)

    @property
    def per_step(self) -> bool:
        """Whether the loss needs every time step's logits, not only their mean."""
        return self.tet_weight > 0 or self.kd_per_step


def objective(
    logits: jax.Array,
    labels: jax.Array,
    options: LossOptions,
    teacher_logits: jax.Array | None = None,
) -> jax.Array:
    """The train loss of `options` for `logits`, `(B, K)` (the time mean) or `(T, B, K)` per
    time step (needed when `options.per_step`), against `teacher_logits (B, K)` if given.

    With the default options it is `cross_entropy`, or `idsnn_loss` with a teacher.
    """
    smooth = options.label_smoothing
    per_step = logits if logits.ndim == 3 else None
    if per_step is None and options.per_step:
        raise ValueError(f"{options} needs per-step logits (T, B, K), got {logits.shape}")
    mean = logits if per_step is None else jnp.mean(wide(logits), axis=0)
    loss = cross_entropy(mean, labels, label_smoothing=smooth)
    if options.tet_weight:
        each = jax.vmap(lambda z: cross_entropy(z, labels, label_smoothing=smooth))(per_step)
        loss = (1 - options.tet_weight) * loss + options.tet_weight * jnp.mean(each)
    if teacher_logits is None:
        return loss
    if options.kd_per_step:
        each = jax.vmap(lambda z: kd_loss(z, teacher_logits, options.kd_tau))(per_step)
        return loss + options.kd_alpha * jnp.mean(each)
    return loss + options.kd_alpha * kd_loss(mean, teacher_logits, options.kd_tau)


def teacher_logits(teacher: Any, variables: Any, images: jax.Array) -> jax.Array | None:
    """The KD target: `teacher` (a Flax module, or None: no distillation) in eval mode (its
    running BN statistics) on `images`, without gradient."""
    if teacher is None:
        return None
    return jax.lax.stop_gradient(teacher.apply(variables, images, train=False))
