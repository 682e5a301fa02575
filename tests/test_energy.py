"""Operation counts against counts written out with NumPy loops, on the spikes the model
itself produced; the energy formula by hand."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref

from idsnn_jax import energy
from idsnn_jax.models import create_model

B, T = 3, 2


def _images():
    return jnp.asarray(np.random.default_rng(0).normal(size=(B, 8, 8, 3)) * 2, jnp.float32)


def _spiking(time_steps=T, v_th=0.5):
    model = create_model(
        "spiking_resnet18", num_classes=10, width=0.0625, time_steps=time_steps, v_th=v_th
    )
    variables = model.init(jax.random.key(0), _images())
    # Double every BN scale: more spikes than at init, so every layer has some.
    variables = jax.tree_util.tree_map_with_path(
        lambda p, v: v * 2.0 if p[-1].key == "scale" else v, variables
    )
    return model, variables


def _per_image(values: np.ndarray) -> np.ndarray:
    """(T' * B,) -> (B,): summed over the T' time steps."""
    return values.reshape(-1, B).sum(axis=0)


# T = 1 with v_th = 1.0: BN scales start at 1.0, as in an ANN; still a spiking network.
@pytest.mark.slow
@pytest.mark.parametrize("time_steps, v_th", [(T, 0.5), (1, 1.0)])
def test_spiking_counts_equal_numpy_loops(time_steps, v_th):
    model, variables = _spiking(time_steps, v_th)
    images = _images()
    (_, inter), counts = energy.counted_apply(
        model, variables, images, train=False, capture_intermediates=True, mutable=["intermediates"]
    )
    acts = inter["intermediates"]
    stem_spikes = np.asarray(acts["stem"]["act"]["__call__"][0])  # (T * B, 8, 8, 4)
    assert 0 < stem_spikes.mean() < 1
    # stage1/block0/conv1: 3x3, stride 1, pad 1, 4 -> 4 channels, on the stem's spikes.
    expected = _per_image(ref.synaptic_events(stem_spikes, 3, 1, 1, 4))
    np.testing.assert_allclose(counts["sops/stage1/block0/conv1"], expected)
    assert float(np.sum(counts["macs/stage1/block0/conv1"])) == 0
    # stage2/block0/shortcut_conv: 1x1, stride 2, 4 -> 8 channels, on stage1's last spikes.
    spikes = np.asarray(acts["stage1"]["block1"]["act2"]["__call__"][0])
    expected = _per_image(ref.synaptic_events(spikes, 1, 2, 0, 8))
    np.testing.assert_allclose(counts["sops/stage2/block0/shortcut_conv"], expected)
    # The stem (analog image, every step) and the head (once) count MACs: connections.
    ones = np.ones((time_steps * B, 8, 8, 3))
    np.testing.assert_allclose(
        counts["macs/stem/conv"], _per_image(ref.synaptic_events(ones, 3, 1, 1, 4))
    )
    np.testing.assert_allclose(counts["macs/head"], [32 * 10] * B)
    totals = energy.totals(counts)
    sops = sum(np.asarray(v) for k, v in counts.items() if k.startswith("sops/"))
    np.testing.assert_allclose(totals["sops"], sops)
    assert np.all(np.asarray(totals["sops"]) > 0)


def test_ann_counts_every_connection():
    model = create_model("resnet18", num_classes=10, width=0.0625)
    assert not model.spiking and _spiking(1, 1.0)[0].spiking
    images = _images()
    variables = model.init(jax.random.key(0), images)
    _, counts = energy.counted_apply(model, variables, images, train=False)
    assert all(float(np.sum(v)) == 0 for k, v in counts.items() if k.startswith("sops/"))
    ones = lambda c, hw: np.ones((B, hw, hw, c))
    np.testing.assert_allclose(
        counts["macs/stem/conv"], ref.synaptic_events(ones(3, 8), 3, 1, 1, 4)
    )
    np.testing.assert_allclose(
        counts["macs/stage3/block0/conv1"], ref.synaptic_events(ones(8, 4), 3, 2, 1, 16)
    )
    assert len([k for k in counts if k.startswith("macs/")]) == 1 + 8 * 2 + 3 + 1  # + head


def test_energy_formula_and_presets():
    costs = energy.PRESETS["45nm_fp32"]
    assert energy.energy_uj(1e6, 2e6, costs) == pytest.approx((4.6e6 + 0.9 * 2e6) * 1e-6)
    assert energy.PRESETS["45nm_int8"].e_ac_pj < energy.PRESETS["45nm_fp16"].e_ac_pj < 0.9


def test_counts_under_jit_equal_numpy_loops():
    """Jitted (as in the eval step), at the sizes where XLA:CPU miscounted convs of constant
    all-ones operands (28x28 images: a 32-channel 3x3 conv at 7x7 summed one input channel)."""
    model = create_model("resnet34", num_classes=10, width=0.125)
    images = jnp.zeros((4, 28, 28, 1))
    variables = model.init(jax.random.key(0), images)
    counts = jax.jit(lambda v, x: energy.counted_apply(model, v, x, train=False)[1])(
        variables, images
    )
    for layer, (hw, c) in {"stage3/block5/conv1": (7, 32), "stage4/block2/conv2": (4, 64)}.items():
        expected = ref.synaptic_events(np.ones((4, hw, hw, c)), 3, 1, 1, c)
        np.testing.assert_allclose(counts[f"macs/{layer}"], expected)
