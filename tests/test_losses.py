"""Tests of idsnn_jax.losses against NumPy (float64) references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idsnn_jax.losses import (
    LossOptions,
    cross_entropy,
    idsnn_loss,
    kd_loss,
    objective,
    teacher_logits,
)


def np_log_softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    m = z.max(axis=-1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=-1, keepdims=True))


def np_ce(z, y, w=None):
    nll = -np.array([np_log_softmax(z[i])[y[i]] for i in range(len(y))])
    if w is None:
        return nll.mean()
    w = np.asarray(w, np.float64)
    return (nll * w).sum() / w.sum()


def np_kd(zs, zt, tau):
    """tau^2 * mean_b sum_k p_t log(p_t / p_s), softened by tau."""
    total = 0.0
    for b in range(zs.shape[0]):
        lt = np_log_softmax(zt[b] / tau)
        ls = np_log_softmax(zs[b] / tau)
        pt = np.exp(lt)
        total += sum(pt[k] * (lt[k] - ls[k]) for k in range(zs.shape[1]))
    return tau**2 * total / zs.shape[0]


def _data(b=5, k=7, seed=0, scale=3.0):
    rng = np.random.default_rng(seed)
    zs = (rng.normal(size=(b, k)) * scale).astype(np.float32)
    zt = (rng.normal(size=(b, k)) * scale).astype(np.float32)
    y = rng.integers(0, k, size=(b,)).astype(np.int32)
    return zs, zt, y


def test_cross_entropy_matches_numpy():
    zs, _, y = _data()
    got = cross_entropy(jnp.asarray(zs), jnp.asarray(y))
    assert got.shape == ()
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np_ce(zs, y), rtol=1e-6)


def test_cross_entropy_hand_computed():
    # Uniform logits over K classes: CE = log K exactly.
    z = jnp.zeros((3, 10))
    np.testing.assert_allclose(float(cross_entropy(z, jnp.array([0, 4, 9]))), np.log(10), 1e-6)
    # Two classes, logits (0, log 3): p = (1/4, 3/4); label 0 -> log 4, label 1 -> log(4/3).
    z = jnp.array([[0.0, np.log(3.0)], [0.0, np.log(3.0)]], jnp.float32)
    np.testing.assert_allclose(
        float(cross_entropy(z, jnp.array([0, 1]))), 0.5 * (np.log(4) + np.log(4 / 3)), 1e-6
    )


def test_cross_entropy_weights_are_a_weighted_mean():
    zs, _, y = _data(b=6)
    for w in (
        np.array([1, 1, 0, 1, 0, 0], np.float32),  # padding mask
        np.array([0.5, 2.0, 1.0, 0.0, 3.0, 0.25], np.float32),
        np.array([0.1, 0.05, 0.0, 0.2, 0.1, 0.05], np.float32),  # sums to < 1
    ):
        got = cross_entropy(jnp.asarray(zs), jnp.asarray(y), jnp.asarray(w))
        np.testing.assert_allclose(float(got), np_ce(zs, y, w), rtol=1e-6)
    # A mask keeping rows i is the plain mean over those rows.
    keep = np.array([0, 3])
    mask = np.zeros(6, np.float32)
    mask[keep] = 1
    np.testing.assert_allclose(
        float(cross_entropy(jnp.asarray(zs), jnp.asarray(y), jnp.asarray(mask))),
        float(cross_entropy(jnp.asarray(zs[keep]), jnp.asarray(y[keep]))),
        rtol=1e-6,
    )
    # All weights zero: finite (0), not NaN.
    got = cross_entropy(jnp.asarray(zs), jnp.asarray(y), jnp.zeros(6))
    assert float(got) == 0.0


@pytest.mark.parametrize("tau", [1.0, 4.0, 0.5])
def test_kd_loss_matches_numpy(tau):
    zs, zt, _ = _data(seed=1)
    got = kd_loss(jnp.asarray(zs), jnp.asarray(zt), tau=tau)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(float(got), np_kd(zs, zt, tau), rtol=1e-5)
    assert float(got) > 0


def test_kd_loss_tau_squared_scale():
    # Logits proportional to tau make the softened distributions independent of tau,
    # so the loss scales exactly as tau^2.
    zs, zt, _ = _data(seed=2, scale=1.0)
    base = float(kd_loss(jnp.asarray(zs), jnp.asarray(zt), tau=1.0))
    for tau in (2.0, 4.0):
        got = float(kd_loss(jnp.asarray(zs * tau), jnp.asarray(zt * tau), tau=tau))
        np.testing.assert_allclose(got, tau**2 * base, rtol=1e-5)


def test_kd_loss_zero_for_identical_logits():
    zs, _, _ = _data(seed=3)
    got = float(kd_loss(jnp.asarray(zs), jnp.asarray(zs), tau=4.0))
    assert abs(got) < 1e-6
    # Shift invariance: logits + per-row constant give the same distribution.
    shifted = zs + np.arange(zs.shape[0], dtype=np.float32)[:, None] * 10
    assert abs(float(kd_loss(jnp.asarray(zs), jnp.asarray(shifted)))) < 1e-5


@pytest.mark.parametrize("alpha,tau", [(0.3, 4.0), (1.0, 2.0), (0.0, 4.0)])
def test_idsnn_loss_matches_numpy(alpha, tau):
    zs, zt, y = _data(seed=4)
    got = idsnn_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y), alpha=alpha, tau=tau)
    ref = np_ce(zs, y) + alpha * np_kd(zs, zt, tau)
    np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_idsnn_loss_defaults_are_reference():
    zs, zt, y = _data(seed=5)
    got = idsnn_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y))
    np.testing.assert_allclose(float(got), np_ce(zs, y) + 0.3 * np_kd(zs, zt, 4.0), rtol=1e-5)


def test_gradient_wrt_teacher_is_exactly_zero():
    zs, zt, y = _data(seed=6)
    g_kd = jax.grad(kd_loss, argnums=1)(jnp.asarray(zs), jnp.asarray(zt))
    g_id = jax.grad(idsnn_loss, argnums=1)(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y))
    np.testing.assert_array_equal(np.asarray(g_kd), 0.0)
    np.testing.assert_array_equal(np.asarray(g_id), 0.0)


def test_gradient_wrt_student_matches_finite_differences():
    zs, zt, y = _data(b=3, k=5, seed=7)
    zs64, zt64 = zs.astype(np.float64), zt.astype(np.float64)

    def ref(z):
        return np_ce(z, y) + 0.3 * np_kd(z, zt64, 4.0)

    g = np.asarray(jax.grad(idsnn_loss)(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y)))
    fd = np.zeros_like(zs64)
    h = 1e-5
    for idx in np.ndindex(zs.shape):
        e = np.zeros_like(zs64)
        e[idx] = h
        fd[idx] = (ref(zs64 + e) - ref(zs64 - e)) / (2 * h)
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-6)
    # Analytic check as well: d CE / dz = (softmax(z) - onehot) / B and
    # d KD / dz = tau * (softmax(z/tau) - softmax(zt/tau)) / B.
    p = np.exp(np_log_softmax(zs64))
    onehot = np.eye(zs.shape[1])[y]
    ps = np.exp(np_log_softmax(zs64 / 4))
    pt = np.exp(np_log_softmax(zt64 / 4))
    analytic = (p - onehot) / 3 + 0.3 * 4 * (ps - pt) / 3
    np.testing.assert_allclose(g, analytic, rtol=1e-5, atol=1e-7)


def test_label_shape_mismatch_raises():
    zs, zt, y = _data()
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(jnp.asarray(zs), jnp.asarray(y[:-1]))
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(jnp.asarray(zs), jnp.asarray(y)[:, None])
    with pytest.raises(ValueError, match="labels"):
        idsnn_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y[:2]))


def test_non_integer_labels_raise():
    zs, zt, y = _data()
    with pytest.raises(ValueError, match="labels"):
        cross_entropy(jnp.asarray(zs), jnp.asarray(y, jnp.float32))
    # One-hot labels (float, wrong shape) are rejected too.
    onehot = np.eye(zs.shape[1], dtype=np.float32)[y]
    with pytest.raises(ValueError, match="labels"):
        idsnn_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(onehot))


def test_kd_bad_args_raise():
    zs, zt, _ = _data()
    with pytest.raises(ValueError):
        kd_loss(jnp.asarray(zs), jnp.asarray(zt[:, :-1]))
    with pytest.raises(ValueError, match="tau"):
        kd_loss(jnp.asarray(zs), jnp.asarray(zt), tau=0.0)


def test_extreme_logits_are_finite():
    zs, zt, y = _data(seed=8, scale=1.0)
    zs, zt = zs * 1e4, zt * 1e4
    ce = cross_entropy(jnp.asarray(zs), jnp.asarray(y))
    kd = kd_loss(jnp.asarray(zs), jnp.asarray(zt))
    tot = idsnn_loss(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y))
    for v in (ce, kd, tot):
        assert np.isfinite(float(v))
    np.testing.assert_allclose(float(ce), np_ce(zs, y), rtol=1e-5)
    np.testing.assert_allclose(float(kd), np_kd(zs, zt, 4.0), rtol=1e-4)
    g = jax.grad(idsnn_loss)(jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y))
    assert np.all(np.isfinite(np.asarray(g)))


def test_bfloat16_logits_give_float32_loss():
    zs, zt, y = _data(seed=9)
    zs_b, zt_b = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
    ce = cross_entropy(zs_b, jnp.asarray(y))
    kd = kd_loss(zs_b, zt_b)
    tot = jax.jit(idsnn_loss)(zs_b, zt_b, jnp.asarray(y))
    for v in (ce, kd, tot):
        assert v.dtype == jnp.float32
    # Computed in f32 from the bf16-rounded logits.
    zs_r = np.asarray(zs_b.astype(jnp.float32))
    zt_r = np.asarray(zt_b.astype(jnp.float32))
    np.testing.assert_allclose(float(tot), np_ce(zs_r, y) + 0.3 * np_kd(zs_r, zt_r, 4.0), 1e-5)
    g = jax.grad(idsnn_loss)(zs_b, zt_b, jnp.asarray(y))
    assert g.dtype == jnp.bfloat16


def np_smoothed_ce(z, y, eps):
    """-sum_k q_k log p_k with q = (1 - eps) one_hot(y) + eps / K (PyTorch's label_smoothing)."""
    k = z.shape[-1]
    total = 0.0
    for b in range(len(y)):
        q = np.full(k, eps / k)
        q[y[b]] += 1 - eps
        total -= np.sum(q * np_log_softmax(z[b]))
    return total / len(y)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_label_smoothing_matches_the_pytorch_formula(eps):
    zs, _, y = _data(seed=4)
    got = cross_entropy(jnp.asarray(zs), jnp.asarray(y), label_smoothing=eps)
    np.testing.assert_allclose(float(got), np_smoothed_ce(zs, y, eps), rtol=1e-6)


def _steps(t=3, b=5, k=7, seed=5):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=(t, b, k)) * 2).astype(np.float32), rng.integers(0, k, b).astype(
        np.int32
    )


