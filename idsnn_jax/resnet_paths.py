"""Which source leaf each target leaf of a ResNet tree takes: the path half of IDSNN's init rule.

Parameter trees of every ResNet here share one path layout (``stem/conv``, ``stem/bn``,
``stage{s}/block{j}/{conv1,bn1,...,shortcut_conv,shortcut_bn}``, ``head``), either bare
(``variables["params"]``) or as a variables dict (``params/...``, ``batch_stats/...``). This
module reads that layout and maps paths: target block j of stage s takes source block
``block_map(s, j, d, n)``; stem is copied; head and shortcuts only on request. Shapes are
``transfer.py``'s business.

Within a block, each target leaf takes the source leaf of the same name, except where the two
blocks differ in type (a block with a ``conv3`` is a bottleneck, any other a basic block):
``BLOCK_RENAMES`` is the one place that says, per (source type, target type), which source
module a target module takes, or that it has none. Today it has one entry: a bottleneck source
block (1x1 conv1, 3x3 conv2 carrying the stride, 1x1 conv3) into a basic target block (3x3
conv1 carrying the stride, 3x3 conv2) gives conv1/bn1 the source's conv2/bn2 and keeps the
target's conv2/bn2 with the reason in ``NO_COUNTERPART``. Basic -> bottleneck keeps the
name-for-name rule: its 1x1 conv1 (3x3 in the source) and its conv3/bn3 (absent there) are
errors under ``strict``.
"""

from __future__ import annotations

import dataclasses
import numbers
import re
from collections.abc import Callable, Container, Mapping
from typing import Any

import jax

BlockMap = str | Callable[[int, int, int, int], int]

_STAGE = re.compile(r"stage(\d+)")
_BLOCK = re.compile(r"block(\d+)")
_STEM_KERNEL = "stem/conv/kernel"

# (source block type, target block type) -> {target module: source module, or None when the
# source block has no counterpart (the target keeps its value)}. Modules not listed, shortcuts
# included, take the module of the same name; pairs not listed (basic -> basic, bottleneck ->
# bottleneck, basic -> bottleneck) are name for name throughout.
BLOCK_RENAMES: dict[tuple[str, str], dict[str, str | None]] = {
    ("bottleneck", "basic"): {"conv1": "conv2", "bn1": "bn2", "conv2": None, "bn2": None},
}
# Why a module without counterpart keeps the target's value: (source type, target type) -> reason.
NO_COUNTERPART: dict[tuple[str, str], str] = {
    ("bottleneck", "basic"): (
        "basic conv2/bn2: a bottleneck source block has one 3x3 conv (mapped to conv1)"
    ),
}


def leaf_paths(tree: Any) -> tuple[list[str], list[Any], Any]:
    """Paths ("a/b/c"), leaves and treedef of a nested-dict pytree (dict or FrozenDict)."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = ["/".join(str(getattr(k, "key", k)) for k in path) for path, _ in with_path]
    return paths, [leaf for _, leaf in with_path], treedef


def _kind(tree: Any, name: str) -> str:
    """'variables' for {"params": ..., ...}, 'params' for a bare parameter tree."""
    if not isinstance(tree, Mapping):
        raise TypeError(f"{name} must be a ResNet params tree or variables dict, got {type(tree)}")
    if "params" in tree:
        return "variables"
    if "stem" in tree:
        return "params"
    raise ValueError(
        f"{name} is not a ResNet tree: it has neither 'params' (a variables dict) nor 'stem' "
        f"(a params tree) at the top; top-level keys: {sorted(map(str, tree))}"
    )


def common_kind(source: Any, target: Any, src_paths: list[str], dst_paths: list[str]) -> str:
    """The kind both trees share, checking that both have the stem kernel where expected."""
    kind, src_kind = _kind(target, "target"), _kind(source, "source")
    if kind != src_kind:
        raise ValueError(
            f"source is a {src_kind} tree but target is a {kind} tree: pass both as full "
            "variables dicts ({'params': ..., 'batch_stats': ...}, BN statistics mapped too) "
            "or both as params trees (variables['params'])"
        )
    stem = ("params/" if kind == "variables" else "") + _STEM_KERNEL
    for name, paths in (("source", src_paths), ("target", dst_paths)):
        if stem not in paths:
            raise ValueError(
                f"{name} has no '{stem}': expected the ResNet layout stem/conv, stem/bn, "
                "stage{s}/block{j}/{conv1,bn1,...}, head"
            )
    return kind


def split_path(path: str, kind: str) -> tuple[str, list[str]]:
    """('params/', ['stem', 'conv', 'kernel']) for 'params/stem/conv/kernel' in a variables dict."""
    parts = path.split("/")
    return ("", parts) if kind == "params" else (parts[0] + "/", parts[1:])


def _block_counts(paths: list[str], kind: str, name: str) -> dict[int, int]:
    """Stage number -> number of blocks, checking that blocks are numbered 0..n-1."""
    found: dict[int, set[int]] = {}
    for path in paths:
        rest = split_path(path, kind)[1]
        if len(rest) > 1 and _STAGE.fullmatch(rest[0]) and _BLOCK.fullmatch(rest[1]):
            found.setdefault(int(rest[0][5:]), set()).add(int(rest[1][5:]))
    for s, blocks in found.items():
        if blocks != set(range(len(blocks))):
            raise ValueError(f"{name} stage{s} has blocks {sorted(blocks)}: expected block0..")
    return {s: len(blocks) for s, blocks in sorted(found.items())}


def _chooser(block_map: BlockMap) -> Callable[[int, int, int, int], int]:
    """The block rule (stage, j, d, n) -> source block index."""
    if callable(block_map):
        return block_map
    if block_map == "first":
        return lambda s, j, d, n: min(j, d - 1)
    if block_map == "uniform":  # round(j * (d - 1) / (n - 1)), half up, in integers
        return lambda s, j, d, n: 0 if n == 1 else (2 * j * (d - 1) + n - 1) // (2 * (n - 1))
    raise ValueError(
        f"block_map={block_map!r} is unknown: use 'first', 'uniform' or a callable "
        "(stage, j, d, n) -> int"
    )


def block_types(paths: list[str], kind: str) -> dict[tuple[int, int], str]:
    """(stage, block) -> "bottleneck" (the block has a ``conv3``) or "basic"."""
    types: dict[tuple[int, int], str] = {}
    for path in paths:
        rest = split_path(path, kind)[1]
        if len(rest) > 2 and _STAGE.fullmatch(rest[0]) and _BLOCK.fullmatch(rest[1]):
            key = (int(rest[0][5:]), int(rest[1][5:]))
            types.setdefault(key, "basic")
            if rest[2] == "conv3":
                types[key] = "bottleneck"
    return types


@dataclasses.dataclass(frozen=True)
class BlockSource:
    """Where one target block comes from: the source block's index and the types of both."""

    index: int
    src_type: str
    dst_type: str


