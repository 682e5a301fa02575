"""Tests for idsnn_jax.transfer.init_snn_from_ann (IDSNN's ANN -> SNN init rule).

Expected values are computed here independently of the module: NumPy modulo indexing
(np.take with `arange(n) % C`, and plain loops for kernels), hard-coded block tables, and a
tree builder that follows the models' path layout. Tests on the real models come last.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import FrozenDict
from references import cyclic

from idsnn_jax.transfer import TransferReport, init_snn_from_ann, transfer_report

R18, R34 = (2, 2, 2, 2), (3, 4, 6, 3)
STAGE_BASE = (64, 128, 256, 512)

# Source block for each target block, per stage, written out by hand.
FIRST_34_TO_18 = {1: [0, 1], 2: [0, 1], 3: [0, 1], 4: [0, 1]}
UNIFORM_34_TO_18 = {1: [0, 2], 2: [0, 3], 3: [0, 5], 4: [0, 2]}
FIRST_18_TO_34 = {1: [0, 1, 1], 2: [0, 1, 1, 1], 3: [0, 1, 1, 1, 1, 1], 4: [0, 1, 1]}
UNIFORM_18_TO_34 = {1: [0, 1, 1], 2: [0, 0, 1, 1], 3: [0, 0, 0, 1, 1, 1], 4: [0, 1, 1]}


def make_tree(depths, width, *, bottleneck=False, num_classes=10, seed=0, dtype=np.float32):
    """A random {"params", "batch_stats"} tree in the models' layout (CIFAR ResNet)."""
    rng = np.random.default_rng(seed)

    def arr(*shape):
        return jnp.asarray(rng.standard_normal(shape).astype(np.float32).astype(dtype))

    def bn(p, s, name, c):
        p[name] = {"scale": arr(c), "bias": arr(c)}
        s[name] = {"mean": arr(c), "var": jnp.abs(arr(c)) + 0.1}

    chan = lambda base: max(1, round(base * width))
    params, stats = {"stem": {"conv": {"kernel": arr(3, 3, 3, chan(64))}}}, {"stem": {}}
    bn(params["stem"], stats["stem"], "bn", chan(64))
    cin = chan(64)
    for s, n in enumerate(depths, 1):
        w = chan(STAGE_BASE[s - 1])
        out = 4 * w if bottleneck else w
        params[f"stage{s}"], stats[f"stage{s}"] = {}, {}
        for j in range(n):
            p, st = {}, {}
            convs = [("conv1", 1, cin, w), ("conv2", 3, w, w), ("conv3", 1, w, out)]
            if not bottleneck:
                convs = [("conv1", 3, cin, w), ("conv2", 3, w, w)]
            for k, (name, size, ci, co) in enumerate(convs, 1):
                p[name] = {"kernel": arr(size, size, ci, co)}
                bn(p, st, f"bn{k}", co)
            if (s > 1 and j == 0) or cin != out:
                p["shortcut_conv"] = {"kernel": arr(1, 1, cin, out)}
                bn(p, st, "shortcut_bn", out)
            params[f"stage{s}"][f"block{j}"], stats[f"stage{s}"][f"block{j}"] = p, st
            cin = out
    params["head"] = {"kernel": arr(cin, num_classes), "bias": arr(num_classes)}
    return {"params": params, "batch_stats": stats}


def flat(tree, prefix=""):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[prefix + k] = v
    return out


def cyclic_np(src, shape, axes):
    """src indexed with arange(shape[a]) % src.shape[a] on each axis a in axes."""
    out = np.asarray(src, np.float32)
    for a in axes:
        out = np.take(out, np.arange(shape[a]) % out.shape[a], axis=a)
    return out


def source_path(path, table):
    """The source path of a target path under a hand-written block table."""
    parts = path.split("/")
    if parts[1].startswith("stage"):
        s, j = int(parts[1][5:]), int(parts[2][5:])
        parts[2] = f"block{table[s][j]}"
    return "/".join(parts)


def bits(x):
    return np.asarray(x).tobytes()


