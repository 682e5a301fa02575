"""Tests of the ANN / Spiking ResNets (idsnn_jax.models) against independent references."""

from __future__ import annotations

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import references as ref
from flax import traverse_util

from idsnn_jax.models import (
    LIF,
    MODELS,
    BasicBlock,
    Bottleneck,
    ResNet,
    create_model,
    firing_rates,
    is_spiking,
    spiking_resnet,
)
from idsnn_jax.models.resnet import ReLU, conv

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


def _block_params(block_cls, strides, in_channels, features, hw):
    """Parameter paths of one block initialized on a (1, hw, hw, in_channels) input."""
    block = block_cls(
        features,
        strides,
        conv=conv,
        norm=functools.partial(nn.BatchNorm, use_running_average=True),
        act=ReLU,
    )
    x = jax.ShapeDtypeStruct((1, hw, hw, in_channels), jnp.float32)
    return set(_flat(jax.eval_shape(block.init, jax.random.key(0), x)["params"]))


@pytest.mark.parametrize(
    "block_cls,strides,in_channels,features,projection",
    [
        (BasicBlock, 2, 4, 4, True),  # stride 2 on a 1x1 map: same shape, still a projection
        (BasicBlock, 1, 4, 8, True),
        (BasicBlock, 1, 4, 4, False),
        (Bottleneck, 2, 16, 4, True),  # 16 -> 4 * 4 channels, stride 2 on 1x1
        (Bottleneck, 1, 4, 4, True),  # 4 -> 16 channels
        (Bottleneck, 1, 16, 4, False),
    ],
)
@pytest.mark.parametrize("hw", [1, 4])
def test_projection_shortcut_by_the_reference_rule(
    block_cls, strides, in_channels, features, projection, hw
):
    """A projection iff `strides != 1 or in_channels != features * expansion`, whatever the
    spatial size of the input the block is initialized on."""
    paths = _block_params(block_cls, strides, in_channels, features, hw)
    assert ("shortcut_conv/kernel" in paths) == projection, paths
    assert ("shortcut_bn/scale" in paths) == projection, paths


