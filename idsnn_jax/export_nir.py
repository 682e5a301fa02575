"""Spiking ResNets out to NIR (the Neural Intermediate Representation, package `nir`).

`export_nir(model, variables, image_shape)` turns a trained Spiking ResNet (standard or SEW,
basic or bottleneck blocks) in eval mode into a `nir.NIRGraph` that neuromorphic toolchains
read (`nir.write` / `nir.read`). The CLI does it for a run's best checkpoint:
`python -m idsnn_jax.export_nir --workdir=RUN --out=model.nir [--stage=student|baseline]`.
NIR has no BatchNorm, so each tdBN (its running statistics, eps 1e-5) is folded into the
conv before it: one `nir.Conv2d` with a bias. Arrays are float32 (`dtype` to change it).

How to read the graph (also in its metadata):
  - Channels first, no batch axis in NIR's shapes (consumers add a leading one). The `input`
    node takes one normalized image (C, H, W) (dataset mean/std applied); direct encoding
    feeds the same image at each of the `time_steps` steps, of `dt` each.
  - A node's input is the sum of its predecessors' outputs at the same step (no delays).
    Residual additions are edges: a block's last LIF node has two predecessors, the branch
    (conv+BN) and the shortcut (the block input, or the folded 1x1 projection). In a SEW
    block the sum comes after the LIF, so the block's output is a set of nodes whose spikes
    every consumer receives.
  - Each step, the nodes run in topological order. LIF and IF nodes are stepped by forward
    Euler at `dt`, fire z = v > v_threshold, then reset v <- v_reset where z; their
    parameters (`nir_neurons`) make that the model's neuron, in the conventions snnTorch and
    Norse read.
  - The head is AvgPool2d over the whole map -> Flatten (dims -3..-1, so a batch axis in
    front stays) -> Affine, so `output` gives per-step logits. NIR cannot express the mean
    over time: the model's logits are the mean of `output` over the `time_steps` steps (the
    Affine commutes with it, so this is exact).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping
from typing import Any

import nir
import numpy as np
from absl import app, flags, logging

from idsnn_jax.models.resnet import BN_EPSILON, BasicBlock, Bottleneck, ResNet
from idsnn_jax.models.spiking_resnet import LIF
from idsnn_jax.nir_neurons import neuron_metadata, neuron_node

# Block class -> (convs in its main branch, the 1-based index of the one carrying the stride).
_BLOCKS = {BasicBlock: (2, 1), Bottleneck: (3, 2)}


@dataclasses.dataclass(frozen=True)
class _Value:
    """An activation in the graph: the nodes whose outputs sum to it, and its shape ((C, H, W)
    for a map, (N,) for a vector)."""

    sources: tuple[str, ...]
    shape: tuple[int, ...]

    def __add__(self, other: _Value) -> _Value:
        if self.shape != other.shape:
            raise ValueError(f"cannot add activations of shapes {self.shape} and {other.shape}")
        return _Value(self.sources + other.sources, self.shape)


@dataclasses.dataclass
class _GraphBuilder:
    """Nodes and edges of the graph being exported, and how to build each layer."""

    decay: float
    v_th: float
    dtype: Any
    nodes: dict[str, nir.NIRNode] = dataclasses.field(default_factory=dict)
    edges: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def add(
        self, name: str, node: nir.NIRNode, inputs: _Value | None, shape: tuple[int, ...]
    ) -> _Value:
        """Adds `node`, fed by every source of `inputs`; returns its output, of `shape`."""
        self.nodes[name] = node
        self.edges += [(src, name) for src in (inputs.sources if inputs else ())]
        return _Value((name,), tuple(int(d) for d in shape))

    def conv_bn(
        self,
        name: str,
        conv: Mapping,
        bn: Mapping,
        stats: Mapping,
        x: _Value,
        *,
        stride: int,
        padding: int,
    ) -> _Value:
        """A bias-free conv (HWIO kernel) followed by eval-mode BN, as one `nir.Conv2d`."""
        weight, bias = fold_batch_norm(conv["kernel"], bn, stats, self.dtype)
        node = nir.Conv2d(
            input_shape=x.shape[1:],
            weight=weight,
            stride=stride,
            padding=padding,
            dilation=1,
            groups=1,
            bias=bias,
        )
        return self.add(name, node, x, node.output_type["output"])

    def lif(self, name: str, x: _Value) -> _Value:
        """A LIF layer over `x` (`nir_neurons.neuron_node`: nir.LIF, or nir.IF at decay 1)."""
        return self.add(name, neuron_node(self.decay, self.v_th, x.shape, self.dtype), x, x.shape)


def fold_batch_norm(
    kernel: Any, bn: Mapping, stats: Mapping, dtype: Any = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """(weight (O, I, kh, kw), bias (O,)) of `BN(conv(x, kernel))` in eval mode.

    BN(y) = (y - mean) * s + beta with s = scale / sqrt(var + eps), per output channel, so the
    folded conv has weight `kernel * s` (transposed from HWIO to NIR's OIHW) and bias
    `beta - mean * s`. Computed in float64, returned in `dtype`.
    """
    f64 = lambda a: np.asarray(a, np.float64)
    s = f64(bn["scale"]) / np.sqrt(f64(stats["var"]) + BN_EPSILON)
    weight = np.transpose(f64(kernel), (3, 2, 0, 1)) * s[:, None, None, None]
    bias = f64(bn["bias"]) - f64(stats["mean"]) * s
    return weight.astype(dtype), bias.astype(dtype)


def _neuron(model: ResNet) -> tuple[float, float]:
    """(decay, v_th) of a spiking ResNet's LIF layers; ValueError for any other model."""
    act = model.act() if isinstance(model, ResNet) else None
    if not isinstance(act, LIF):
        raise ValueError(f"{type(model).__name__} is not a spiking ResNet (no LIF activation)")
    if model.block_cls not in _BLOCKS:
        raise ValueError(f"block_cls={model.block_cls.__name__} has no NIR export")
    return float(act.decay), float(act.v_th)


def _block(
    g: _GraphBuilder,
    name: str,
    params: Mapping,
    stats: Mapping,
    x: _Value,
    *,
    strides: int,
    block_cls: type,
    sew: bool,
) -> _Value:
    """One residual block (`resnet.BasicBlock` or `Bottleneck`) on `x`; returns its output."""
    num_convs, strided = _BLOCKS[block_cls]
    y = x
    for i in range(1, num_convs + 1):
        conv, bn = f"conv{i}", f"bn{i}"
        kernel_size = params[conv]["kernel"].shape[0]
        y = g.conv_bn(
            f"{name}.{conv}",
            params[conv],
            params[bn],
            stats[bn],
            y,
            stride=strides if i == strided else 1,
            padding=kernel_size // 2,
        )
        if i < num_convs:
            y = g.lif(f"{name}.act{i}", y)
    shortcut = x
    if "shortcut_conv" in params:  # the model's projection rule, read off its parameters
        shortcut = g.conv_bn(
            f"{name}.shortcut_conv",
            params["shortcut_conv"],
            params["shortcut_bn"],
            stats["shortcut_bn"],
            x,
            stride=strides,
            padding=0,
        )
        if sew:
            shortcut = g.lif(f"{name}.shortcut_act", shortcut)
    last = f"{name}.act{num_convs}"
    return g.lif(last, y) + shortcut if sew else g.lif(last, y + shortcut)


def _head(g: _GraphBuilder, params: Mapping, x: _Value) -> None:
    """Global average over (H, W) -> Flatten -> Affine (the Dense) -> `output`, per step."""
    channels, height, width = x.shape
    window = np.array([height, width])
    pool = nir.AvgPool2d(kernel_size=window, stride=window, padding=np.array([0, 0]))
    x = g.add("head.avgpool", pool, x, (channels, 1, 1))
    # Dims counted from the end: torch's Flatten(-3, -1) keeps a leading batch axis.
    flat = nir.Flatten(input_type={"input": np.array([channels, 1, 1])}, start_dim=-3)
    x = g.add("head.flatten", flat, x, (channels,))
    kernel, bias = np.asarray(params["kernel"]), np.asarray(params["bias"])
    affine = nir.Affine(weight=kernel.T.astype(g.dtype), bias=bias.astype(g.dtype))
    x = g.add("head", affine, x, (kernel.shape[1],))
    g.add("output", nir.Output(output_type=np.array(x.shape)), x, x.shape)


def _metadata(model: ResNet, g: _GraphBuilder) -> dict[str, Any]:
    """What a reader needs beyond the nodes: time step, encoding, readout, step order."""
    return {
        "source": "idsnn_jax.export_nir",
        **neuron_metadata(g.decay, g.v_th),
        "time_steps": int(model.time_steps),
        "encoding": "direct: feed the same normalized (C, H, W) image at every time step",
        "readout": "the model's logits are the mean of output over the time_steps steps",
        "step_order": "each step, nodes in topological order, each on the sum of its "
        "predecessors' outputs; LIF/IF: integrate (Euler at dt), fire if v > v_threshold, reset",
    }


def export_nir(
    model: ResNet, variables: Mapping, image_shape: tuple[int, int, int], *, dtype: Any = np.float32
) -> nir.NIRGraph:
    """The eval-mode graph of a Spiking ResNet (see the module docstring for how to read it).

    Args:
      model: the Flax spiking ResNet (`create_model("spiking_resnet18", ...)`); its neuron,
        block type, stage sizes, stem padding, SEW setting and time steps are read from it.
      variables: its `{'params', 'batch_stats'}` (the running statistics are folded in).
      image_shape: one input image as (H, W, C), as in `datasets.DatasetInfo`.
      dtype: of every exported array (float32; float64 for exact comparisons).
    """
    decay, v_th = _neuron(model)
    params, stats = variables["params"], variables["batch_stats"]
    g = _GraphBuilder(decay, v_th, np.dtype(dtype))
    height, width, channels = image_shape
    shape = (channels, height, width)
    x = g.add("input", nir.Input(input_type=np.array(shape)), None, shape)
    stem, stem_stats = params["stem"], stats["stem"]
    x = g.conv_bn(
        "stem.conv",
        stem["conv"],
        stem["bn"],
        stem_stats["bn"],
        x,
        stride=1,
        padding=model.stem_padding,
    )
    x = g.lif("stem.act", x)
    for i, num_blocks in enumerate(model.stage_sizes):
        for j in range(num_blocks):
            stage, block = f"stage{i + 1}", f"block{j}"
            x = _block(
                g,
                f"{stage}.{block}",
                params[stage][block],
                stats[stage][block],
                x,
                strides=2 if i > 0 and j == 0 else 1,
                block_cls=model.block_cls,
                sew=model.sew,
            )
    _head(g, params["head"], x)
    return nir.NIRGraph(nodes=g.nodes, edges=g.edges, metadata=_metadata(model, g))


def export_run(workdir: str, out: str, stage: str = "student") -> nir.NIRGraph:
    """Exports the best checkpoint of `<workdir>/<stage>` (`resume.load_run`) to the NIR file
    `out`; returns the graph."""
    from idsnn_jax import resume  # the training stack, only for runs
    from idsnn_jax.datasets import dataset_info

    config, model, variables = resume.load_run(workdir, stage)
    graph = export_nir(model, variables, dataset_info(config.dataset).image_shape)
    nir.write(out, graph)
    return graph


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax and JAX are chatty at INFO
    values = flags.FLAGS
    try:
        graph = export_run(values.workdir, values.out, values.stage)
    except (ValueError, FileNotFoundError) as err:  # what every input check raises
        sys.exit("error: " + " ".join(line.strip() for line in str(err).splitlines()))
    print(f"wrote {values.out}: {len(graph.nodes)} nodes, {len(graph.edges)} edges")


if __name__ == "__main__":  # flags defined here: `idsnn_jax.main` owns --workdir on import
    flags.DEFINE_string("workdir", None, "A pipeline run's directory (holding config.json).")
    flags.DEFINE_string("out", None, "The NIR file to write, e.g. model.nir.")
    flags.DEFINE_enum("stage", "student", ["student", "baseline"], "The checkpoint to export.")
    flags.mark_flags_as_required(["workdir", "out"])
    app.run(main)