def check_transfer(src, dst, out, table, *, copy_shortcut=False, copy_head=False):
    """Leaf by leaf: every target leaf has the expected value, shape and dtype."""
    assert jax.tree.structure(out) == jax.tree.structure(dst)
    fs, fd, fo = flat(src), flat(dst), flat(out)
    n_copied = 0
    for path, d in fd.items():
        o = fo[path]
        assert o.shape == d.shape and o.dtype == d.dtype, path
        parts = path.split("/")
        is_head = parts[1] == "head"
        is_shortcut = parts[1].startswith("stage") and parts[3].startswith("shortcut")
        if (is_head and not copy_head) or (is_shortcut and not copy_shortcut):
            assert bits(o) == bits(d), path
            continue
        s = fs[source_path(path, table)]
        axes = {4: (2, 3), 1: (0,)}[d.ndim] if not is_head else {2: (0,), 1: ()}[d.ndim]
        want = cyclic_np(s, d.shape, axes).astype(d.dtype)
        np.testing.assert_array_equal(np.asarray(o, np.float32), want.astype(np.float32), path)
        n_copied += 1
    return n_copied


@pytest.fixture(scope="module")
def r34():
    return make_tree(R34, 0.125, seed=1)


@pytest.fixture(scope="module")
def r18():
    return make_tree(R18, 0.125, seed=2)


def test_resnet34_to_resnet18_same_width(r34, r18):
    out, report = init_snn_from_ann(r34, r18, return_report=True)
    n = check_transfer(r34, r18, out, FIRST_34_TO_18)
    assert n == len(report.copied) == 5 + 8 * 10  # stem: kernel + 4 BN; a block: 2 kernels + 8 BN
    # Same width: every copied leaf is the source's value unchanged.
    for t, s in report.copied.items():
        assert bits(flat(out)[t]) == bits(flat(r34)[s])


def test_wider_source_truncates_resnet34_w1_to_resnet18_w05():
    src, dst = make_tree(R34, 1.0, seed=3), make_tree(R18, 0.5, seed=4)
    out = init_snn_from_ann(src, dst)
    check_transfer(src, dst, out, FIRST_34_TO_18)
    k = flat(out)["params/stage4/block1/conv2/kernel"]
    assert k.shape == (3, 3, 256, 256)
    np.testing.assert_array_equal(
        k, flat(src)["params/stage4/block1/conv2/kernel"][:, :, :256, :256]
    )


def test_narrower_source_tiles_resnet18_w05_to_resnet34_w1():
    src, dst = make_tree(R18, 0.5, seed=5), make_tree(R34, 1.0, seed=6)
    out = init_snn_from_ann(src, dst)
    check_transfer(src, dst, out, FIRST_18_TO_34)
    v = np.asarray(flat(out)["batch_stats/stage2/block3/bn1/var"])
    w = np.asarray(flat(src)["batch_stats/stage2/block1/bn1/var"])
    np.testing.assert_array_equal(v, np.concatenate([w, w]))


@pytest.mark.parametrize("src_w, dst_w", [(0.1875, 0.125), (0.125, 0.1875), (0.0625, 0.2)])
def test_uneven_widths_match_plain_loops(src_w, dst_w):
    """Channel counts that do not divide each other (12 <-> 8, 4 -> 13), checked with loops."""
    src, dst = make_tree(R18, src_w, seed=7), make_tree(R34, dst_w, seed=8)
    out = init_snn_from_ann(src, dst)
    fs, fo = flat(src), flat(out)
    for path, d in flat(dst).items():
        if "shortcut" in path or "head" in path:
            continue
        s = np.asarray(fs[source_path(path, FIRST_18_TO_34)])
        want = np.empty(d.shape, np.float32)
        if d.ndim == 4:
            for i in range(d.shape[2]):
                for o in range(d.shape[3]):
                    want[:, :, i, o] = s[:, :, i % s.shape[2], o % s.shape[3]]
        else:
            for c in range(d.shape[0]):
                want[c] = s[c % s.shape[0]]
        np.testing.assert_array_equal(np.asarray(fo[path]), want, path)


@pytest.mark.parametrize(
    "src_depth, dst_depth, table",
    [(R34, R18, UNIFORM_34_TO_18), (R18, R34, UNIFORM_18_TO_34)],
)
def test_uniform_block_map(src_depth, dst_depth, table):
    src, dst = make_tree(src_depth, 0.125, seed=9), make_tree(dst_depth, 0.0625, seed=10)
    out = init_snn_from_ann(src, dst, block_map="uniform")
    check_transfer(src, dst, out, table)