@pytest.mark.parametrize("name", ["resnet18", "spiking_resnet18"])
def test_parameter_tree_does_not_depend_on_the_image_size(name):
    """At width 0.001 every stage has 1 channel, so a 1x1 image keeps its shape through the
    stride-2 stages; the tree (stage2..4 projections included) is the one of an 8x8 image."""
    model = create_model(name, num_classes=3, width=0.001, **_kwargs(name))
    trees = [
        _flat(jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(s, jnp.float32)))
        for s in ((1, 1, 1, 3), (1, 8, 8, 3))
    ]
    assert {k: v.shape for k, v in trees[0].items()} == {k: v.shape for k, v in trees[1].items()}
    for s in (2, 3, 4):
        assert f"params/stage{s}/block0/shortcut_conv/kernel" in trees[0]
        assert f"params/stage{s}/block1/shortcut_conv/kernel" not in trees[0]
    assert "params/stage1/block0/shortcut_conv/kernel" not in trees[0]


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
        want = spikes.mean(axis=(0, 2))  # per example: over time and neurons
        assert rate.shape == (b,)
        assert np.all((rate >= 0) & (rate <= 1))
        np.testing.assert_allclose(rate, want, rtol=1e-6)


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
    checked_time_dependence = False
    for layer in ("stem/conv", "stage1/block0/conv1", "stage2/block0/conv2"):
        bn = layer.replace("conv", "bn")
        conv_out = np.asarray(cap[layer][0], np.float64)  # (T*B, H, W, C)
        mean_all, var_all = ref.moments(conv_out)  # over T*B, H, W
        stats = _flat(bs)
        # Running stats start at (0, 1); Flax momentum 0.9 == PyTorch momentum 0.1.
        np.testing.assert_allclose(stats[f"{bn}/mean"], 0.1 * mean_all, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(stats[f"{bn}/var"], 0.9 + 0.1 * var_all, rtol=1e-4, atol=1e-6)
        # The forward normalizes with those same (T, B, H, W) statistics, scale v_th = 0.5.
        params = _flat(r["variables"]["params"])
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
# Whole networks against a NumPy forward (tests/references.py), weights read from the
# Flax variables. The reference decides on its own which blocks have a projection shortcut
# (stride != 1 or channels change) and checks that it used every leaf of the tree.


def _np_resnet(
    variables,
    images,
    *,
    stage_sizes,
    bottleneck=False,
    time_steps=1,
    lif=None,
    train=False,
    sew=False,
    stem_padding=1,
):
    """Float64 logits (B, classes) of a CIFAR ResNet, per LIF layer `(u, s)` each (T, B, ...),
    and in train mode `{bn path: (mean, var)}` of the batch statistics each BN used.

    `lif`: None for the ANN (ReLU), else `(decay, v_th)`. `train`: BN with the batch's
    statistics over every axis but the channel (tdBN: T*B, H, W), else the running ones.
    """
    params = {k: np.asarray(v, np.float64) for k, v in _flat(variables["params"]).items()}
    stats = {k: np.asarray(v, np.float64) for k, v in _flat(variables["batch_stats"]).items()}
    used, lif_layers, moments = set(), [], {}
    t, b = time_steps, images.shape[0]

    def get(tree, key):
        used.add(key)
        return tree[key]

    def conv_bn(h, block, conv, bn, stride=1, pad=None):
        h = ref.conv2d(h, get(params, f"{block}/{conv}/kernel"), stride, pad)
        bn = f"{block}/{bn}"
        scale, bias = get(params, f"{bn}/scale"), get(params, f"{bn}/bias")
        if train:
            moments[bn] = ref.moments(h)
            return ref.batch_norm(h, scale, bias)
        return ref.batch_norm(h, scale, bias, get(stats, f"{bn}/mean"), get(stats, f"{bn}/var"))

    def act(h):
        if lif is None:
            return ref.relu(h)
        u, s = ref.lif_forward(h.reshape(t, b, *h.shape[1:]), *lif)
        lif_layers.append((u, s))
        return s.reshape(h.shape)

    h = np.concatenate([np.asarray(images, np.float64)] * t)  # direct encoding, time-major
    h = act(conv_bn(h, "stem", "conv", "bn", pad=stem_padding))
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            blk, stride = f"stage{i + 1}/block{j}", 2 if i > 0 and j == 0 else 1
            if bottleneck:
                y = act(conv_bn(h, blk, "conv1", "bn1"))
                y = act(conv_bn(y, blk, "conv2", "bn2", stride))
                y = conv_bn(y, blk, "conv3", "bn3")
            else:
                y = act(conv_bn(h, blk, "conv1", "bn1", stride))
                y = conv_bn(y, blk, "conv2", "bn2")
            shortcut = h
            if stride != 1 or h.shape[-1] != y.shape[-1]:
                shortcut = conv_bn(h, blk, "shortcut_conv", "shortcut_bn", stride, pad=0)
                shortcut = act(shortcut) if sew else shortcut
            h = act(y) + shortcut if sew else act(y + shortcut)
    features = ref.global_avg_pool(h).reshape(t, b, -1).mean(axis=0)
    logits = ref.dense(features, get(params, "head/kernel"), get(params, "head/bias"))
    unused = (set(params) | (set() if train else set(stats))) - used
    assert not unused, f"leaves the reference did not use: {sorted(unused)}"
    return logits, lif_layers, moments


def _variables(model, ref_kw, x, seed):
    """Variables as after some training: the init's parameters scaled by U(0.5, 1.5) and
    shifted by N(0, 0.1) (no two channels alike), and running statistics equal to the batch
    statistics of other images (eval-mode BN is then not the identity, and spikes still flow
    through the whole network)."""
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda v: jnp.asarray(
            np.asarray(v) * rng.uniform(0.5, 1.5, v.shape) + rng.normal(0, 0.1, v.shape),
            jnp.float32,
        ),
        model.init(jax.random.key(seed), x)["params"],
    )
    other = _images(x.shape, seed=seed + 1)
    _, _, moments = _np_resnet({"params": params, "batch_stats": {}}, other, train=True, **ref_kw)
    stats = {}
    for bn, (mean, var) in moments.items():
        stats[f"{bn}/mean"], stats[f"{bn}/var"] = jnp.float32(mean), jnp.float32(var)
    return {"params": params, "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}


def _check_against_numpy(model, ref_kw, x, train, seed):
    """The model's logits (train or eval mode) match `_np_resnet` to float32 tolerance; in
    train mode so do the updated running statistics (Flax momentum 0.9, biased variance)."""
    variables = _variables(model, ref_kw, x, seed)
    want, lif_layers, moments = _np_resnet(variables, x, train=train, **ref_kw)
    if train:
        got, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        old, new = _flat(variables["batch_stats"]), _flat(updates["batch_stats"])
        assert set(new) == {f"{bn}/{m}" for bn in moments for m in ("mean", "var")}
        for bn, (mean, var) in moments.items():
            for m, batch in (("mean", mean), ("var", var)):
                expect = 0.9 * np.asarray(old[f"{bn}/{m}"], np.float64) + 0.1 * batch
                np.testing.assert_allclose(new[f"{bn}/{m}"], expect, rtol=1e-4, atol=1e-5)
    else:
        got = model.apply(variables, x)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
    assert np.ptp(want) > 1e-2  # logits that differ: the comparison is not of constants
    if lif_layers:  # spiking: float32 rounding cannot flip a spike, and every layer fires
        v_th = ref_kw["lif"][1]
        assert min(np.abs(u - v_th).min() for u, _ in lif_layers) > 1e-5
        assert all(0 < s.mean() < 1 for _, s in lif_layers)
    return want, lif_layers


SNN_KW = dict(time_steps=2, lif=(0.25, 0.5))
WHOLE_NETWORKS = {  # name: (model, reference arguments)
    "spiking_basic": (
        spiking_resnet((1, 2), num_classes=5, width=W, time_steps=2),
        dict(stage_sizes=(1, 2), **SNN_KW),
    ),
    "spiking_basic_sew_stem_pad3": (
        spiking_resnet((1, 1), num_classes=5, width=W, time_steps=2, sew=True, stem_padding=3),
        dict(stage_sizes=(1, 1), sew=True, stem_padding=3, **SNN_KW),
    ),
    "spiking_bottleneck": (
        spiking_resnet((1, 1), Bottleneck, num_classes=5, width=W, time_steps=2),
        dict(stage_sizes=(1, 1), bottleneck=True, **SNN_KW),
    ),
    "ann_basic": (
        ResNet(stage_sizes=(1, 2), block_cls=BasicBlock, num_classes=5, width=W),
        dict(stage_sizes=(1, 2)),
    ),
    "ann_bottleneck": (
        ResNet(stage_sizes=(1, 1), block_cls=Bottleneck, num_classes=5, width=W),
        dict(stage_sizes=(1, 1), bottleneck=True),
    ),
}


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", sorted(WHOLE_NETWORKS))
def test_whole_network_logits_match_numpy(name, train):
    """Stem, identity and stride-2 projection shortcuts, (td)BN in both modes, LIF or ReLU,
    pooling over H, W and time, head: the logits of a whole network, 8x8 images, B = 3."""
    model, ref_kw = WHOLE_NETWORKS[name]
    _check_against_numpy(model, ref_kw, _images((3, 8, 8, 3), seed=11), train, seed=12)


def test_small_spiking_resnet_logits_match_numpy():
    """Other neuron settings (decay 0.5, v_th 0.4), T = 3, 2-channel 6x6 images, eval mode."""
    t, b, decay, v_th = 3, 2, 0.5, 0.4
    model = spiking_resnet((1,), num_classes=3, width=W, time_steps=t, decay=decay, v_th=v_th)
    x = _images((b, 6, 6, 2), seed=7)
    ref_kw = dict(stage_sizes=(1,), time_steps=t, lif=(decay, v_th))
    _, lif_layers = _check_against_numpy(model, ref_kw, x, train=False, seed=7)
    h = lif_layers[-1][1]  # (T, B, H, W, C): the last block's output spikes
    assert 0 < h.mean() < 1  # the check involved actual spikes
    # Non-trivial time dynamics: the final spikes differ between time steps.
    ht = h.reshape(t, b, -1)
    assert not np.array_equal(ht[0], ht[1])


def test_per_step_logits_are_the_head_of_each_step():
    """`per_step=True`: the head applied to each step's pooled last-block spikes (NumPy), and
    their mean over T is the default (time-mean) output."""
    model, ref_kw = WHOLE_NETWORKS["spiking_basic"]
    x = _images((3, 8, 8, 3), seed=11)
    variables = _variables(model, ref_kw, x, 12)
    _, lif_layers, _ = _np_resnet(variables, x, train=False, **ref_kw)
    spikes, head = lif_layers[-1][1], variables["params"]["head"]  # (T, B, H, W, C)
    pooled = [ref.global_avg_pool(spikes[t]) for t in range(len(spikes))]
    want = np.stack([ref.dense(p, head["kernel"], head["bias"]) for p in pooled])
    got = np.asarray(model.apply(variables, x, per_step=True))
    assert got.shape == (2, 3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], got[1])  # the steps differ, so the mean is a real check
    mean = np.asarray(model.apply(variables, x))
    np.testing.assert_allclose(got.mean(axis=0), mean, rtol=1e-5, atol=1e-6)


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


