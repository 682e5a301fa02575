"""An exported NIR graph run by independent SNN frameworks, as they load it (snnTorch, Norse).

What the tests and `experiments/nir_agreement.py` compare with the model's eval logits; the
calls are the README's. Needs the `nir-consumers` extra (`pip install -e ".[nir-consumers]"`:
snntorch, norse, nirtorch, nir, beside a CPU torch).

  - snnTorch: `snntorch.import_nir.import_from_nir(graph)`, as shipped.
  - Norse: its node mapping (`norse.torch.utils.import_nir._import_norse_module`, at the
    graph's dt) under nirtorch's `nir_to_torch`, with nirtorch's own AvgPool2d. Norse 1.1.0's
    `from_nir` cannot run a ResNet: it builds the graph with nirtorch's deprecated `load`,
    whose executor visits nodes depth-first, so a projection shortcut reaches its block's sum
    one step late, and it maps no AvgPool2d.

Both return a `torch.fx.GraphModule`: `out, state = net(x_t, state)`, one call per time step,
x_t of shape (B, C, H, W) (the batch axis in front of NIR's shapes).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import io
from collections.abc import Mapping
from typing import Any

import nir
import numpy as np
import torch

CONSUMERS = ("snntorch", "norse")
_NEURONS = (nir.LIF, nir.IF)


def load_snntorch(graph: nir.NIRGraph) -> torch.nn.Module:
    """snnTorch's `import_from_nir` (it prints a line per LIF and rewrites the graph's edges:
    it gets a copy, and its prints are dropped)."""
    from snntorch.import_nir import import_from_nir

    with contextlib.redirect_stdout(io.StringIO()):
        return import_from_nir(copy.deepcopy(graph))


def load_norse(graph: nir.NIRGraph) -> torch.nn.Module:
    """Norse's node mapping at `graph.metadata['dt']` under `nirtorch.nir_to_torch`."""
    import nirtorch
    from norse.torch.utils.import_nir import _import_norse_module

    norse_node = functools.partial(_import_norse_module, dt=float(graph.metadata["dt"]))
    node_map = {t: norse_node for t in (nir.Conv2d, nir.Affine, nir.Flatten, *_NEURONS)}
    return nirtorch.nir_to_torch(graph, node_map)


LOADERS = {"snntorch": load_snntorch, "norse": load_norse}


def _reset(net: torch.nn.Module) -> None:
    """Zeroes the potentials that snnTorch keeps inside its neurons (`init_hidden=True`)."""
    for module in net.modules():
        if hasattr(module, "reset_mem"):
            module.reset_mem()


def run(
    net: torch.nn.Module, graph: nir.NIRGraph, images: np.ndarray, time_steps: int
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps a loaded graph on images (B, C, H, W), fed at each of `time_steps` steps.

    Returns the per-step outputs (T, B, K) and, per LIF/IF node, the spikes fired per example
    (B,) over all steps and neurons (counted by forward hooks on the consumer's modules).
    """
    layers = [name for name, node in graph.nodes.items() if isinstance(node, _NEURONS)]
    neurons = {name.replace(".", "_"): name for name in layers}  # nirtorch's module names
    counts = {name: np.zeros(len(images)) for name in neurons.values()}

    def count(name: str, _module, _inputs, output) -> None:
        spikes = output[0] if isinstance(output, tuple) else output
        counts[name] += spikes.detach().reshape(len(images), -1).sum(1).double().numpy()

    hooks = [
        module.register_forward_hook(functools.partial(count, neurons[key]))
        for key, module in net.named_modules()
        if key in neurons
    ]
    if len(hooks) != len(neurons):
        raise ValueError(f"found {len(hooks)} of the graph's {len(neurons)} neuron layers")
    _reset(net)
    x, state, outputs = torch.tensor(images, dtype=torch.float32), None, []
    try:
        with torch.no_grad():
            for _ in range(time_steps):
                out, state = net(x, state)
                outputs.append(out.double().numpy())
    finally:
        for hook in hooks:
            hook.remove()
    return np.stack(outputs), counts


def model_spikes(
    rates: Mapping[str, Any], graph: nir.NIRGraph, time_steps: int
) -> dict[str, np.ndarray]:
    """Per LIF node, the model's spikes per example (B,) over all steps and neurons, from its
    firing rates (`models.firing_rates`: `{'stage1/block0/act1': (B,), ...}`)."""
    spikes = {}
    for key, rate in rates.items():
        name = key.replace("/", ".")
        neurons = int(np.prod(graph.nodes[name].v_threshold.shape))
        spikes[name] = np.rint(np.asarray(rate, np.float64) * time_steps * neurons)
    return spikes


def agreement(
    logits: np.ndarray,
    per_step: np.ndarray,
    spikes: Mapping[str, np.ndarray],
    counts: Mapping[str, np.ndarray],
    atol: float = 1e-3,
) -> dict[str, float]:
    """How a consumer's run matches the model's.

    Args:
      logits: the model's eval logits (B, K).
      per_step: the consumer's outputs (T, B, K); their mean over T is its logits.
      spikes, counts: per LIF node, the model's and the consumer's spikes per example (B,).
      atol: the logit gap that counts as equal.

    Returns: `argmax` (share of examples with the same top class), `close` (share whose
    logits all lie within atol), `max_gap` (largest |logit difference|), `layers_equal`
    (share of LIF layers that fired the same number of spikes in all), `rate_gap` (largest
    relative difference of a layer's spike count, i.e. of its firing rate).
    """
    theirs = per_step.mean(axis=0)
    gap = np.abs(theirs - logits).max(axis=1)
    ours = {name: float(np.sum(spikes[name])) for name in spikes}
    diff = {name: abs(float(np.sum(counts[name])) - ours[name]) for name in spikes}
    return {
        "argmax": float(np.mean(theirs.argmax(axis=1) == logits.argmax(axis=1))),
        "close": float(np.mean(gap <= atol)),
        "max_gap": float(gap.max()),
        "layers_equal": float(np.mean([d == 0 for d in diff.values()])),
        "rate_gap": max(d / max(ours[name], 1.0) for name, d in diff.items()),
    }