def test_callable_block_map_gets_stage_j_d_n(r34, r18):
    calls = []

    def last_first(stage, j, d, n):
        calls.append((stage, j, d, n))
        return np.int64(d - 1 - j)  # NumPy ints are accepted

    out = init_snn_from_ann(r34, r18, block_map=last_first)
    table = {1: [2, 1], 2: [3, 2], 3: [5, 4], 4: [2, 1]}
    check_transfer(r34, r18, out, table)
    assert (3, 1, 6, 2) in calls and len(calls) == 8


def test_params_only_trees(r34, r18):
    out, report = init_snn_from_ann(r34["params"], r18["params"], return_report=True)
    check_transfer(
        {"params": r34["params"]}, {"params": r18["params"]}, {"params": out}, FIRST_34_TO_18
    )
    assert all(not t.startswith(("params/", "batch_stats/")) for t, _ in report.copied.items())
    assert "stage2/block0/conv1/kernel" in report.copied


def test_untouched_leaves_are_bit_identical_and_inputs_unchanged(r34, r18):
    before_src, before_dst = copy.deepcopy(flat(r34)), copy.deepcopy(flat(r18))
    out, report = init_snn_from_ann(r34, r18, return_report=True)
    kept = report.kept
    assert set(kept) == {p for p in flat(r18) if "shortcut" in p or "/head/" in p}
    for path in kept:
        assert bits(flat(out)[path]) == bits(flat(r18)[path])
    for before, tree in ((before_src, r34), (before_dst, r18)):
        for path, leaf in flat(tree).items():
            assert bits(leaf) == bits(before[path])


def test_bfloat16_target_keeps_its_dtype():
    src = make_tree(R34, 0.125, seed=11)
    dst = make_tree(R18, 0.0625, seed=12, dtype=jnp.bfloat16)
    out, report = init_snn_from_ann(src, dst, return_report=True)
    check_transfer(src, dst, out, FIRST_34_TO_18)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
    assert "float32 -> bfloat16" in report.entries[0].detail


def test_identity_reproduces_the_tree_exactly(r34):
    other = make_tree(R34, 0.125, seed=13)
    out = init_snn_from_ann(r34, other, copy_shortcut=True, copy_head=True)
    for path, leaf in flat(r34).items():
        assert bits(flat(out)[path]) == bits(leaf), path


def test_copy_shortcut_and_head(r34, r18):
    out, report = init_snn_from_ann(
        r34, r18, copy_shortcut=True, copy_head=True, return_report=True
    )
    check_transfer(r34, r18, out, FIRST_34_TO_18, copy_shortcut=True, copy_head=True)
    assert report.kept == {}
    # A mapped source block without a projection leaves the target's shortcut alone.
    one = lambda stage, j, d, n: 1
    out, report = init_snn_from_ann(r34, r18, copy_shortcut=True, block_map=one, return_report=True)
    path = "params/stage2/block0/shortcut_conv/kernel"
    assert report.kept[path] == "source block has no projection"
    assert bits(flat(out)[path]) == bits(flat(r18)[path])


def test_copy_head_needs_the_same_number_of_classes(r34):
    dst = make_tree(R18, 0.0625, num_classes=100, seed=14)
    with pytest.raises(
        ValueError, match=r"head/kernel' \(64, 10\).*\(32, 100\): numbers of classes"
    ):
        init_snn_from_ann(r34, dst, copy_head=True)
    out, report = init_snn_from_ann(r34, dst, copy_head=True, strict=False, return_report=True)
    assert "classes differ" in report.kept["params/head/bias"]
    assert bits(flat(out)["params/head/kernel"]) == bits(flat(dst)["params/head/kernel"])


