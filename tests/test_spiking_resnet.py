"""The Spiking ResNets (idsnn_jax.models.spiking_resnet): binary spikes, firing rates, time
folded into the batch, tdBN statistics, and the memory options (remat, pack_spikes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from model_helpers import W, captured, flat, images, model_kwargs, train_apply_captured

from idsnn_jax.models import (
    LIF,
    create_model,
    firing_rates,
)

# --------------------------------------------------------------------------------------
# Spikes, firing rates, time folding.


@pytest.fixture(scope="module")
def snn_run():
    """spiking_resnet18, T=3, B=2, one train-mode forward capturing every module output."""
    t, b = 3, 2
    model = create_model("spiking_resnet18", num_classes=4, width=0.125, time_steps=t)
    x = images((b, 8, 8, 3), seed=3)
    variables = model.init(jax.random.key(3), x)
    logits, state = train_apply_captured(model, variables, x)
    lif_paths = _lif_paths(model, variables, x)
    return dict(
        model=model,
        x=x,
        t=t,
        b=b,
        variables=variables,
        logits=logits,
        state=state,
        lif_paths=lif_paths,
    )


def _lif_paths(model, variables, x):
    """Paths of LIF modules, found with a capture filter on the module type."""
    _, state = model.apply(
        variables,
        x,
        mutable=["intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, LIF),
    )
    return set(captured(state["intermediates"]))


def test_lif_outputs_are_exactly_binary(snn_run):
    r = snn_run
    lif_paths = r["lif_paths"]
    # stem + 4 stages * 2 blocks * 2 LIFs.
    assert len(lif_paths) == 1 + 4 * 2 * 2
    assert "stem/act" in lif_paths and "stage4/block1/act2" in lif_paths
    cap = captured(r["state"]["intermediates"])
    total = 0.0
    for path in lif_paths:
        (s,) = cap[path]
        s = np.asarray(s)
        assert s.shape[0] == r["t"] * r["b"]
        assert set(np.unique(s)) <= {0.0, 1.0}, path
        total += s.mean()
    assert total > 0  # the network does fire
    # Standard (non-SEW) blocks output spikes too: the block output is its last LIF.
    for path in lif_paths:
        if path.endswith("act2"):
            block = path[: -len("/act2")]
            np.testing.assert_array_equal(np.asarray(cap[block][0]), np.asarray(cap[path][0]))


def test_firing_rates_equal_mean_of_captured_spikes(snn_run):
    r = snn_run
    t, b = r["t"], r["b"]
    lif_paths = r["lif_paths"]
    rates = firing_rates(r["state"]["intermediates"])
    assert set(rates) == lif_paths
    cap = captured(r["state"]["intermediates"])
    for path, rate in rates.items():
        rate = np.asarray(rate)
        spikes = np.asarray(cap[path][0]).reshape(t, b, -1)  # time-major folding
        want = spikes.mean(axis=(0, 2))  # per example: over time and neurons
        assert rate.shape == (b,)
        assert np.all((rate >= 0) & (rate <= 1))
        np.testing.assert_allclose(rate, want, rtol=1e-6)


def test_time_is_folded_into_the_batch(snn_run):
    r = snn_run
    cap = captured(r["state"]["intermediates"])
    conv_paths = [p for p in cap if p.split("/")[-1] in ("conv", "conv1", "conv2", "shortcut_conv")]
    bn_paths = [p for p in cap if p.split("/")[-1] in ("bn", "bn1", "bn2", "shortcut_bn")]
    assert len(bn_paths) == len(conv_paths)
    assert len(conv_paths) == 1 + 16 + 3  # stem, 2 per block, 3 projection shortcuts
    for path in conv_paths + bn_paths:
        outs = cap[path]
        assert len(outs) == 1, path  # one call per layer, not T
        assert outs[0].shape[0] == r["t"] * r["b"], path
    assert cap["stem/conv"][0].shape == (r["t"] * r["b"], 8, 8, 8)
    # Direct encoding: every time step of the stem conv sees the same image.
    stem = np.asarray(cap["stem/conv"][0]).reshape(r["t"], r["b"], 8, 8, 8)
    for k in range(1, r["t"]):
        np.testing.assert_array_equal(stem[k], stem[0])
    assert not np.allclose(stem[0, 0], stem[0, 1])  # and images differ across the batch


def test_tdbn_statistics_are_over_time_and_batch(snn_run):
    r = snn_run
    t, b = r["t"], r["b"]
    cap = captured(r["state"]["intermediates"])
    bs = r["state"]["batch_stats"]
    checked_time_dependence = False
    for layer in ("stem/conv", "stage1/block0/conv1", "stage2/block0/conv2"):
        bn = layer.replace("conv", "bn")
        conv_out = np.asarray(cap[layer][0], np.float64)  # (T*B, H, W, C)
        mean_all, var_all = ref.moments(conv_out)  # over T*B, H, W
        stats = flat(bs)
        # Running stats start at (0, 1); Flax momentum 0.9 == PyTorch momentum 0.1.
        np.testing.assert_allclose(stats[f"{bn}/mean"], 0.1 * mean_all, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[f"{bn}/var"], 0.9 + 0.1 * var_all, rtol=1e-4, atol=1e-6)
        # The forward normalizes with those same (T, B, H, W) statistics, scale v_th = 0.5.
        params = flat(r["variables"]["params"])
        expect = ref.batch_norm(conv_out, params[f"{bn}/scale"], params[f"{bn}/bias"])
        np.testing.assert_allclose(np.asarray(cap[bn][0]), expect, rtol=1e-4, atol=1e-4)
        # Beyond the stem, inputs differ over time, so statistics of t = 0 alone differ.
        mean_t0 = conv_out.reshape(t, b, *conv_out.shape[1:])[0].mean(axis=(0, 1, 2))
        if layer == "stem/conv":
            np.testing.assert_allclose(mean_t0, mean_all, rtol=1e-5, atol=1e-6)
        elif np.abs(mean_t0 - mean_all).max() > 1e-2:
            checked_time_dependence = True
            assert not np.allclose(stats[f"{bn}/mean"], 0.1 * mean_t0, atol=1e-4)
    assert checked_time_dependence


# --------------------------------------------------------------------------------------
# Memory-saving BPTT (remat, pack_spikes): same parameter tree, forward and gradients as the
# default model, which is the reference here; fewer bytes kept for the backward pass.


def _train_grads(name, **kw):
    """Logits, CE gradients w.r.t. params, new batch stats and residual bytes by dtype of a
    tiny model in train mode (T=3, 8x8x3, 5 classes)."""
    model = create_model(name, num_classes=5, width=W, **model_kwargs(name, time_steps=3, **kw))
    x = images((2, 8, 8, 3), seed=11)
    y = jnp.array([1, 4])
    variables = model.init(jax.random.key(3), x)

    def loss(params):
        logits, updated = model.apply(
            {"params": params, "batch_stats": variables["batch_stats"]},
            x,
            train=True,
            mutable=["batch_stats"],
        )
        ce = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(2), y])
        return ce, (logits, updated["batch_stats"])

    _, vjp_fn, (logits, stats) = jax.vjp(jax.jit(loss), variables["params"], has_aux=True)
    (grads,) = vjp_fn(jnp.ones((), jnp.float32))
    residuals: dict[str, int] = {}
    params = {id(leaf) for leaf in jax.tree.leaves(variables["params"])}
    for leaf in jax.tree.leaves(vjp_fn):
        if id(leaf) in params:  # the parameters themselves are not activation memory
            continue
        residuals[str(leaf.dtype)] = residuals.get(str(leaf.dtype), 0) + leaf.nbytes
    return variables, logits, grads, stats, residuals


@pytest.fixture(scope="module")
def default_grads():
    return {name: _train_grads(name) for name in ("spiking_resnet18", "sew_resnet18")}


@pytest.mark.parametrize(
    "name,kw",
    [
        ("spiking_resnet18", {"remat": True}),
        ("spiking_resnet18", {"pack_spikes": True}),
        ("spiking_resnet18", {"remat": True, "pack_spikes": True}),
        ("sew_resnet18", {"remat": True, "pack_spikes": True}),
    ],
    ids=["remat", "pack", "both", "sew-both"],
)
def test_memory_options_keep_tree_forward_and_gradients(default_grads, name, kw):
    variables0, logits0, grads0, stats0, res0 = default_grads[name]
    variables, logits, grads, stats, res = _train_grads(name, **kw)
    # Identical parameter trees (paths and shapes): init_snn_from_ann walks these paths.
    shapes = lambda tree: {k: v.shape for k, v in flat(tree).items()}  # noqa: E731
    assert shapes(variables["params"]) == shapes(variables0["params"])
    assert shapes(variables["batch_stats"]) == shapes(variables0["batch_stats"])
    for path in (
        "stem/conv/kernel",
        "stage1/block0/conv1/kernel",
        "stage2/block0/shortcut_conv/kernel",
    ):
        assert path in flat(variables["params"])
    # Same init, the same forward (bit for bit) and the same BN statistics update.
    jax.tree.map(np.testing.assert_array_equal, variables, variables0)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits0))
    jax.tree.map(np.testing.assert_array_equal, stats, stats0)
    # Gradients equal the default path's.
    g0, g = flat(grads0), flat(grads)
    assert g.keys() == g0.keys()
    for k in g0:
        np.testing.assert_allclose(np.asarray(g[k]), np.asarray(g0[k]), rtol=1e-5, atol=1e-6)
    assert max(float(np.abs(v).max()) for v in g0.values()) > 1e-3  # non-trivial gradients
    # Fewer float32 bytes kept for the backward pass (XLA-independent: the VJP's residuals).
    ratio = res["float32"] / res0["float32"]
    if kw.get("remat") and kw.get("pack_spikes") and name == "spiking_resnet18":
        # Blocks rematerialized from their packed input: only the stem's and head's floats.
        assert ratio < 0.05 and res["uint8"] > 0, (ratio, res)
    elif kw.get("remat"):  # nn.remat keeps each block's float input (SEW inputs aren't 0/1)
        assert ratio < 0.15, ratio
    else:  # packed LIFs and spike convs: BatchNorm inputs stay float32
        assert ratio < 0.75 and res["uint8"] > 0, (ratio, res)


def test_remat_is_harmless_for_anns():
    model = create_model("resnet18", num_classes=5, width=W)
    remat = create_model("resnet18", num_classes=5, width=W, remat=True)
    x = images((2, 8, 8, 3), seed=12)
    variables = model.init(jax.random.key(4), x)
    jax.tree.map(np.testing.assert_array_equal, remat.init(jax.random.key(4), x), variables)

    def grads(m):
        def loss(p):
            v = {"params": p, "batch_stats": variables["batch_stats"]}
            return jnp.sum(m.apply(v, x, train=True, mutable=["batch_stats"])[0] ** 2)

        return jax.jit(jax.grad(loss))(variables["params"])

    jax.tree.map(
        functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
        grads(remat),
        grads(model),
    )


def test_memory_option_errors():
    with pytest.raises(ValueError, match="pack_spikes"):
        create_model("resnet18", num_classes=5, pack_spikes=True)
    create_model("resnet18", num_classes=5, pack_spikes=False)  # harmless
    with pytest.raises(ValueError, match="remat_policy"):
        create_model("spiking_resnet18", num_classes=5, remat=True, remat_policy="nope")
