"""The path half of the init rule (idsnn_jax.resnet_paths) on hand-built path lists: block
tables under each block rule, block types, and where each target path takes its value."""

from __future__ import annotations

import numpy as np
import pytest

from idsnn_jax import resnet_paths as rp


def _paths(stage_sizes, bottleneck=False, shortcut_stages=(2, 3, 4)) -> list[str]:
    """The params paths of a CIFAR ResNet with `stage_sizes` (shortcut in block 0 of the given
    stages), kernels and BN scales only."""
    convs = ["conv1", "conv2", "conv3"] if bottleneck else ["conv1", "conv2"]
    out = ["stem/conv/kernel", "stem/bn/scale"]
    for s, n in enumerate(stage_sizes, start=1):
        for j in range(n):
            names = [*convs, *(["shortcut_conv"] if j == 0 and s in shortcut_stages else [])]
            for conv in names:
                bn = conv.replace("conv", "bn")
                out += [f"stage{s}/block{j}/{conv}/kernel", f"stage{s}/block{j}/{bn}/scale"]
    return out + ["head/kernel", "head/bias"]


RESNET34, RESNET18 = _paths((3, 4, 6, 3)), _paths((2, 2, 2, 2))


def test_leaf_paths_are_slash_paths_in_tree_order():
    tree = {"params": {"stem": {"conv": {"kernel": 1}}, "head": {"bias": 2, "kernel": 3}}}
    paths, leaves, _ = rp.leaf_paths(tree)
    assert paths == ["params/head/bias", "params/head/kernel", "params/stem/conv/kernel"]
    assert leaves == [2, 3, 1]


@pytest.mark.parametrize(
    "block_map,expected",
    [
        # min(j, d - 1): the first n source blocks of every stage.
        ("first", {1: [0, 1], 2: [0, 1], 3: [0, 1], 4: [0, 1]}),
        # round(j (d - 1) / (n - 1)), half up: the first and last of each stage for n = 2.
        ("uniform", {1: [0, 2], 2: [0, 3], 3: [0, 5], 4: [0, 2]}),
        (lambda s, j, d, n: d - 1 - j, {1: [2, 1], 2: [3, 2], 3: [5, 4], 4: [2, 1]}),
    ],
    ids=["first", "uniform", "callable"],
)
def test_block_table_resnet34_into_resnet18(block_map, expected):
    table = rp.block_table(RESNET34, RESNET18, "params", block_map)
    assert {s: [table[(s, j)].index for j in range(2)] for s in range(1, 5)} == expected
    assert {b.src_type for b in table.values()} == {b.dst_type for b in table.values()} == {"basic"}


def test_uniform_rounds_half_up():
    """d = 6 source blocks into n = 3: j (d - 1) / (n - 1) = 0, 2.5, 5 -> 0, 3, 5."""
    table = rp.block_table(_paths((6,)), _paths((3,)), "params", "uniform")
    assert [table[(1, j)].index for j in range(3)] == [0, 3, 5]


def test_block_table_errors_name_the_block():
    with pytest.raises(
        ValueError, match=r"returned 3 for target stage1/block0; source stage1 has d=3 blocks"
    ):
        rp.block_table(RESNET34, RESNET18, "params", lambda s, j, d, n: 3)
    with pytest.raises(ValueError, match="block_map='nope' is unknown"):
        rp.block_table(RESNET34, RESNET18, "params", "nope")
    gap = [p for p in RESNET18 if not p.startswith("stage1/block0/")]
    with pytest.raises(ValueError, match=r"stage1 has blocks \[1\]: expected block0"):
        rp.block_table(RESNET34, gap, "params", "first")
    with pytest.raises(ValueError, match="target has stage5"):
        rp.block_table(RESNET18, _paths((1, 1, 1, 1, 1)), "params", "first")
    assert rp.block_table(RESNET34, RESNET18, "params", lambda s, j, d, n: np.int64(0))


def test_block_types_by_conv3():
    mixed = _paths((1,)) + ["stage2/block0/conv3/kernel", "stage2/block0/conv1/kernel"]
    assert rp.block_types(mixed, "params") == {(1, 0): "basic", (2, 0): "bottleneck"}


def _source(path, src, dst, kind="params", shortcut=True, head=False, block_map="uniform"):
    table = rp.block_table(src, dst, kind, block_map)
    return rp.source_path(path, kind, table, set(src), shortcut, head)


def test_source_path_rules():
    assert _source("stem/conv/kernel", RESNET34, RESNET18) == ("stem/conv/kernel", None)
    assert _source("stage3/block1/bn2/scale", RESNET34, RESNET18) == (
        "stage3/block5/bn2/scale",
        None,
    )
    assert _source("head/kernel", RESNET34, RESNET18) == (None, "head (copy_head=False)")
    assert _source("head/kernel", RESNET34, RESNET18, head=True) == ("head/kernel", None)
    kept = (None, "shortcut projection (copy_shortcut=False)")
    assert _source("stage2/block0/shortcut_conv/kernel", RESNET34, RESNET18, shortcut=False) == kept
    no_projection = _paths((3, 4, 6, 3), shortcut_stages=())
    assert _source("stage2/block0/shortcut_conv/kernel", no_projection, RESNET18) == (
        None,
        "source block has no projection",
    )
    assert _source("extra/kernel", RESNET34, RESNET18) == (None, "no mapping rule for this path")


def test_bottleneck_source_into_basic_target_renames():
    """conv1/bn1 of a basic block take the bottleneck's 3x3 conv2/bn2; conv2 has none."""
    src = _paths((2,), bottleneck=True, shortcut_stages=(1,))
    dst = _paths((1,), shortcut_stages=(1,))
    assert _source("stage1/block0/conv1/kernel", src, dst) == ("stage1/block0/conv2/kernel", None)
    path, why = _source("stage1/block0/conv2/kernel", src, dst)
    assert path is None and why == rp.NO_COUNTERPART[("bottleneck", "basic")]


def test_variables_paths_keep_their_collection():
    src = [f"batch_stats/{p}" for p in RESNET34] + [f"params/{p}" for p in RESNET34]
    dst = [f"batch_stats/{p}" for p in RESNET18] + [f"params/{p}" for p in RESNET18]
    got = _source("batch_stats/stage4/block1/bn1/scale", src, dst, kind="variables")
    assert got == ("batch_stats/stage4/block2/bn1/scale", None)
    assert rp.split_path("params/stem/conv/kernel", "variables") == (
        "params/",
        ["stem", "conv", "kernel"],
    )