def test_spatial_mismatch_raises_or_is_skipped():
    """Basic -> bottleneck stays name for name: the 3x3 conv1 cannot feed a 1x1 conv1 and
    conv3/bn3 have no source leaf, so strict raises; strict=False keeps and reports them."""
    src = make_tree(R18, 0.0625, seed=16)
    dst = make_tree(R34, 0.0625, bottleneck=True, seed=15)  # ResNet50 layout: conv1 is 1x1
    path = "'params/stage1/block0/conv1/kernel'"
    msg = path + r" \(3, 3, 4, 4\).*" + path + r" \(1, 1, 4, 4\).*spatial"
    with pytest.raises(ValueError, match=msg):
        init_snn_from_ann(src, dst)
    with pytest.raises(ValueError, match=r"^(\d+) target leaves cannot be mapped") as err:
        init_snn_from_ann(src, dst)
    n_bad = 16 * (1 + 1 + 4)  # 16 blocks: conv1 mismatch, conv3 + bn3 (2 params, 2 stats)
    assert str(err.value).startswith(f"{n_bad} target leaves")
    assert f"... and {n_bad - 8} more" in str(err.value)  # only 8 are listed
    out, report = init_snn_from_ann(src, dst, strict=False, return_report=True)
    assert report.kept["params/stage3/block1/conv1/kernel"].startswith("shape mismatch")
    assert report.kept["params/stage1/block0/bn3/scale"].startswith("no source leaf")
    assert report.copied["params/stage3/block1/conv2/kernel"] == "params/stage3/block1/conv2/kernel"
    assert report.copied["params/stage3/block1/bn2/bias"] == "params/stage3/block1/bn2/bias"
    assert bits(flat(out)["params/stage1/block0/conv1/kernel"]) == bits(
        flat(dst)["params/stage1/block0/conv1/kernel"]
    )
    assert transfer_report(src, dst, strict=False) == report


# ------------------------------------------------------------ bottleneck -> basic blocks
# Written out here, not read from resnet_paths: a basic target block's module -> the module of
# its (bottleneck) source block, None where the bottleneck has no counterpart.
BOTTLENECK_TO_BASIC = {"conv1": "conv2", "bn1": "bn2", "conv2": None, "bn2": None}
NO_3X3 = "basic conv2/bn2: a bottleneck source block has one 3x3 conv (mapped to conv1)"


def check_bottleneck_to_basic(src, dst, out, report, table, *, copy_shortcut=False):
    """Leaf by leaf: stem copied; in a block conv1/bn1 <- the mapped source block's conv2/bn2
    (cyclic, `references.cyclic`), conv2/bn2 the target's own arrays and reported with their
    reason; shortcuts by `copy_shortcut`, head kept. Variables dicts, or params trees (then
    the report's paths lack the "params/" prefix). Returns counts of the block leaves."""
    assert jax.tree.structure(out) == jax.tree.structure(dst)
    params_only = "params" not in dst
    if params_only:
        src, dst, out = {"params": src}, {"params": dst}, {"params": out}
    key = (lambda p: p.removeprefix("params/")) if params_only else (lambda p: p)
    fs, fo = flat(src), flat(out)
    counts = {"renamed": 0, "no counterpart": 0, "shortcut": 0}
    for path, d in flat(dst).items():
        o = fo[path]
        assert o.shape == d.shape and o.dtype == d.dtype, path
        coll, top, *rest = path.split("/")
        if top == "head" or (rest[1].startswith("shortcut") and not copy_shortcut):
            assert bits(o) == bits(d), path
            assert key(path) in report.kept, path
            continue
        if top == "stem":
            src_path = path
        else:
            s, j = int(top[5:]), int(rest[0][5:])
            module = BOTTLENECK_TO_BASIC.get(rest[1], rest[1])
            if module is None:
                assert bits(o) == bits(d), path
                assert report.kept[key(path)] == NO_3X3, path
                counts["no counterpart"] += 1
                continue
            counts["shortcut" if rest[1].startswith("shortcut") else "renamed"] += 1
            src_path = "/".join([coll, top, f"block{table[s][j]}", module, *rest[2:]])
        assert report.copied[key(path)] == key(src_path), path
        want = cyclic(np.asarray(fs[src_path]), d.shape, (2, 3) if d.ndim == 4 else (0,))
        np.testing.assert_array_equal(np.asarray(o), want, path)
    return counts