# --------------------------------------------------------------------------------------
# Memory-saving BPTT (remat, pack_spikes): same parameter tree, forward and gradients as the
# default model, which is the reference here; fewer bytes kept for the backward pass.


def _train_grads(name, **kw):
    """Logits, CE gradients w.r.t. params, new batch stats and residual bytes by dtype of a
    tiny model in train mode (T=3, 8x8x3, 5 classes)."""
    model = create_model(name, num_classes=5, width=W, **_kwargs(name, time_steps=3, **kw))
    x = _images((2, 8, 8, 3), seed=11)
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
    shapes = lambda tree: {k: v.shape for k, v in _flat(tree).items()}  # noqa: E731
    assert shapes(variables["params"]) == shapes(variables0["params"])
    assert shapes(variables["batch_stats"]) == shapes(variables0["batch_stats"])
    for path in (
        "stem/conv/kernel",
        "stage1/block0/conv1/kernel",
        "stage2/block0/shortcut_conv/kernel",
    ):
        assert path in _flat(variables["params"])
    # Same init, the same forward (bit for bit) and the same BN statistics update.
    jax.tree.map(np.testing.assert_array_equal, variables, variables0)
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(logits0))
    jax.tree.map(np.testing.assert_array_equal, stats, stats0)
    # Gradients equal the default path's.
    g0, g = _flat(grads0), _flat(grads)
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
    x = _images((2, 8, 8, 3), seed=12)
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