@pytest.mark.parametrize("w, eps", [(1.0, 0.0), (0.25, 0.0), (0.5, 0.1)])
def test_tet_blend_matches_numpy(w, eps):
    """(1 - w) CE(mean_t z_t) + w mean_t CE(z_t), every CE smoothed by eps, no teacher."""
    z, y = _steps()
    expected = (1 - w) * np_smoothed_ce(z.mean(0), y, eps) + w * np.mean(
        [np_smoothed_ce(z[t], y, eps) for t in range(len(z))]
    )
    options = LossOptions(tet_weight=w, label_smoothing=eps)
    got = objective(jnp.asarray(z), jnp.asarray(y), options)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


@pytest.mark.parametrize("per_step", [False, True])
def test_objective_distillation_matches_numpy(per_step):
    """KD of the time mean, or the mean over t of KD of each step's logits, against the teacher."""
    z, y = _steps(seed=6)
    teacher = np.random.default_rng(7).normal(size=z.shape[1:]).astype(np.float32) * 3
    kd = (
        np.mean([np_kd(z[t], teacher, 2.0) for t in range(len(z))])
        if per_step
        else np_kd(z.mean(0), teacher, 2.0)
    )
    options = LossOptions(kd_alpha=0.7, kd_tau=2.0, kd_per_step=per_step)
    got = objective(jnp.asarray(z), jnp.asarray(y), options, jnp.asarray(teacher))
    np.testing.assert_allclose(float(got), np_ce(z.mean(0), y) + 0.7 * kd, rtol=1e-5)