def test_bottleneck_to_basic_synthetic_params_only_with_shortcuts():
    """Params trees (no batch_stats) and copy_shortcut: the 1x1 projections map cyclically."""
    src = make_tree(R34, 0.125, bottleneck=True, seed=21)
    dst = make_tree(R18, 0.0625, seed=22)
    out, report = init_snn_from_ann(
        src["params"], dst["params"], copy_shortcut=True, return_report=True
    )
    counts = check_bottleneck_to_basic(
        src["params"], dst["params"], out, report, FIRST_34_TO_18, copy_shortcut=True
    )
    # 8 blocks: conv1 kernel + bn1 scale/bias renamed, conv2 kernel + bn2 scale/bias kept;
    # stages 2-4 block0 have a projection (kernel + BN scale/bias), 1x1 both sides.
    assert counts == {"renamed": 24, "no counterpart": 24, "shortcut": 9}
    assert report.copied["stage1/block1/conv1/kernel"] == "stage1/block1/conv2/kernel"
    no_3x3 = [p for p in flat(dst["params"]) if "/conv2/" in p or "/bn2/" in p]
    head = dict.fromkeys(["head/kernel", "head/bias"], "head (copy_head=False)")
    assert report.kept == head | dict.fromkeys(no_3x3, NO_3X3)


def test_bottleneck_to_bottleneck_is_name_for_name():
    src = make_tree(R34, 0.0625, bottleneck=True, seed=23)
    dst = make_tree(R34, 0.0625, bottleneck=True, seed=24)
    out, report = init_snn_from_ann(
        src, dst, copy_shortcut=True, copy_head=True, return_report=True
    )
    assert report.kept == {}
    for path, leaf in flat(src).items():
        assert bits(flat(out)[path]) == bits(leaf), path
        assert report.copied[path] == path


def test_layout_errors(r34, r18):
    with pytest.raises(ValueError, match="source is a params tree but target is a variables"):
        init_snn_from_ann(r34["params"], r18)
    with pytest.raises(ValueError, match="source is a variables tree but target is a params"):
        init_snn_from_ann(r34, r18["params"])
    with pytest.raises(ValueError, match="'params/stem/conv/kernel'"):
        bad = {"params": {k: v for k, v in r34["params"].items() if k != "stem"} | {"x": 1}}
        init_snn_from_ann(bad, r18)
    with pytest.raises(ValueError, match="neither 'params'.*'stem'.*\\['dense'\\]"):
        init_snn_from_ann({"dense": {"kernel": jnp.ones((2, 2))}}, r18)
    with pytest.raises(TypeError):
        init_snn_from_ann([1, 2], r18)
    no_stage4 = {c: {k: v for k, v in t.items() if k != "stage4"} for c, t in r34.items()}
    with pytest.raises(
        ValueError, match=r"target has stage4 but source has only stages \[1, 2, 3\]"
    ):
        init_snn_from_ann(no_stage4, r18)
    with pytest.raises(ValueError, match="block_map='middle' is unknown.*'first', 'uniform'"):
        init_snn_from_ann(r34, r18, block_map="middle")
    with pytest.raises(ValueError, match=r"returned 3 for target stage1/block0.*d=3.*\[0, 3\)"):
        init_snn_from_ann(r34, r18, block_map=lambda s, j, d, n: d)


def test_blocks_sort_numerically_past_nine():
    """block10 follows block9: a 12-block stage maps block j onto block j (not lexically)."""
    src, dst = make_tree((12, 1, 1, 1), 0.0625, seed=17), make_tree((11, 1, 1, 1), 0.0625, seed=18)
    out = init_snn_from_ann(src, dst)
    check_transfer(src, dst, out, {1: list(range(11)), 2: [0], 3: [0], 4: [0]})
    _, report = init_snn_from_ann(src, dst, block_map="uniform", return_report=True)
    assert (
        report.copied["params/stage1/block10/conv1/kernel"] == "params/stage1/block11/conv1/kernel"
    )


