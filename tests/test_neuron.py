"""Tests of idsnn_jax.neuron against plain NumPy references of the LIF and surrogate equations."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from idsnn_jax import neuron
from idsnn_jax.neuron import SURROGATES, lif_scan, pack_bits, spike, unpack_bits

lif_scan_packed = functools.partial(lif_scan, packed=True)

# --------------------------------------------------------------------------------------
# Independent NumPy references: the LIF forward is shared (tests/references.py); the
# surrogates and the hand-written BPTT are this file's own.


def np_surrogate(name: str, x: np.ndarray, a: float) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if name == "rect":
        return (np.abs(x) < a) / (2.0 * a)
    if name == "triangle":
        return np.maximum(0.0, 1.0 - np.abs(x) / a) / a
    if name == "sigmoid":
        sig = 1.0 / (1.0 + np.exp(-x / a))
        return sig * (1.0 - sig) / a
    if name == "atan":
        return (1.0 / (2.0 * a)) / (1.0 + (np.pi * x / (2.0 * a)) ** 2)
    raise AssertionError(name)


def np_lif_backward(
    x: np.ndarray, w: np.ndarray, decay: float, v_th: float, name: str, a: float
) -> np.ndarray:
    """Hand-written BPTT of L = sum(w * s) with a detached reset gate.

    Since u[t+1] = decay * u[t] * (1 - s[t]) + x[t+1]:
    dL/du[t] = w[t] * sg'(u[t] - v_th) + dL/du[t+1] * decay * (1 - s[t]); dL/dx[t] = dL/du[t].
    s[t] reaches u[t+1] only through the stop-gradient reset gate, so it carries no gradient.
    """
    u, s = ref.lif_forward(x, decay, v_th)
    w = np.asarray(w, np.float64)
    grad_u = np.zeros_like(u)
    for t in reversed(range(u.shape[0])):
        grad_u[t] = w[t] * np_surrogate(name, u[t] - v_th, a)
        if t + 1 < u.shape[0]:
            grad_u[t] += grad_u[t + 1] * decay * (1.0 - s[t])
    return grad_u


# --------------------------------------------------------------------------------------
# Forward.


@pytest.mark.parametrize("decay,v_th", [(0.25, 0.5), (0.7, 1.0), (0.0, 0.3)])
def test_lif_scan_forward_matches_numpy_loop(decay, v_th):
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 1.0, size=(6, 3, 5)).astype(np.float32)
    out = lif_scan(jnp.asarray(x), decay=decay, v_th=v_th)
    _, s_ref = ref.lif_forward(x, decay, v_th)
    assert out.shape == x.shape
    assert out.dtype == jnp.float32
    out = np.asarray(out)
    assert set(np.unique(out)) <= {0.0, 1.0}
    np.testing.assert_array_equal(out, s_ref)
    # The inputs are chosen so that the test actually exercises spikes, silence and resets.
    assert 0.1 < s_ref.mean() < 0.9
    # At least one neuron fires, is reset, and its next potential depends on the reset.
    assert (s_ref[:-1] * (1 - s_ref[1:])).sum() > 0


def test_lif_scan_reset_and_leak_hand_computed():
    # decay 0.25, v_th 0.5, one neuron: x = [0.6, 0.3, 0.3, 0.3, 0.0]
    # u0 = 0.6 -> spike; u1 = 0 + 0.3 (reset) -> 0; u2 = 0.075 + 0.3 = 0.375 -> 0;
    # u3 = 0.09375 + 0.3 = 0.39375 -> 0; u4 = 0.0984375 -> 0.
    x = jnp.array([0.6, 0.3, 0.3, 0.3, 0.0], jnp.float32)
    np.testing.assert_array_equal(np.asarray(lif_scan(x)), [1, 0, 0, 0, 0])
    # Without a reset the leak accumulates: x = [0.4, 0.45] -> u1 = 0.1 + 0.45 = 0.55 > 0.5.
    x = jnp.array([0.4, 0.45], jnp.float32)
    np.testing.assert_array_equal(np.asarray(lif_scan(x)), [0, 1])


def test_strict_threshold_no_spike_at_equality():
    # u == v_th exactly (values exact in binary floating point) must not spike.
    x = jnp.array([0.5, 0.375], jnp.float32)  # u0 = 0.5; u1 = 0.25 * 0.5 + 0.375 = 0.5
    np.testing.assert_array_equal(np.asarray(lif_scan(x, decay=0.25, v_th=0.5)), [0, 0])
    x = jnp.array([1.0], jnp.float32)
    assert float(lif_scan(x, v_th=1.0)[0]) == 0.0
    assert float(lif_scan(jnp.nextafter(x, 2.0), v_th=1.0)[0]) == 1.0
    assert float(spike(jnp.float32(0.0))) == 0.0


# --------------------------------------------------------------------------------------
# Gradients.


@pytest.mark.parametrize(
    "surrogate,width,decay,v_th",
    [
        ("rect", 0.5, 0.25, 0.5),
        ("rect", 0.3, 0.8, 0.5),
        ("triangle", 0.5, 0.25, 0.5),
        ("sigmoid", 0.4, 0.5, 0.5),
        ("atan", 0.5, 0.25, 1.0),
    ],
)
def test_lif_scan_grad_matches_handwritten_bptt(surrogate, width, decay, v_th):
    rng = np.random.default_rng(1)
    x = rng.normal(0.5, 1.0, size=(6, 3, 5)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)

    def loss(xx):
        return jnp.sum(
            jnp.asarray(w) * lif_scan(xx, decay=decay, v_th=v_th, surrogate=surrogate, width=width)
        )

    g = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    g_ref = np_lif_backward(x, w, decay, v_th, surrogate, width)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-5)
    # Non-trivial: gradient flows back through time (earlier steps get more than their
    # own local term) for at least some neurons.
    local = w * np_surrogate(surrogate, ref.lif_forward(x, decay, v_th)[0] - v_th, width)
    assert np.abs(g_ref - local).max() > 1e-3


def test_grad_is_not_through_reset_gate():
    # One neuron, x0 in the surrogate window and spiking: u0 = 0.6, s0 = 1, u1 = x1.
    # L = s1 -> dL/dx0 must be 0: u1 = decay*u0*(1 - sg(s0)) + x1 and 1 - s0 = 0.
    x = jnp.array([0.6, 0.55], jnp.float32)
    g = jax.grad(lambda xx: lif_scan(xx)[1])(x)
    np.testing.assert_allclose(np.asarray(g), [0.0, 1.0], atol=0)
    # If it did not spike at t=0 (u0 = 0.4), the gradient flows with factor decay * sg'(u1 - v).
    x = jnp.array([0.4, 0.55], jnp.float32)
    g = jax.grad(lambda xx: lif_scan(xx)[1])(x)
    np.testing.assert_allclose(np.asarray(g), [0.25 * 1.0, 1.0], rtol=1e-6)


# --------------------------------------------------------------------------------------
# Surrogates.


@pytest.mark.parametrize("name", ["rect", "triangle", "sigmoid", "atan"])
@pytest.mark.parametrize("a", [0.5, 0.25])
def test_surrogate_derivative_matches_formula(name, a):
    # Points avoid |x| == a where the rectangle is discontinuous.
    pts = np.array([-3.0, -0.8, -0.49, -0.3, -0.1, 0.0, 0.05, 0.2, 0.26, 0.45, 0.7, 2.0])
    pts = pts[np.abs(np.abs(pts) - a) > 1e-3].astype(np.float32)
    dspike = jax.vmap(jax.grad(lambda v: spike(v, name, a)))
    got = np.asarray(dspike(jnp.asarray(pts)))
    np.testing.assert_allclose(got, np_surrogate(name, pts, a), rtol=1e-5, atol=1e-7)
    # The forward is still an exact Heaviside step.
    np.testing.assert_array_equal(np.asarray(spike(jnp.asarray(pts), name, a)), pts > 0)


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    return float(np.sum((y[1:] + y[:-1]) * np.diff(x)) / 2)


@pytest.mark.parametrize("name", sorted(SURROGATES))
@pytest.mark.parametrize("a", [0.5, 0.2])
def test_surrogate_integrates_to_one(name, a):
    # Fine grid around the window (the rectangle's edges), coarse far tails.
    core = np.linspace(-10.0, 10.0, 2_000_001)
    tail = np.linspace(10.0, 4000.0, 400_001)[1:]
    grid = np.concatenate([-tail[::-1], core, tail])
    dspike = jax.jit(jax.vmap(jax.grad(lambda v: spike(v, name, a))))
    vals = np.asarray(dspike(jnp.asarray(grid, jnp.float32)), np.float64)
    integral = _trapezoid(vals, grid)
    # atan has 1/x^2 tails: the mass outside [-L, L] is about 4a / (pi^2 L) < 1e-3.
    assert abs(integral - 1.0) < 2e-3, integral
    # And the window is where the mass is: at least half within |x| < 2a.
    inside = np.abs(grid) < 2 * a
    assert _trapezoid(vals[inside], grid[inside]) > 0.5


# --------------------------------------------------------------------------------------
# dtypes and transformations.


def test_bfloat16_under_jit_matches_float32():
    rng = np.random.default_rng(2)
    # Values on a coarse grid (multiples of 1/8, |x| <= 2) are exact in bfloat16.
    x32 = np.round(rng.normal(0.5, 1.0, size=(5, 4, 6)) * 8) / 8
    x32 = np.clip(x32, -2, 2).astype(np.float32)
    u, s_ref = ref.lif_forward(x32, 0.25, 0.5)
    x_bf = jnp.asarray(x32, jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(x_bf.astype(jnp.float32)), x32)
    out_bf = jax.jit(lif_scan)(x_bf)
    out_32 = jax.jit(lif_scan)(jnp.asarray(x32))
    assert out_bf.dtype == jnp.bfloat16
    # Away from the threshold (|u - v_th| > 1e-2) bf16 and f32 agree with the NumPy loop.
    mask = np.abs(u - 0.5) > 1e-2
    assert mask.mean() > 0.8
    got = np.asarray(out_bf.astype(jnp.float32))
    np.testing.assert_array_equal(got[mask], np.asarray(out_32)[mask])
    np.testing.assert_array_equal(got[mask], s_ref[mask])
    assert set(np.unique(np.asarray(out_bf.astype(jnp.float32)))) == {0.0, 1.0}
    # Gradients also work in bf16 and keep the dtype.
    g = jax.grad(lambda xx: jnp.sum(lif_scan(xx).astype(jnp.float32)))(x_bf)
    assert g.dtype == jnp.bfloat16


def test_jit_grad_vmap():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(0.5, 1.0, size=(4, 3, 7)).astype(np.float32))  # (B, T, N)
    f = lambda xx: lif_scan(xx, decay=0.5, v_th=0.6)  # noqa: E731
    batched = jax.vmap(f)(x)
    for b in range(x.shape[0]):
        np.testing.assert_array_equal(np.asarray(batched[b]), np.asarray(f(x[b])))
        _, s_ref = ref.lif_forward(np.asarray(x[b]), 0.5, 0.6)
        np.testing.assert_array_equal(np.asarray(batched[b]), s_ref)
    np.testing.assert_array_equal(np.asarray(jax.jit(f)(x[0])), np.asarray(f(x[0])))
    # vmap of grad == per-element grad (and == the NumPy BPTT).
    w = rng.normal(size=x.shape[1:]).astype(np.float32)
    gfun = jax.grad(lambda xx: jnp.sum(jnp.asarray(w) * f(xx)))
    gb = jax.jit(jax.vmap(gfun))(x)
    for b in range(x.shape[0]):
        g_ref = np_lif_backward(np.asarray(x[b]), w, 0.5, 0.6, "rect", 0.5)
        np.testing.assert_allclose(np.asarray(gb[b]), g_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unroll", [1, 2])
def test_unrolled_lif_matches_rolled_scan_and_numpy(unroll):
    # The default unrolls the time loop (no while loop in the program); a rolled scan (1 step
    # per iteration, or 2 with a remainder at T=5) gives the same spikes and BPTT gradient.
    rng = np.random.default_rng(4)
    x = rng.normal(0.5, 1.0, size=(5, 3, 4)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    rolled = functools.partial(lif_scan, unroll=unroll)
    assert "while" not in jax.jit(lif_scan).lower(jnp.asarray(x)).as_text()
    assert "while" in jax.jit(rolled).lower(jnp.asarray(x)).as_text()
    _, s_ref = ref.lif_forward(x, 0.25, 0.5)
    for f in (lif_scan, rolled):
        np.testing.assert_array_equal(np.asarray(jax.jit(f)(jnp.asarray(x))), s_ref)
        g = jax.jit(jax.grad(lambda xx, f=f: jnp.sum(jnp.asarray(w) * f(xx))))(jnp.asarray(x))
        g_ref = np_lif_backward(x, w, 0.25, 0.5, "rect", 0.5)
        np.testing.assert_allclose(np.asarray(g), g_ref, rtol=1e-5, atol=1e-6)


def test_lif_step_single_update():
    u_prev = jnp.array([0.8, 0.8, 0.2], jnp.float32)
    s_prev = jnp.array([1.0, 0.0, 0.0], jnp.float32)
    x = jnp.array([0.1, 0.1, 0.2], jnp.float32)
    (u, s), out = neuron.lif_step(
        (u_prev, s_prev), x, decay=0.5, v_th=0.45, surrogate="rect", width=0.5
    )
    np.testing.assert_allclose(np.asarray(u), [0.1, 0.5, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(s), [0, 1, 0])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(s))


# --------------------------------------------------------------------------------------
# Memory-saving BPTT: lif_scan(packed=True) keeps bits, and changes neither forward nor gradient.


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 7), (1, 8)])
def test_pack_bits_round_trip(shape):
    rng = np.random.default_rng(4)
    a = rng.random(shape) < 0.4
    bits = pack_bits(jnp.asarray(a))
    n = int(np.prod(shape[1:]))
    assert bits.dtype == jnp.uint8 and bits.shape == (shape[0], -(-n // 8))
    back = unpack_bits(bits, shape, jnp.float32)
    np.testing.assert_array_equal(np.asarray(back), a.astype(np.float32))


@pytest.mark.parametrize("time_steps", [1, 2, 5])
@pytest.mark.parametrize(
    "surrogate,width,decay,v_th",
    [
        ("rect", 0.5, 0.25, 0.5),
        ("rect", 0.3, 0.8, 0.7),
        ("rect", 0.5, 0.0, 0.3),
        ("triangle", 0.5, 0.25, 0.5),
        ("sigmoid", 0.4, 0.5, 0.5),
        ("atan", 0.5, 0.25, 1.0),
    ],
)
def test_packed_lif_matches_lif_scan_and_numpy_bptt(time_steps, surrogate, width, decay, v_th):
    rng = np.random.default_rng(5 + time_steps)
    x = rng.normal(0.5, 1.0, size=(time_steps, 3, 7)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)
    kw = dict(decay=decay, v_th=v_th, surrogate=surrogate, width=width)

    # Forward: bit-identical to lif_scan and to the NumPy loop.
    out = jax.jit(functools.partial(lif_scan_packed, **kw))(jnp.asarray(x))
    assert out.dtype == jnp.float32 and out.shape == x.shape
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lif_scan(jnp.asarray(x), **kw)))
    np.testing.assert_array_equal(np.asarray(out), ref.lif_forward(x, decay, v_th)[1])

    # VJP: equal to the default path's and to the hand-written BPTT.
    def vjp(fn):
        _, f = jax.vjp(lambda xx: fn(xx, **kw), jnp.asarray(x))
        return np.asarray(f(jnp.asarray(w))[0])

    g_packed = vjp(lif_scan_packed)
    np.testing.assert_allclose(g_packed, vjp(lif_scan), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(
        g_packed, np_lif_backward(x, w, decay, v_th, surrogate, width), rtol=1e-5, atol=1e-6
    )
    if time_steps > 1 and decay > 0:  # the test exercises gradient flow through time
        local = w * np_surrogate(surrogate, ref.lif_forward(x, decay, v_th)[0] - v_th, width)
        assert np.abs(g_packed - local).max() > 1e-3


def test_packed_lif_keeps_only_bits_for_rect():
    """The residuals of the VJP (leaves of the vjp function) are uint8, 2 bits per neuron and
    step for the rectangle; a smooth surrogate keeps spikes as bits plus u in float32."""
    t, n = 4, 3 * 5 * 7
    x = jnp.asarray(np.random.default_rng(6).normal(0.5, 1.0, size=(t, 3, 5, 7)), jnp.float32)
    _, f = jax.vjp(lif_scan_packed, x)
    leaves = jax.tree.leaves(f)
    assert leaves and all(leaf.dtype == jnp.uint8 for leaf in leaves)
    assert sum(leaf.size for leaf in leaves) == 2 * t * -(-n // 8)
    _, f = jax.vjp(functools.partial(lif_scan_packed, surrogate="sigmoid"), x)
    floats = [leaf for leaf in jax.tree.leaves(f) if leaf.dtype == jnp.float32]
    assert sum(leaf.size for leaf in floats) == t * n  # u only; spikes are bits
    # The default path keeps float32 potentials and spikes.
    _, f = jax.vjp(lif_scan, x)
    assert sum(leaf.size for leaf in jax.tree.leaves(f) if leaf.dtype == jnp.float32) >= 2 * t * n


def test_packed_lif_bfloat16_and_vmap():
    rng = np.random.default_rng(7)
    x = jnp.asarray(np.clip(np.round(rng.normal(0.5, 1.0, size=(3, 4, 6)) * 8) / 8, -2, 2))
    x_bf = x.astype(jnp.bfloat16)
    out = lif_scan_packed(x_bf)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out), np.asarray(lif_scan(x_bf)))
    g = jax.grad(lambda xx: jnp.sum(lif_scan_packed(xx).astype(jnp.float32)))(x_bf)
    g_ref = jax.grad(lambda xx: jnp.sum(lif_scan(xx).astype(jnp.float32)))(x_bf)
    assert g.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(g_ref, np.float32))
    # vmap over a leading batch axis (time second) equals the per-element call.
    xb = jnp.asarray(rng.normal(0.5, 1.0, size=(2, 3, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3, 5)), jnp.float32)
    gb = jax.vmap(jax.grad(lambda xx: jnp.sum(w * lif_scan_packed(xx))))(xb)
    for b in range(2):
        g_ref = np_lif_backward(np.asarray(xb[b]), np.asarray(w), 0.25, 0.5, "rect", 0.5)
        np.testing.assert_allclose(np.asarray(gb[b]), g_ref, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------
# Bad arguments.


def test_unknown_surrogate_raises_listing_names():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError) as e:
        lif_scan(x, surrogate="gaussian")
    msg = str(e.value)
    assert "gaussian" in msg
    for name in SURROGATES:
        assert name in msg


@pytest.mark.parametrize("width", [0.0, -0.5])
def test_nonpositive_width_raises(width):
    with pytest.raises(ValueError, match="width"):
        lif_scan(jnp.ones((2, 3)), width=width)
