"""Initialize a (Spiking) ResNet from another ResNet's weights: IDSNN's init rule.

IDSNN (Biomimetics 2023) starts the spiking student from a trained ANN teacher instead of from
scratch. The rule, reproduced here, is a walk over the *target* tree's paths:

* ``stem/conv`` and ``stem/bn`` are copied;
* in stage s, target block j takes source block ``min(j, d - 1)`` where d is the number of source
  blocks in that stage (``block_map="first"``, the reference); ``"uniform"`` spreads the n target
  blocks over the whole source stage (``j * (d - 1) / (n - 1)`` rounded half up), and a callable
  ``(stage, j, d, n) -> int`` may choose anything else;
* within a block each leaf takes the source leaf of the same name (conv1 <- conv1, bn2 <- bn2,
  ...), except from a bottleneck source block (it has a ``conv3``) into a basic target block:
  there target conv1/bn1 take the source's conv2/bn2 (its one 3x3 conv, which carries the
  stride as basic conv1 does) and target conv2/bn2 have no counterpart, so they keep the
  target's values and the report says why. The renaming lives in one table,
  ``resnet_paths.BLOCK_RENAMES``; basic -> bottleneck stays name for name (its 1x1 conv1 and
  its conv3/bn3 cannot be mapped, an error under ``strict``);
* channels are mapped cyclically, which truncates a wider source and tiles a narrower one:
  ``dst[..., i, o] = src[..., i % I, o % O]`` for kernels (HWIO, both channel axes) and
  ``v[c] = src[c % C]`` for BN scale, bias and running mean/var (collection ``batch_stats``);
* shortcut projections and the classifier head keep the target's (fresh) values, as the
  reference does, unless ``copy_shortcut`` / ``copy_head`` is set.

ANN and SNN trees share one path layout, so the same walk serves ANN->SNN, SNN->SNN, ANN->ANN and
SNN->ANN, shallower<->deeper and narrower<->wider. The plan depends on shapes only: the function
runs under ``jax.jit`` with its options static, and ``transfer_report`` accepts abstract trees
(``jax.eval_shape``) to plan without touching any array.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from idsnn_jax.resnet_paths import (
    BlockMap,
    block_table,
    common_kind,
    leaf_paths,
    source_path,
    split_path,
)


@dataclasses.dataclass(frozen=True)
class TransferEntry:
    """One target leaf: where its value came from (``source``) or why it was left alone."""

    target: str
    source: str | None
    action: str  # "copied" or "kept"
    detail: str  # e.g. "same shape", "cyclic (3, 3, 64, 64) <- (3, 3, 128, 128)", or the reason


@dataclasses.dataclass(frozen=True)
class TransferReport:
    """Every target leaf of one ``init_snn_from_ann`` call, in the target's leaf order."""

    entries: tuple[TransferEntry, ...]

    @property
    def copied(self) -> dict[str, str]:
        """Target path -> source path, for the leaves that were set from the source."""
        return {e.target: e.source for e in self.entries if e.action == "copied"}

    @property
    def kept(self) -> dict[str, str]:
        """Target path -> reason, for the leaves that keep the target's value."""
        return {e.target: e.detail for e in self.entries if e.action == "kept"}

    def summary(self) -> str:
        """Counts of copied and kept leaves, the kept ones grouped by reason."""
        n_copied, kept = len(self.copied), Counter(self.kept.values())
        lines = [f"transfer: {n_copied} leaves copied, {sum(kept.values())} kept"]
        lines += [f"  kept {n:4d}  {reason}" for reason, n in sorted(kept.items())]
        return "\n".join(lines)

    def __str__(self) -> str:
        width = max((len(e.target) for e in self.entries), default=0)
        rows = [
            f"  {e.action:6s} {e.target:{width}s} <- {e.source or '-'}  [{e.detail}]"
            for e in self.entries
        ]
        return "\n".join([self.summary(), *rows])


class _Mismatch(Exception):
    """A source leaf whose shape cannot be mapped onto the target leaf."""