def test_report_content_and_rendering(r34, r18):
    out, report = init_snn_from_ann(r34, r18, return_report=True)
    extra = {**r18, "params": {**r18["params"], "extra": {"w": jnp.ones(3)}}}
    assert transfer_report(r34, extra).kept["params/extra/w"] == "no mapping rule for this path"
    assert isinstance(report, TransferReport)
    assert len(report.entries) == len(flat(r18))
    assert {e.target for e in report.entries} == set(flat(r18))
    assert report.copied["batch_stats/stage3/block1/bn2/mean"] == (
        "batch_stats/stage3/block1/bn2/mean"
    )
    assert report.copied["params/stage2/block1/conv1/kernel"] == "params/stage2/block1/conv1/kernel"
    n_short = sum("shortcut" in p for p in flat(r18))
    assert report.kept["params/head/kernel"] == "head (copy_head=False)"
    assert report.kept["params/stage2/block0/shortcut_conv/kernel"] == (
        "shortcut projection (copy_shortcut=False)"
    )
    summary = report.summary()
    assert f"{len(flat(r18)) - n_short - 2} leaves copied, {n_short + 2} kept" in summary
    assert f"kept {n_short:4d}  shortcut projection" in summary
    text = str(report)
    assert text.startswith(summary)
    assert "params/stem/conv/kernel" in text and "same shape" in text
    narrow = make_tree(R18, 0.0625, seed=19)
    detail = dict((e.target, e.detail) for e in transfer_report(r34, narrow).entries)
    assert detail["params/stem/conv/kernel"] == "cyclic (3, 3, 3, 4) <- (3, 3, 3, 8)"
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.entries = ()


@pytest.mark.parametrize("width, dtype", [(0.0625, np.float32), (0.1875, jnp.bfloat16)])
def test_jit_matches_eager_and_abstract_report(r34, width, dtype):
    dst = make_tree(R18, width, seed=20, dtype=dtype)
    eager = init_snn_from_ann(r34, dst, block_map="uniform", copy_head=True)
    check_transfer(r34, dst, eager, UNIFORM_34_TO_18, copy_head=True)
    fn = jax.jit(functools.partial(init_snn_from_ann, block_map="uniform", copy_head=True))
    static = jax.jit(init_snn_from_ann, static_argnames=("block_map", "copy_head"))
    for out in (fn(r34, dst), static(r34, dst, block_map="uniform", copy_head=True)):
        assert jax.tree.structure(out) == jax.tree.structure(dst)
        for path, leaf in flat(eager).items():
            assert flat(out)[path].dtype == leaf.dtype and bits(flat(out)[path]) == bits(leaf)
    abstract = jax.eval_shape(lambda a, b: (a, b), r34, dst)
    assert transfer_report(*abstract, block_map="uniform", copy_head=True) == transfer_report(
        r34, dst, block_map="uniform", copy_head=True
    )


def test_frozendict_structure_is_kept(r34, r18):
    out = init_snn_from_ann(FrozenDict(r34), FrozenDict(r18))
    assert isinstance(out, FrozenDict)
    assert jax.tree.structure(out) == jax.tree.structure(FrozenDict(r18))
    check_transfer(r34, r18, out.unfreeze(), FIRST_34_TO_18)


# ----------------------------------------------------------------- the real models
# Variables come from jax.eval_shape(model.init) filled with random values (fast, and unlike a
# fresh init every BN vector differs, so a misrouted leaf cannot go unnoticed).


@functools.cache
def real(name, width, seed, time_steps=None):
    from idsnn_jax.models import create_model

    kw = {} if time_steps is None else {"time_steps": time_steps}
    model = create_model(name, num_classes=10, width=width, **kw)
    init = functools.partial(model.init, train=False)
    shapes = jax.eval_shape(init, jax.random.key(0), jnp.zeros((2, 8, 8, 3)))
    rng = np.random.default_rng(seed)
    fill = lambda path, s: jnp.asarray(
        rng.standard_normal(s.shape).astype(s.dtype) * 0.5
        + (1.0 if jax.tree_util.keystr(path).endswith("'var']") else 0.0) * 2.0,
        s.dtype,
    )
    variables = jax.tree_util.tree_map_with_path(fill, shapes)
    variables = jax.tree.map(lambda x: jnp.abs(x) if x.ndim == 1 else x, variables)
    return model, variables, jax.jit(functools.partial(model.apply, train=False))


def logits(apply, variables):
    return np.asarray(apply(variables, jax.random.normal(jax.random.key(0), (2, 8, 8, 3))))


def test_real_resnet34_to_spiking_resnet18():
    _, ann, _ = real("resnet34", 0.125, 0)
    _, snn, _ = real("spiking_resnet18", 0.0625, 1, time_steps=2)
    out, report = init_snn_from_ann(ann, snn, return_report=True)
    check_transfer(ann, snn, out, FIRST_34_TO_18)
    assert set(report.kept) == {p for p in flat(snn) if "shortcut" in p or "/head/" in p}