def block_table(
    src_paths: list[str], dst_paths: list[str], kind: str, block_map: BlockMap
) -> dict[tuple[int, int], BlockSource]:
    """(stage, target block) -> its source block (by ``block_map``) and both block types."""
    src_blocks = _block_counts(src_paths, kind, "source")
    src_types, dst_types = block_types(src_paths, kind), block_types(dst_paths, kind)
    choose, table = _chooser(block_map), {}
    for s, n in _block_counts(dst_paths, kind, "target").items():
        if s not in src_blocks:
            raise ValueError(f"target has stage{s} but source has only stages {list(src_blocks)}")
        d = src_blocks[s]
        for j in range(n):
            m = choose(s, j, d, n)
            if not isinstance(m, numbers.Integral) or not 0 <= m < d:  # NumPy ints are fine
                raise ValueError(
                    f"block_map returned {m!r} for target stage{s}/block{j}; source stage{s} "
                    f"has d={d} blocks, so it must be an int in [0, {d})"
                )
            table[(s, j)] = BlockSource(int(m), src_types[(s, int(m))], dst_types[(s, j)])
    return table


def source_path(
    path: str,
    kind: str,
    block_of: Mapping[tuple[int, int], BlockSource],
    src_paths: Container[str],
    copy_shortcut: bool,
    copy_head: bool,
) -> tuple[str | None, str | None]:
    """IDSNN's rule for one target path: ``(source path, None)``, or ``(None, why it is kept)``.

    The source path is where the value should come from; whether that leaf exists and its
    shape fits is checked afterwards (``_entry``). Inside a block the module name goes through
    ``BLOCK_RENAMES`` for the pair of block types (same name where it has no entry).
    """
    coll, rest = split_path(path, kind)
    if rest[0] == "stem":
        return path, None
    if rest[0] == "head":
        return (path, None) if copy_head else (None, "head (copy_head=False)")
    if not (len(rest) > 2 and _STAGE.fullmatch(rest[0]) and _BLOCK.fullmatch(rest[1])):
        return None, "no mapping rule for this path"
    block = block_of[(int(rest[0][5:]), int(rest[1][5:]))]
    pair = (block.src_type, block.dst_type)
    module = BLOCK_RENAMES.get(pair, {}).get(rest[2], rest[2])
    if module is None:
        return None, NO_COUNTERPART[pair]
    src_path = "/".join([coll + rest[0], f"block{block.index}", module, *rest[3:]])
    if rest[2].startswith("shortcut"):
        if not copy_shortcut:
            return None, "shortcut projection (copy_shortcut=False)"
        if src_path not in src_paths:
            return None, "source block has no projection"
    return src_path, None
