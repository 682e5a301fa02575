"""Tests of the ANN / Spiking ResNets (idsnn_jax.models) against independent references."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from idsnn_jax.models import (
    LIF,
    MODELS,
    ResNet,
    create_model,
    firing_rates,
    is_spiking,
    spiking_resnet,
)

W = 0.0625  # tiny width multiplier: 4, 8, 16, 32 channels


def _images(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


def _flat(tree):
    return traverse_util.flatten_dict(tree, sep="/")


def _kwargs(name, time_steps=2, **kw):
    if is_spiking(name):
        kw.setdefault("time_steps", time_steps)
    return kw


def _captured(inter, suffix="__call__"):
    """{module path: tuple of outputs} of captured `__call__`s."""
    out = {}
    for k, v in traverse_util.flatten_dict(inter).items():
        if k[-1] == suffix:
            out["/".join(k[:-1])] = v
    return out


# --------------------------------------------------------------------------------------
# Every registered model runs.


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_logits_shape_and_dtype(name):
    """Abstract evaluation (traces the whole model, no FLOPs) of init, train and eval."""
    model = create_model(name, num_classes=5, width=W, **_kwargs(name))
    x = jax.ShapeDtypeStruct((2, 8, 8, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    assert set(variables) == {"params", "batch_stats"}

    def train(v, xx):
        return model.apply(v, xx, train=True, mutable=["batch_stats"])

    logits, updated = jax.eval_shape(train, variables, x)
    assert logits.shape == (2, 5) and logits.dtype == jnp.float32
    assert jax.tree.structure(updated["batch_stats"]) == jax.tree.structure(
        variables["batch_stats"]
    )
    eval_logits = jax.eval_shape(model.apply, variables, x)
    assert eval_logits.shape == (2, 5) and eval_logits.dtype == jnp.float32


@pytest.mark.parametrize(
    "name,shape",
    [
        ("resnet18", (2, 8, 8, 3)),
        ("resnet50", (2, 8, 8, 3)),
        ("resnet18", (3, 12, 12, 1)),
        ("spiking_resnet18", (3, 12, 12, 1)),
    ],
)
def test_forward_train_and_eval(name, shape):
    """Real forwards (ANN basic + bottleneck, SNN, 1-channel images): finite float32 logits."""
    model = create_model(name, num_classes=10, width=W, **_kwargs(name))
    x = _images(shape, seed=1)
    # init runs the eval-mode forward with the initial running stats: two forwards, not three.
    eval_logits, variables = model.init_with_output(jax.random.key(1), x, train=False)
    assert variables["params"]["stem"]["conv"]["kernel"].shape == (3, 3, shape[-1], 4)
    logits, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
    for out in (eval_logits, logits):
        assert out.shape == (shape[0], 10) and out.dtype == jnp.float32
        assert np.all(np.isfinite(np.asarray(out)))
    # Eval and train mode really differ (running vs batch statistics) ...
    assert not np.allclose(np.asarray(eval_logits), np.asarray(logits))
    # ... and train mode updated the running statistics.
    old, new = _flat(variables["batch_stats"]), _flat(updated["batch_stats"])
    assert old.keys() == new.keys()
    assert all(not np.allclose(old[k], new[k]) for k in old if k.endswith("mean"))


# --------------------------------------------------------------------------------------
# Parameter trees and counts (abstract evaluation at full width: no FLOPs).


def _abstract_variables(name, width=1.0, num_classes=100, **kw):
    model = create_model(name, num_classes=num_classes, width=width, **_kwargs(name, **kw))
    x = jax.ShapeDtypeStruct((1, 8, 8, 3), jnp.float32)
    return jax.eval_shape(model.init, jax.random.key(0), x)


@pytest.mark.parametrize(
    "ann,snn",
    [
        ("resnet18", "spiking_resnet18"),
        ("resnet34", "spiking_resnet34"),
        ("resnet18", "sew_resnet18"),
    ],
)
def test_ann_snn_share_paths_and_shapes(ann, snn):
    va, vs = _abstract_variables(ann), _abstract_variables(snn)
    assert set(va) == set(vs) == {"params", "batch_stats"}
    for col in ("params", "batch_stats"):
        fa = {k: v.shape for k, v in _flat(va[col]).items()}
        fs = {k: v.shape for k, v in _flat(vs[col]).items()}
        assert fa == fs
    # Names of DESIGN §2.
    p = _flat(va["params"])
    for key in (
        "stem/conv/kernel",
        "stem/bn/scale",
        "stage1/block0/conv1/kernel",
        "stage1/block1/bn2/bias",
        "stage2/block0/shortcut_conv/kernel",
        "stage2/block0/shortcut_bn/scale",
        "head/kernel",
        "head/bias",
    ):
        assert key in p, key
    assert "stage1/block0/shortcut_conv/kernel" not in p  # identity shortcut
    assert "stem/bn/mean" in _flat(va["batch_stats"])


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables["params"]))


@pytest.mark.parametrize(
    "name,expected",
    [
        ("resnet18", 11_220_132),
        ("resnet34", 21_328_292),
        ("spiking_resnet18", 11_220_132),
        ("spiking_resnet34", 21_328_292),
    ],
)
def test_parameter_counts_match_pytorch_cifar_resnets(name, expected):
    assert _count(_abstract_variables(name)) == expected


def test_stage_widths_and_strides():
    v = _abstract_variables("resnet18")
    p = v["params"]
    assert p["stem"]["conv"]["kernel"].shape == (3, 3, 3, 64)
    for i, c in enumerate((64, 128, 256, 512)):
        assert p[f"stage{i + 1}"]["block1"]["conv2"]["kernel"].shape == (3, 3, c, c)
    assert p["stage2"]["block0"]["shortcut_conv"]["kernel"].shape == (1, 1, 64, 128)
    assert p["head"]["kernel"].shape == (512, 100)
    # Width multiplier scales all widths.
    v = _abstract_variables("spiking_resnet18", width=0.125, num_classes=10)
    assert v["params"]["stage4"]["block1"]["conv2"]["kernel"].shape == (3, 3, 64, 64)
    assert v["params"]["head"]["kernel"].shape == (64, 10)


# --------------------------------------------------------------------------------------
# Spikes, firing rates, time folding.


@pytest.fixture(scope="module")
def snn_run():
    """spiking_resnet18, T=3, B=2, one train-mode forward capturing every module output."""
    t, b = 3, 2
    model = create_model("spiking_resnet18", num_classes=4, width=0.125, time_steps=t)
    x = _images((b, 8, 8, 3), seed=3)
    variables = model.init(jax.random.key(3), x)
    logits, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
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
    return set(_captured(state["intermediates"]))


def test_lif_outputs_are_exactly_binary(snn_run):
    r = snn_run
    lif_paths = r["lif_paths"]
    # stem + 4 stages * 2 blocks * 2 LIFs.
    assert len(lif_paths) == 1 + 4 * 2 * 2
    assert "stem/act" in lif_paths and "stage4/block1/act2" in lif_paths
    cap = _captured(r["state"]["intermediates"])
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
    cap = _captured(r["state"]["intermediates"])
    for path, rate in rates.items():
        rate = np.asarray(rate)
        spikes = np.asarray(cap[path][0]).reshape(t, b, -1)  # time-major folding
        ref = spikes.mean(axis=(0, 2))  # per example: over time and neurons
        assert rate.shape == (b,)
        assert np.all((rate >= 0) & (rate <= 1))
        np.testing.assert_allclose(rate, ref, rtol=1e-6)


def test_time_is_folded_into_the_batch(snn_run):
    r = snn_run
    cap = _captured(r["state"]["intermediates"])
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
    cap = _captured(r["state"]["intermediates"])
    bs = r["state"]["batch_stats"]
    eps = 1e-5
    checked_time_dependence = False
    for layer in ("stem/conv", "stage1/block0/conv1", "stage2/block0/conv2"):
        bn = layer.replace("conv", "bn")
        conv_out = np.asarray(cap[layer][0], np.float64)  # (T*B, H, W, C)
        mean_all = conv_out.mean(axis=(0, 1, 2))
        var_all = conv_out.var(axis=(0, 1, 2))
        stats = _flat(bs)
        # Running stats start at (0, 1); Flax momentum 0.9 == PyTorch momentum 0.1.
        np.testing.assert_allclose(stats[f"{bn}/mean"], 0.1 * mean_all, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[f"{bn}/var"], 0.9 + 0.1 * var_all, rtol=1e-4, atol=1e-6)
        # The forward normalizes with those same (T, B, H, W) statistics, scale v_th = 0.5.
        params = _flat(r["variables"]["params"])
        expect = (conv_out - mean_all) / np.sqrt(var_all + eps) * params[f"{bn}/scale"] + params[
            f"{bn}/bias"
        ]
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
# BN scale init, stem padding, SEW, dtypes.


def _bn_leaves(variables, leaf):
    """BatchNorm leaves: modules named bn, bn1, bn2, bn3 or shortcut_bn."""
    return {
        k: v
        for k, v in _flat(variables["params"]).items()
        if re.fullmatch(rf".*(^|/)(bn\d?|shortcut_bn)/{leaf}", k)
    }


def _check_bn_init(variables, expected_scale):
    scales = _bn_leaves(variables, "scale")
    assert len(scales) == 1 + 8 * 2 + 3  # stem, 2 per block, 3 shortcut BNs
    for k, v in scales.items():
        np.testing.assert_array_equal(np.asarray(v), np.float32(expected_scale), err_msg=k)
    for k, v in _bn_leaves(variables, "bias").items():
        np.testing.assert_array_equal(np.asarray(v), 0.0, err_msg=k)


def test_tdbn_scale_init_is_default_v_th(snn_run):
    _check_bn_init(snn_run["variables"], 0.5)  # spiking_resnet18, default v_th


@pytest.mark.parametrize(
    "name,kw,expected", [("sew_resnet18", {"v_th": 0.3}, 0.3), ("resnet18", {}, 1.0)]
)
def test_bn_scale_init(name, kw, expected):
    model = create_model(name, num_classes=3, width=W, **_kwargs(name, time_steps=1, **kw))
    _check_bn_init(model.init(jax.random.key(0), jnp.ones((1, 4, 4, 3))), expected)


@pytest.mark.parametrize(
    "name,pad,size",
    [("spiking_resnet18", 3, 36), ("spiking_resnet18", None, 32), ("resnet18", None, 32)],
)
def test_stem_padding(name, pad, size):
    kw = {} if pad is None else {"stem_padding": pad}
    model = create_model(name, num_classes=10, width=W, **_kwargs(name, **kw))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    n = 2 * (2 if is_spiking(name) else 1)

    def fwd(v, xx):
        return model.apply(v, xx, mutable=["intermediates"], capture_intermediates=True)

    logits, state = jax.eval_shape(fwd, variables, x)
    cap = _captured(state["intermediates"])
    assert cap["stem/conv"][0].shape == (n, size, size, 4)
    assert cap["stem/act"][0].shape == (n, size, size, 4)
    assert cap["stage2/block0/conv1"][0].shape == (n, size // 2, size // 2, 8)
    assert logits.shape == (2, 10)


def test_sew_block_output_is_spike_plus_shortcut():
    model = create_model("sew_resnet18", num_classes=4, width=0.125, time_steps=3)
    x = _images((2, 8, 8, 3), seed=5)
    variables = model.init(jax.random.key(5), x)
    _, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=True,
    )
    cap = {k: np.asarray(v[0]) for k, v in _captured(state["intermediates"]).items()}
    # Identity shortcut (stage1/block0: 8 -> 8 channels, stride 1): input is the stem's spikes.
    np.testing.assert_array_equal(cap["stage1/block0"], cap["stage1/block0/act2"] + cap["stem/act"])
    # Projection shortcut: act(bn(conv1x1 x)), also spikes.
    for blk in ("stage2/block0", "stage3/block0"):
        sc = cap[f"{blk}/shortcut_act"]
        assert set(np.unique(sc)) <= {0.0, 1.0}
        np.testing.assert_array_equal(cap[blk], cap[f"{blk}/act2"] + sc)
    # Later identity blocks add the previous block's output (which may hold 2s).
    np.testing.assert_array_equal(
        cap["stage1/block1"], cap["stage1/block1/act2"] + cap["stage1/block0"]
    )
    values = set()
    for k, v in cap.items():
        if k.count("/") == 1 and k.startswith("stage") and "block" in k:
            values |= set(np.unique(v).tolist())
    assert 2.0 in values  # spike + spike
    # LIF outputs themselves stay binary.
    for k, v in cap.items():
        if k.endswith(("act1", "act2", "shortcut_act")) or k == "stem/act":
            assert set(np.unique(v)) <= {0.0, 1.0}, k


@pytest.mark.parametrize("name", ["spiking_resnet18", "resnet18"])
def test_bfloat16_compute_float32_params_and_logits(name):
    model = create_model(name, num_classes=4, width=W, dtype=jnp.bfloat16, **_kwargs(name))
    x = _images((2, 8, 8, 3), seed=6)
    variables = model.init(jax.random.key(6), x)
    for col in ("params", "batch_stats"):
        for k, v in _flat(variables[col]).items():
            assert v.dtype == jnp.float32, (col, k)
    logits, state = model.apply(
        variables,
        x,
        train=True,
        mutable=["batch_stats", "intermediates"],
        capture_intermediates=lambda mdl, _: isinstance(mdl, nn.Conv),
    )
    assert logits.dtype == jnp.float32 and logits.shape == (2, 4)
    assert np.all(np.isfinite(np.asarray(logits)))
    for k, v in _flat(state["batch_stats"]).items():
        assert v.dtype == jnp.float32, k
    # The convs really compute in bfloat16.
    assert _captured(state["intermediates"])["stem/conv"][0].dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------
# A whole (small) Spiking ResNet against NumPy.


def _np_conv(x, k, stride=1, pad=1):
    """(N, H, W, Ci) x (kh, kw, Ci, Co) cross-correlation, symmetric zero padding."""
    n, h, w, _ = x.shape
    kh, kw, _, co = k.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, ho, wo, co))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            out += patch @ k[i, j]
    return out


def _np_lif(x_tb, decay, v_th):
    """x_tb: (T, ...) -> spikes (T, ...) by the DESIGN recurrence."""
    u = np.zeros_like(x_tb[0])
    s = np.zeros_like(x_tb[0])
    out = []
    for t in range(x_tb.shape[0]):
        u = decay * u * (1 - s) + x_tb[t] if t else x_tb[t]
        s = (u > v_th).astype(np.float64)
        out.append(s)
    return np.stack(out)


def test_small_spiking_resnet_logits_match_numpy():
    t, b, decay, v_th = 3, 2, 0.5, 0.4
    model = spiking_resnet((1,), num_classes=3, width=W, time_steps=t, decay=decay, v_th=v_th)
    x = _images((b, 6, 6, 2), seed=7)
    variables = model.init(jax.random.key(7), x)
    # Random BN statistics and affine parameters so that eval-mode BN is not trivial.
    rng = np.random.default_rng(8)
    variables = jax.tree.map(
        lambda v: jnp.asarray(
            np.asarray(v) * rng.uniform(0.5, 1.5, v.shape) + rng.normal(0, 0.1, v.shape),
            jnp.float32,
        ),
        variables,
    )
    bs = _flat(variables["batch_stats"])
    variables = {
        "params": variables["params"],
        "batch_stats": traverse_util.unflatten_dict(
            {
                tuple(k.split("/")): (jnp.abs(v) + 0.1 if k.endswith("var") else v)
                for k, v in bs.items()
            }
        ),
    }
    p = {k: np.asarray(v, np.float64) for k, v in _flat(variables["params"]).items()}
    s = {k: np.asarray(v, np.float64) for k, v in _flat(variables["batch_stats"]).items()}

    def bn(h, name):
        return (h - s[f"{name}/mean"]) / np.sqrt(s[f"{name}/var"] + 1e-5) * p[f"{name}/scale"] + p[
            f"{name}/bias"
        ]

    def lif(h):  # h: (T*B, ...) time-major
        return _np_lif(h.reshape(t, b, *h.shape[1:]), decay, v_th).reshape(h.shape)

    xn = np.asarray(x, np.float64)
    h = np.concatenate([xn] * t)  # (T*B, H, W, C): the image at every step
    h = lif(bn(_np_conv(h, p["stem/conv/kernel"]), "stem/bn"))
    y = lif(bn(_np_conv(h, p["stage1/block0/conv1/kernel"]), "stage1/block0/bn1"))
    y = bn(_np_conv(y, p["stage1/block0/conv2/kernel"]), "stage1/block0/bn2")
    h = lif(y + h)
    feats = h.mean(axis=(1, 2)).reshape(t, b, -1).mean(axis=0)
    ref = feats @ p["head/kernel"] + p["head/bias"]

    got = model.apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)
    assert 0 < h.mean() < 1  # the check involved actual spikes
    # Non-trivial time dynamics: the final spikes differ between time steps.
    ht = h.reshape(t, b, -1)
    assert not np.array_equal(ht[0], ht[1])


# --------------------------------------------------------------------------------------
# Errors.


def test_unknown_model_name_lists_models():
    with pytest.raises(ValueError) as e:
        create_model("resnet19", num_classes=10)
    msg = str(e.value)
    assert "resnet19" in msg
    for name in MODELS:
        assert name in msg


@pytest.mark.parametrize("time_steps", [0, -1, 2.0])
def test_bad_time_steps(time_steps):
    with pytest.raises(ValueError, match="time_steps"):
        create_model("spiking_resnet18", num_classes=10, time_steps=time_steps)


@pytest.mark.parametrize("name", ["resnet18", "spiking_resnet18"])
@pytest.mark.parametrize("width", [0.0, -0.5])
def test_bad_width(name, width):
    with pytest.raises(ValueError, match="width"):
        create_model(name, num_classes=10, width=width)


def test_bad_num_classes():
    with pytest.raises(ValueError, match="num_classes"):
        create_model("resnet18", num_classes=0)


def test_bad_surrogate_in_model():
    with pytest.raises(ValueError, match="surrogate"):
        create_model("spiking_resnet18", num_classes=10, surrogate="nope")


@pytest.mark.parametrize("name", ["resnet18", "spiking_resnet18"])
@pytest.mark.parametrize("shape", [(8, 8, 3), (1, 2, 8, 8, 3)])
def test_images_must_be_4d(name, shape):
    model = create_model(name, num_classes=10, width=W, **_kwargs(name))
    with pytest.raises(ValueError, match="images"):
        model.init(jax.random.key(0), jnp.zeros(shape))


def test_is_spiking_and_registry_types():
    assert not is_spiking("resnet18") and not is_spiking("resnet152")
    assert is_spiking("spiking_resnet18") and is_spiking("sew_resnet34")
    for name in MODELS:
        m = create_model(name, num_classes=2, width=W, **_kwargs(name))
        assert isinstance(m, ResNet)
        assert m.time_steps == (2 if is_spiking(name) else 1)
