"""The CIFAR ResNets (idsnn_jax.models.resnet), ANN and spiking: parameter trees and counts,
BN init, stem padding, dtypes, and whole networks against a NumPy forward."""

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
from model_helpers import W, captured, flat, images, model_kwargs, train_apply_captured

from idsnn_jax.models import (
    BasicBlock,
    Bottleneck,
    ResNet,
    create_model,
    is_spiking,
    spiking_resnet,
)
from idsnn_jax.models.resnet import ReLU, conv

# --------------------------------------------------------------------------------------
# Parameter trees and counts (abstract evaluation at full width: no FLOPs).


def _abstract_variables(name, width=1.0, num_classes=100, **kw):
    model = create_model(name, num_classes=num_classes, width=width, **model_kwargs(name, **kw))
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
        fa = {k: v.shape for k, v in flat(va[col]).items()}
        fs = {k: v.shape for k, v in flat(vs[col]).items()}
        assert fa == fs
    # The parameter names of the CIFAR ResNet layout (stem, stage{s}/block{j}, head).
    p = flat(va["params"])
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
    assert "stem/bn/mean" in flat(va["batch_stats"])


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
    return set(flat(jax.eval_shape(block.init, jax.random.key(0), x)["params"]))


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
    model = create_model(name, num_classes=3, width=0.001, **model_kwargs(name))
    trees = [
        flat(jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(s, jnp.float32)))
        for s in ((1, 1, 1, 3), (1, 8, 8, 3))
    ]
    assert {k: v.shape for k, v in trees[0].items()} == {k: v.shape for k, v in trees[1].items()}
    for s in (2, 3, 4):
        assert f"params/stage{s}/block0/shortcut_conv/kernel" in trees[0]
        assert f"params/stage{s}/block1/shortcut_conv/kernel" not in trees[0]
    assert "params/stage1/block0/shortcut_conv/kernel" not in trees[0]


# --------------------------------------------------------------------------------------
# BN scale init, stem padding, SEW, dtypes.


def _bn_leaves(variables, leaf):
    """BatchNorm leaves: modules named bn, bn1, bn2, bn3 or shortcut_bn."""
    return {
        k: v
        for k, v in flat(variables["params"]).items()
        if re.fullmatch(rf".*(^|/)(bn\d?|shortcut_bn)/{leaf}", k)
    }


def _check_bn_init(variables, expected_scale):
    scales = _bn_leaves(variables, "scale")
    assert len(scales) == 1 + 8 * 2 + 3  # stem, 2 per block, 3 shortcut BNs
    for k, v in scales.items():
        np.testing.assert_array_equal(np.asarray(v), np.float32(expected_scale), err_msg=k)
    for k, v in _bn_leaves(variables, "bias").items():
        np.testing.assert_array_equal(np.asarray(v), 0.0, err_msg=k)


@pytest.mark.parametrize(
    "name,kw,expected",
    [("spiking_resnet18", {}, 0.5), ("sew_resnet18", {"v_th": 0.3}, 0.3), ("resnet18", {}, 1.0)],
    ids=["tdbn-default-v_th", "tdbn-v_th", "ann"],
)
def test_bn_scale_init(name, kw, expected):
    model = create_model(name, num_classes=3, width=W, **model_kwargs(name, time_steps=1, **kw))
    _check_bn_init(model.init(jax.random.key(0), jnp.ones((1, 4, 4, 3))), expected)


