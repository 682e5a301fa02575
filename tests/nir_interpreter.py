"""A small NumPy interpreter of NIR graphs, written from NIR's node definitions, to check
`idsnn_jax.export_nir` against the Flax model without trusting either side's code.

Semantics (discrete time, step `dt`): each step every node runs once, in topological order,
on the sum of its predecessors' outputs at that step. LIF/IF nodes keep a potential v
(0 before the first step): integrate by forward Euler, fire z = v > v_threshold, reset
v = v_reset where z. Arrays carry a leading batch axis that NIR's shapes leave out.
Only the nodes the exporter emits are supported; any other raises NotImplementedError.
"""

from __future__ import annotations

import nir
import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def topological_order(graph: nir.NIRGraph) -> list[str]:
    """Node names with every node after all of its predecessors (Kahn's algorithm)."""
    indegree = {name: 0 for name in graph.nodes}
    for _, dst in graph.edges:
        indegree[dst] += 1
    ready = [name for name, d in indegree.items() if d == 0]
    order = []
    while ready:
        name = ready.pop()
        order.append(name)
        for src, dst in graph.edges:
            if src == name:
                indegree[dst] -= 1
                if indegree[dst] == 0:
                    ready.append(dst)
    if len(order) != len(graph.nodes):
        raise ValueError("the graph has a cycle")
    return order


def _pair(v) -> tuple[int, int]:
    a = np.broadcast_to(np.asarray(v), (2,))
    return int(a[0]), int(a[1])


def _conv2d(node: nir.Conv2d, x: np.ndarray) -> np.ndarray:
    """Cross-correlation (B, I, H, W) x (O, I, kh, kw) -> (B, O, H', W') plus bias."""
    if int(node.groups) != 1 or _pair(node.dilation) != (1, 1):
        raise NotImplementedError("Conv2d with groups or dilation")
    (ph, pw), (sh, sw) = _pair(node.padding), _pair(node.stride)
    kh, kw = node.weight.shape[2:]
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return np.einsum("bihwkl,oikl->bohw", windows, node.weight) + node.bias[:, None, None]


def _avg_pool2d(node: nir.AvgPool2d, x: np.ndarray) -> np.ndarray:
    """Mean over (kh, kw) windows, unpadded."""
    if _pair(node.padding) != (0, 0):
        raise NotImplementedError("AvgPool2d with padding")
    (kh, kw), (sh, sw) = _pair(node.kernel_size), _pair(node.stride)
    windows = sliding_window_view(x, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
    return windows.mean(axis=(-2, -1))


def _stateless(node: nir.NIRNode, x: np.ndarray) -> np.ndarray:
    """Output of a node without state, on its summed input x (B, ...)."""
    if isinstance(node, nir.Conv2d):
        return _conv2d(node, x)
    if isinstance(node, nir.AvgPool2d):
        return _avg_pool2d(node, x)
    if isinstance(node, nir.Flatten):
        return x.reshape((x.shape[0], *node.output_type["output"]))
    if isinstance(node, nir.Affine):
        return x @ node.weight.T + node.bias
    if isinstance(node, nir.Output):
        return x
    raise NotImplementedError(f"{type(node).__name__} nodes")


def neuron_step(node: nir.NIRNode, v: np.ndarray, x: np.ndarray, dt: float):
    """One step of a LIF or IF node from potential v on input x: (new v, spikes)."""
    if isinstance(node, nir.LIF):
        v = v + (dt / node.tau) * (node.v_leak - v + node.r * x)
    elif isinstance(node, nir.IF):
        v = v + dt * node.r * x
    else:
        raise NotImplementedError(f"{type(node).__name__} nodes")
    z = v > node.v_threshold
    return np.where(z, node.v_reset, v), z.astype(x.dtype)


def run(graph: nir.NIRGraph, inputs: np.ndarray, dt: float) -> np.ndarray:
    """Outputs (T, B, ...) of the graph's one Output for inputs (T, B, ...) of its one Input."""
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError(f"need one Input and one Output, got {[*graph.inputs, *graph.outputs]}")
    (input_name,), (output_name,) = graph.inputs, graph.outputs
    order = topological_order(graph)
    preds = {name: [src for src, dst in graph.edges if dst == name] for name in order}
    potentials: dict[str, np.ndarray] = {}
    outputs = []
    for x_t in inputs:
        values = {input_name: x_t}
        for name in order:
            if name == input_name:
                continue
            node, x = graph.nodes[name], sum(values[p] for p in preds[name])
            if isinstance(node, (nir.LIF, nir.IF)):
                v = potentials.get(name, np.zeros_like(x))
                potentials[name], values[name] = neuron_step(node, v, x, dt)
            else:
                values[name] = _stateless(node, x)
        outputs.append(values[output_name])
    return np.stack(outputs)
