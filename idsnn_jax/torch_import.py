"""PyTorch teachers in: a CIFAR ResNet's `state_dict` mapped onto our Flax variables.

Two layouts of names are understood, told apart by their keys:
- `reference`: the IDSNN repository's `models/ResNet.py` (`conv1.0` / `conv1.1` stem,
  `conv{2..5}_x.<j>.residual_function.<k>`, `...shortcut.{0,1}`, `fc`);
- `torchvision`: torchvision's ResNet with a CIFAR stem (`conv1`, `bn1`,
  `layer{1..4}.<j>.{conv,bn}<k>`, `...downsample.{0,1}`, `fc`).
A `module.` prefix (DistributedDataParallel) is dropped. Conv kernels go OIHW -> HWIO, the
FC weight (out, in) -> (in, out), BatchNorm weight/bias/running stats to scale/bias/mean/var;
float16/bfloat16 tensors come in as float32. Files are read without executing code:
safetensors, or `torch.load(weights_only=True)` with torch >= 2.10 only (older versions can
run code from a crafted pickle: CVE-2025-32434, CVE-2026-24747; they are refused).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

TORCH_SUFFIXES = (".pt", ".pth", ".safetensors")
_IGNORED = ("num_batches_tracked",)
_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STATS = {"mean": "running_mean", "var": "running_var"}
_STEM = {
    "reference": {"conv": "conv1.0", "bn": "conv1.1"},
    "torchvision": {"conv": "conv1", "bn": "bn1"},
}


def is_torch_file(path: str) -> bool:
    """Whether `path` names a PyTorch weights file (by its suffix)."""
    return path.endswith(TORCH_SUFFIXES)


# torch.load(weights_only=True) can run code from a crafted file before these versions.
_TORCH_LOAD_FIXES = (((2, 6), "CVE-2025-32434"), ((2, 10), "CVE-2026-24747"))


def check_torch_load_safe(path: str, version: str) -> None:
    """ValueError naming `path` unless torch `version` has every `_TORCH_LOAD_FIXES` fix
    (an unparsable version counts as unsafe)."""
    match = re.match(r"(\d+)\.(\d+)", version)
    have = tuple(map(int, match.groups())) if match else (0, 0)
    cves = [cve for fixed, cve in _TORCH_LOAD_FIXES if have < fixed]
    if cves:
        raise ValueError(
            f"{path}: refusing to torch.load a pickle checkpoint with torch {version}: before "
            f"2.10, torch.load(weights_only=True) can run code from the file ({', '.join(cves)}); "
            "upgrade torch (pip install 'torch>=2.10') or give the weights as .safetensors."
        )


def _to_numpy(tensor: Any) -> np.ndarray:
    """A torch tensor as a NumPy array; float16/bfloat16 widened to float32 (exact) in torch,
    since NumPy has no bfloat16. Float64 stays: the model's leaves decide the final dtype."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.element_size() < 4:
        tensor = tensor.float()
    return tensor.numpy()


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """The tensors of a `.pt`/`.pth` state_dict (also one nested under 'state_dict', 'model'
    or 'net') or of a `.safetensors` file, as NumPy arrays (float16/bfloat16 as float32).

    A `.safetensors` file holds raw tensors only. A `.pt`/`.pth` is a pickle: it is read with
    `torch.load(weights_only=True)`, and only with torch >= 2.10 (`check_torch_load_safe`)."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return {k: _to_numpy(v) for k, v in load_file(path).items()}
    check_torch_load_safe(path, str(torch.__version__))
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "net"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise ValueError(f"{path}: expected a state_dict, found a {type(loaded).__name__}")
    return {k: _to_numpy(v) for k, v in loaded.items() if isinstance(v, torch.Tensor)}


def detect_layout(keys: list[str]) -> str:
    """'reference' or 'torchvision' from the state_dict's key names."""
    if any(k.startswith("conv2_x.") for k in keys):
        return "reference"
    if any(k.startswith("layer1.") for k in keys):
        return "torchvision"
    raise ValueError(
        f"unknown state_dict layout (keys {keys[:4]}...): expected the IDSNN reference "
        "ResNet (conv2_x.*) or a torchvision-style ResNet (layer1.*)"
    )