def _takes(src: tuple[int, ...], dst: tuple[int, ...], head: bool) -> tuple[tuple[int, int], ...]:
    """(axis, size) pairs to map cyclically; raises _Mismatch for axes that must be equal.

    Kernels map their last two axes (HWIO: in, out; Dense: in, out) and vectors their only
    axis; leading (spatial) axes must match. The head keeps its last axis (classes) fixed.
    """
    if len(src) != len(dst):
        raise _Mismatch(f"ranks differ ({len(src)} vs {len(dst)})")
    ndim = len(dst)
    cyclic = range(ndim - 1) if head else range(max(ndim - 2, 0), ndim)
    for axis in set(range(ndim)) - set(cyclic):
        if src[axis] != dst[axis]:
            raise _Mismatch(
                "numbers of classes differ (copy_head needs the same number of classes; "
                "its input axis is mapped cyclically)"
                if head
                else "kernel spatial shapes differ"
            )
    return tuple((axis, dst[axis]) for axis in cyclic if src[axis] != dst[axis])


def _map_leaf(x: Any, takes: tuple[tuple[int, int], ...], like: Any) -> jax.Array:
    """``x`` indexed with ``arange(size) % x.shape[axis]`` for each (axis, size) in ``takes``,
    cast to ``like``'s dtype.

    Concrete arrays go through NumPy (no XLA compile per shape, so a whole ResNet maps in
    milliseconds) and land on ``like``'s sharding; under ``jit`` it is tiling and static slices.
    """
    if not takes and x.dtype == like.dtype:
        return jnp.asarray(x)
    if isinstance(x, jax.core.Tracer) or isinstance(like, jax.core.Tracer):
        for axis, size in takes:
            if size > x.shape[axis]:
                x = jnp.concatenate([x] * -(-size // x.shape[axis]), axis=axis)
            x = jax.lax.slice_in_dim(x, 0, size, axis=axis)
        return jnp.asarray(x).astype(like.dtype)
    y = np.asarray(x)
    for axis, size in takes:
        y = np.take(y, np.arange(size) % y.shape[axis], axis=axis)
    return jax.device_put(y.astype(like.dtype), getattr(like, "sharding", None))


_Op = tuple[Any, tuple[tuple[int, int], ...]]  # (source leaf, cyclic takes) of a copied leaf


def _entry(
    path: str,
    leaf: Any,
    src_path: str | None,
    reason: str | None,
    src: Mapping[str, Any],
    head: bool,
) -> tuple[TransferEntry, _Op | None, str | None]:
    """One target leaf's report entry, its op (None: kept) and, if the source leaf is missing
    or its shape cannot be mapped (``_takes``), the problem that ``strict`` raises on."""
    if src_path is None:
        return TransferEntry(path, None, "kept", reason), None, None
    if src_path not in src:
        problem = f"target '{path}' maps to source '{src_path}', which is missing"
        return TransferEntry(path, None, "kept", f"no source leaf '{src_path}'"), None, problem
    s_shape, d_shape = tuple(src[src_path].shape), tuple(leaf.shape)
    try:
        takes = _takes(s_shape, d_shape, head)
    except _Mismatch as err:
        problem = f"cannot map source '{src_path}' {s_shape} -> target '{path}' {d_shape}: {err}"
        why = f"shape mismatch: {err} ({s_shape} vs {d_shape})"
        return TransferEntry(path, None, "kept", why), None, problem
    detail = f"cyclic {d_shape} <- {s_shape}" if takes else "same shape"
    if src[src_path].dtype != leaf.dtype:
        detail += f", {src[src_path].dtype} -> {leaf.dtype}"
    return TransferEntry(path, src_path, "copied", detail), (src[src_path], takes), None


def _unmappable(problems: list[tuple[str, str]]) -> ValueError:
    """The ``strict`` error: parameters first (a kernel says more than its BN statistics)."""
    lines = [msg for _, msg in sorted(problems, key=lambda p: p[0].startswith("batch_stats"))]
    more = [f"... and {len(lines) - 8} more"] if len(lines) > 8 else []
    return ValueError(
        f"{len(lines)} target leaves cannot be mapped (strict=False keeps them and lists "
        "them in the report):\n  " + "\n  ".join(lines[:8] + more)
    )


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    """How ``init_snn_from_ann`` maps a tree (its arguments of the same names)."""

    block_map: BlockMap = "first"
    copy_shortcut: bool = False
    copy_head: bool = False
    strict: bool = True


def _plan(
    source: Any, target: Any, options: TransferOptions
) -> tuple[TransferReport, list[_Op | None], Any]:
    """The report, per target leaf either None (kept) or (source leaf, cyclic takes), treedef.

    A walk over the target's leaves: ``source_path`` (the rule) names each one's source or
    why it is kept, ``_entry`` checks that source leaf and its shape; ``strict`` raises on
    the leaves that failed that check.
    """
    src_paths, src_leaves, _ = leaf_paths(source)
    dst_paths, dst_leaves, treedef = leaf_paths(target)
    kind = common_kind(source, target, src_paths, dst_paths)
    block_of = block_table(src_paths, dst_paths, kind, options.block_map)
    src = dict(zip(src_paths, src_leaves, strict=True))
    entries, ops, problems = [], [], []
    for path, leaf in zip(dst_paths, dst_leaves, strict=True):
        copy = (options.copy_shortcut, options.copy_head)
        src_path, reason = source_path(path, kind, block_of, src, *copy)
        head = split_path(path, kind)[1][0] == "head"
        entry, op, problem = _entry(path, leaf, src_path, reason, src, head)
        entries.append(entry)
        ops.append(op)
        if problem is not None:
            problems.append((path, problem))
    if options.strict and problems:
        raise _unmappable(problems)
    return TransferReport(tuple(entries)), ops, treedef


def transfer_report(params_ann: Any, params_snn: Any, **options: Any) -> TransferReport:
    """The report ``init_snn_from_ann`` would give with the same `options` (the fields of
    `TransferOptions`), from shapes only (abstract trees work)."""
    return _plan(params_ann, params_snn, TransferOptions(**options))[0]


def init_snn_from_ann(
    params_ann: Any,
    params_snn: Any,
    *,
    block_map: BlockMap = "first",
    copy_shortcut: bool = False,
    copy_head: bool = False,
    strict: bool = True,
    return_report: bool = False,
) -> Any:
    """A copy of ``params_snn`` initialized from ``params_ann`` by IDSNN's rule (module doc).

    Args:
      params_ann: source tree, ``variables["params"]`` or a whole variables dict (then BN
        running statistics in ``batch_stats`` are mapped too). Any ResNet of this layout.
      params_snn: target tree of the same kind; its structure, shapes and dtypes are kept.
      block_map: "first" (``min(j, d - 1)``, the reference), "uniform" or a callable
        ``(stage, j, d, n) -> int`` (stage numbered from 1 as in ``stage1``, j the target block,
        d and n the source and target block counts of that stage).
      copy_shortcut: also map shortcut projections from the mapped source block (kept when
        that block has none). Off by default: the reference leaves them at their fresh init.
      copy_head: also map the head; needs the same number of classes, its input axis is
        mapped cyclically. Off by default, as in the reference.
      strict: raise ValueError on leaves that cannot be mapped (kernel spatial shapes or
        classes that differ, a source leaf that is missing); with False they are kept and
        reported.
      return_report: return ``(tree, TransferReport)`` instead of the tree (not under
        ``jit``: there, call ``transfer_report`` outside for the same report).

    Leaves kept at the target's value (returned as the very same arrays): shortcut
    projections and head unless asked for, conv2/bn2 of a basic block fed by a bottleneck
    block (no counterpart; not an error), paths outside the ResNet layout, and with
    ``strict=False`` leaves that cannot be mapped. Nothing is modified in place; a copied
    leaf whose shape and dtype already match is the source's (immutable) array itself.
    """
    options = TransferOptions(block_map, copy_shortcut, copy_head, strict)
    report, ops, treedef = _plan(params_ann, params_snn, options)
    targets = jax.tree_util.tree_leaves(params_snn)
    leaves = [t if op is None else _map_leaf(*op, t) for op, t in zip(ops, targets, strict=True)]
    tree = jax.tree_util.tree_unflatten(treedef, leaves)
    return (tree, report) if return_report else tree