@pytest.mark.parametrize(
    "src, dst",
    [
        (("resnet34", 0.125, 0), ("resnet34", 0.125, 1)),
        (("spiking_resnet18", 0.0625, 1, 2), ("spiking_resnet18", 0.0625, 2, 2)),
    ],
)
def test_real_identity_gives_the_same_logits(src, dst):
    _, source, apply = real(*src)
    _, target, _ = real(*dst)
    out = init_snn_from_ann(source, target, copy_shortcut=True, copy_head=True)
    for path, leaf in flat(source).items():
        assert bits(flat(out)[path]) == bits(leaf), path
    want = logits(apply, source)
    np.testing.assert_array_equal(logits(apply, out), want)
    assert not np.array_equal(logits(apply, target), want)


def test_real_snn_to_ann_wider_and_deeper():
    _, snn, _ = real("spiking_resnet18", 0.0625, 1, time_steps=2)
    _, ann, apply = real("resnet34", 0.125, 0)
    out = init_snn_from_ann(snn, ann, block_map="uniform", copy_shortcut=True)
    check_transfer(snn, ann, out, UNIFORM_18_TO_34, copy_shortcut=True)
    assert np.isfinite(logits(apply, out)).all()


def test_real_resnet50_into_spiking_resnet18():
    """Bottleneck teacher -> basic spiking student, strict: conv1/bn1 <- conv2/bn2."""
    _, r50, _ = real("resnet50", 0.125, 3)
    _, snn, _ = real("spiking_resnet18", 0.125, 1, time_steps=2)
    out, report = init_snn_from_ann(r50, snn, return_report=True)  # strict
    counts = check_bottleneck_to_basic(r50, snn, out, report, FIRST_34_TO_18)
    # 8 blocks: conv kernel + BN scale/bias + BN mean/var renamed, and as many kept.
    assert counts == {"renamed": 40, "no counterpart": 40, "shortcut": 0}
    assert f"  kept   40  {NO_3X3}" in report.summary().splitlines()
    assert bits(flat(out)["params/stem/conv/kernel"]) == bits(flat(r50)["params/stem/conv/kernel"])
    assert report.copied["batch_stats/stage4/block1/bn1/var"] == "batch_stats/stage4/block1/bn2/var"
    # The stride-carrying 3x3 conv: (3, 3, 8, 16) <- ResNet50's (3, 3, 16, 16), input truncated.
    k = flat(out)["params/stage2/block0/conv1/kernel"]
    assert k.shape == (3, 3, 8, 16)
    np.testing.assert_array_equal(k, flat(r50)["params/stage2/block0/conv2/kernel"][:, :, :8])
    # Same tree, "uniform" block map and shortcuts: stage3 target block1 <- source block5.
    out, report = init_snn_from_ann(
        r50, snn, block_map="uniform", copy_shortcut=True, return_report=True
    )
    counts = check_bottleneck_to_basic(r50, snn, out, report, UNIFORM_34_TO_18, copy_shortcut=True)
    assert counts == {"renamed": 40, "no counterpart": 40, "shortcut": 15}
    assert report.copied["params/stage3/block1/conv1/kernel"] == "params/stage3/block5/conv2/kernel"


@pytest.mark.parametrize("options", [{}, {"block_map": "uniform", "copy_shortcut": True}])
def test_real_resnet50_report_from_shapes_only(options):
    _, r50, _ = real("resnet50", 0.125, 3)
    _, snn, _ = real("spiking_resnet18", 0.125, 1, time_steps=2)
    abstract = jax.eval_shape(lambda a, b: (a, b), r50, snn)
    _, concrete = init_snn_from_ann(r50, snn, return_report=True, **options)
    assert transfer_report(*abstract, **options) == concrete


def test_plan_accepts_a_resnet50_teacher():
    """The pipeline's plan checks the transfer in strict mode from abstract trees."""
    from idsnn_jax.configs import tiny
    from idsnn_jax.plan import build_plan

    config = tiny.get_config()
    config.teacher.model = "resnet50"
    assert config.init_from_teacher and config.student.model == "spiking_resnet18"
    built = build_plan(config)
    report = transfer_report(
        built.abstract_variables["teacher"], built.abstract_variables["student"]
    )
    assert sum(reason == NO_3X3 for reason in report.kept.values()) == 40