@pytest.mark.parametrize(
    "name,pad,size",
    [("spiking_resnet18", 3, 36), ("spiking_resnet18", None, 32), ("resnet18", None, 32)],
)
def test_stem_padding(name, pad, size):
    kw = {} if pad is None else {"stem_padding": pad}
    model = create_model(name, num_classes=10, width=W, **model_kwargs(name, **kw))
    x = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(model.init, jax.random.key(0), x)
    n = 2 * (2 if is_spiking(name) else 1)

    def fwd(v, xx):
        return model.apply(v, xx, mutable=["intermediates"], capture_intermediates=True)

    logits, state = jax.eval_shape(fwd, variables, x)
    cap = captured(state["intermediates"])
    assert cap["stem/conv"][0].shape == (n, size, size, 4)
    assert cap["stem/act"][0].shape == (n, size, size, 4)
    assert cap["stage2/block0/conv1"][0].shape == (n, size // 2, size // 2, 8)
    assert logits.shape == (2, 10)


def test_sew_block_output_is_spike_plus_shortcut():
    model = create_model("sew_resnet18", num_classes=4, width=0.125, time_steps=3)
    x = images((2, 8, 8, 3), seed=5)
    variables = model.init(jax.random.key(5), x)
    _, state = train_apply_captured(model, variables, x)
    cap = {k: np.asarray(v[0]) for k, v in captured(state["intermediates"]).items()}
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
    model = create_model(name, num_classes=4, width=W, dtype=jnp.bfloat16, **model_kwargs(name))
    x = images((2, 8, 8, 3), seed=6)
    variables = model.init(jax.random.key(6), x)
    for col in ("params", "batch_stats"):
        for k, v in flat(variables[col]).items():
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
    for k, v in flat(state["batch_stats"]).items():
        assert v.dtype == jnp.float32, k
    # The convs really compute in bfloat16.
    assert captured(state["intermediates"])["stem/conv"][0].dtype == jnp.bfloat16


# --------------------------------------------------------------------------------------
# Whole networks against a NumPy forward (tests/references.py), weights read from the
# Flax variables. The reference decides on its own which blocks have a projection shortcut
# (stride != 1 or channels change) and checks that it used every leaf of the tree.


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
    other = images(x.shape, seed=seed + 1)
    _, _, moments = ref.resnet_forward(
        {"params": params, "batch_stats": {}}, other, train=True, **ref_kw
    )
    stats = {}
    for bn, (mean, var) in moments.items():
        stats[f"{bn}/mean"], stats[f"{bn}/var"] = jnp.float32(mean), jnp.float32(var)
    return {"params": params, "batch_stats": traverse_util.unflatten_dict(stats, sep="/")}


def _check_against_numpy(model, ref_kw, x, train, seed):
    """The model's logits (train or eval mode) match `_np_resnet` to float32 tolerance; in
    train mode so do the updated running statistics (Flax momentum 0.9, biased variance)."""
    variables = _variables(model, ref_kw, x, seed)
    want, lif_layers, moments = ref.resnet_forward(variables, x, train=train, **ref_kw)
    if train:
        got, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
        old, new = flat(variables["batch_stats"]), flat(updates["batch_stats"])
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
    _check_against_numpy(model, ref_kw, images((3, 8, 8, 3), seed=11), train, seed=12)


def test_small_spiking_resnet_logits_match_numpy():
    """Other neuron settings (decay 0.5, v_th 0.4), T = 3, 2-channel 6x6 images, eval mode."""
    t, b, decay, v_th = 3, 2, 0.5, 0.4
    model = spiking_resnet((1,), num_classes=3, width=W, time_steps=t, decay=decay, v_th=v_th)
    x = images((b, 6, 6, 2), seed=7)
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
    x = images((3, 8, 8, 3), seed=11)
    variables = _variables(model, ref_kw, x, 12)
    _, lif_layers, _ = ref.resnet_forward(variables, x, train=False, **ref_kw)
    spikes, head = lif_layers[-1][1], variables["params"]["head"]  # (T, B, H, W, C)
    pooled = [ref.global_avg_pool(spikes[t]) for t in range(len(spikes))]
    want = np.stack([ref.dense(p, head["kernel"], head["bias"]) for p in pooled])
    got = np.asarray(model.apply(variables, x, per_step=True))
    assert got.shape == (2, 3, 5)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(got[0], got[1])  # the steps differ, so the mean is a real check
    mean = np.asarray(model.apply(variables, x))
    np.testing.assert_allclose(got.mean(axis=0), mean, rtol=1e-5, atol=1e-6)
