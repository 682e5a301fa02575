"""The exported neurons (idsnn_jax.nir_neurons): stepped by forward Euler at their dt, as NIR's
consumers step them, they spike exactly as the model's LIF (tests/references.py)."""

from __future__ import annotations

import nir
import numpy as np
import pytest
import references as ref

from idsnn_jax.nir_neurons import neuron_metadata, neuron_node, potential_scale, time_step


def _euler(node: nir.NIRNode, dt: float, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Potentials and spikes (T, ...) of `node` driven by x (T, ...): forward Euler at `dt`,
    spike when v > v_threshold, reset to v_reset (the NIR LIF and IF equations)."""
    v = np.zeros(x.shape[1:])
    potentials, spikes = [], []
    for x_t in x:
        if isinstance(node, nir.LIF):
            v = v + dt / node.tau * (node.v_leak - v + node.r * x_t)
        else:
            v = v + node.r * x_t
        s = (v > node.v_threshold).astype(np.float64)
        potentials.append(v.copy())
        spikes.append(s)
        v = np.where(s > 0, node.v_reset, v)
    return np.stack(potentials), np.stack(spikes)


@pytest.mark.parametrize("decay,v_th", [(0.25, 0.5), (0.5, 0.4), (1.0, 1.0)])
def test_exported_neuron_steps_like_the_model(decay, v_th):
    x = np.random.default_rng(0).normal(0.3, 0.6, (12, 5, 4))
    node = neuron_node(decay, v_th, (5, 4), np.float64)
    assert isinstance(node, nir.IF if decay == 1.0 else nir.LIF)
    potentials, spikes = _euler(node, time_step(decay), x)
    u, want = ref.lif_forward(x, decay, v_th)
    np.testing.assert_array_equal(spikes, want)
    assert 0 < want.mean() < 1  # both spiking and silent steps were compared
    # The node's potential is the model's u scaled by potential_scale (before the reset).
    np.testing.assert_allclose(potentials, potential_scale(decay) * u, rtol=1e-12, atol=1e-12)


def test_hand_computed_parameters_and_metadata():
    node = neuron_node(0.25, 0.5, (2,), np.float32)
    np.testing.assert_allclose(node.tau, 1e-4 / 0.75)
    np.testing.assert_allclose(node.v_threshold, 0.375)
    assert node.tau.dtype == np.float32 and node.tau.shape == (2,)
    assert neuron_metadata(0.25, 0.5)["dt"] == 1e-4
    assert neuron_metadata(1.0, 1.0)["potential_scale"] == 1.0