def test_objective_defaults_are_the_reference_losses_exactly():
    zs, zt, y = _data(seed=8)
    zs, zt, y = jnp.asarray(zs), jnp.asarray(zt), jnp.asarray(y)
    assert float(objective(zs, y, LossOptions())) == float(cross_entropy(zs, y))
    assert float(objective(zs, y, LossOptions(), zt)) == float(idsnn_loss(zs, zt, y))


def test_objective_needs_per_step_logits_for_tet():
    zs, _, y = _data()
    with pytest.raises(ValueError, match="per-step logits"):
        objective(jnp.asarray(zs), jnp.asarray(y), LossOptions(tet_weight=1.0))


@pytest.mark.parametrize(
    "field, value",
    [
        ("kd_alpha", -0.1),
        ("kd_tau", 0.0),
        ("label_smoothing", 1.0),
        ("tet_weight", 1.5),
        ("kd_per_step", 1),
    ],
)
def test_loss_options_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}="):
        LossOptions(**{field: value})


def test_teacher_logits_is_the_eval_forward_without_gradient():
    """The KD target: the teacher's eval-mode logits (running BN statistics), constant for
    the gradient; no teacher, no target."""
    from idsnn_jax.models import create_model

    teacher = create_model("resnet18", num_classes=3, width=0.0625)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    variables = teacher.init(jax.random.key(0), x)
    got = teacher_logits(teacher, variables, x)
    np.testing.assert_array_equal(got, teacher.apply(variables, x, train=False))
    grads = jax.grad(lambda v: jnp.sum(teacher_logits(teacher, v, x) ** 2))(variables)
    assert all(not np.any(g) for g in jax.tree.leaves(grads))
    assert teacher_logits(None, variables, x) is None