def torch_module(path: tuple[str, ...], layout: str) -> str:
    """The PyTorch module name of our module at `path` (e.g. ('stage1', 'block0', 'bn2'))."""
    if path[0] == "head":
        return "fc"
    if path[0] == "stem":
        return _STEM[layout][path[1]]
    stage, block, layer = int(path[0][len("stage") :]), int(path[1][len("block") :]), path[2]
    if layout == "torchvision":
        prefix = f"layer{stage}.{block}"
        short = {"shortcut_conv": "downsample.0", "shortcut_bn": "downsample.1"}
        return f"{prefix}.{short.get(layer, layer)}"
    prefix = f"conv{stage + 1}_x.{block}"
    if layer.startswith("shortcut"):
        return f"{prefix}.shortcut.{0 if layer == 'shortcut_conv' else 1}"
    kind, k = re.fullmatch(r"(conv|bn)(\d)", layer).groups()
    return f"{prefix}.residual_function.{3 * (int(k) - 1) + (kind == 'bn')}"


def _to_flax(name: str, value: np.ndarray) -> np.ndarray:
    """A PyTorch tensor in our layout: OIHW conv -> HWIO, (out, in) linear -> (in, out)."""
    if value.ndim == 4:
        return value.transpose(2, 3, 1, 0)
    if value.ndim == 2 and name.endswith("weight"):
        return value.T
    return value


def from_torch_state_dict(
    state_dict: Mapping[str, Any], variables: dict[str, Any], layout: str | None = None
) -> dict[str, Any]:
    """`variables` ({'params', 'batch_stats'} of an ANN ResNet) filled from `state_dict`.

    Every leaf of `variables` must find its tensor with the same shape after the layout
    change, and every tensor must be used (running-count buffers aside); otherwise a
    ValueError names the key, our tree path and both shapes. Leaves keep their dtype.
    """
    tensors = {re.sub(r"^module\.", "", k): np.asarray(v) for k, v in state_dict.items()}
    layout = layout or detect_layout(list(tensors))
    if layout not in _STEM:
        raise ValueError(f"layout={layout!r} is unknown; choose one of {sorted(_STEM)}")
    used: set[str] = set()
    out = {}
    for collection in ("params", "batch_stats"):
        flat = traverse_util.flatten_dict(variables.get(collection, {}))
        filled = {}
        for path, leaf in flat.items():
            leaf_names = _LEAF if collection == "params" else _STATS
            key = f"{torch_module(path[:-1], layout)}.{leaf_names[path[-1]]}"
            where = "/".join((collection, *path))
            if key not in tensors:
                raise ValueError(f"state_dict has no key {key!r} for {where} ({layout} layout)")
            value = _to_flax(key, tensors[key])
            if value.shape != tuple(leaf.shape):
                raise ValueError(
                    f"state_dict key {key!r} is {tuple(tensors[key].shape)} (as {where}: "
                    f"{value.shape}) but the model's {where} is {tuple(leaf.shape)}"
                )
            filled[path] = value.astype(leaf.dtype)
            used.add(key)
        out[collection] = traverse_util.unflatten_dict(filled)
    unused = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED))
    if unused:
        raise ValueError(f"state_dict keys the model has no place for: {unused[:5]}")
    return out


def load_torch_teacher(path: str, variables: dict[str, Any]) -> dict[str, Any]:
    """`from_torch_state_dict` of the file at `path`; errors start with the file's path."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such PyTorch weights file")
    state_dict = load_state_dict(path)  # its errors name `path` already
    try:
        return from_torch_state_dict(state_dict, variables)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
