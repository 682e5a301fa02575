"""PyTorch baseline in the structure of the reference code (tdBN / IDSNN), for timing and for a
numerical cross-check of the Flax models.

The spiking network is written the way the reference PyTorch code writes it, not the way this
project does: activations are `(B, C, H, W, T)` with time last, every conv (and the pooling)
runs once per time step in a Python loop (`tdLayer`), tdBN is an `nn.BatchNorm3d` over that
5-D tensor (statistics over B, H, W, T; scale initialized to v_th), and the LIF neuron is a
Python loop over t. `load_flax_variables` copies this project's Flax variables into these
modules, so the two implementations can be compared on the same weights
(`tests/test_torch_reference.py`) and timed side by side (`experiments/benchmark.py`).

One known difference, kept because it is PyTorch's (and the reference's) semantics: BatchNorm's
running variance is updated with the unbiased batch variance (factor n / (n - 1), n = the
number of values per channel), where Flax uses the biased one. Normalization itself uses the
biased variance in both.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class SpikeFn(torch.autograd.Function):
    """Heaviside `x > 0` (x = u - v_th) with the STBP rectangle surrogate 1/(2a) on |x| < a."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, width: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.width = width
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        window = (x.abs() < ctx.width).to(grad.dtype) / (2.0 * ctx.width)
        return grad * window, None


class LIFSpike(nn.Module):
    """Multi-step LIF over the last (time) axis of `(B, ..., T)` currents -> spikes.

    `u[t] = decay * u[t-1] * (1 - s[t-1].detach()) + x[t]`, `s[t] = u[t] > v_th`. As in the
    reference, the potential starts as float32 zeros (float64 for float64 input), whatever
    the compute dtype under autocast.
    """

    def __init__(self, decay: float = 0.25, v_th: float = 0.5, surrogate_width: float = 0.5):
        super().__init__()
        self.decay, self.v_th, self.width = decay, v_th, surrogate_width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        u = torch.zeros(x.shape[:-1], dtype=dtype, device=x.device)
        s = torch.zeros_like(u)
        spikes = []
        for t in range(x.shape[-1]):
            u = self.decay * u * (1.0 - s.detach()) + x[..., t]
            s = SpikeFn.apply(u - self.v_th, self.width)
            spikes.append(s)
        return torch.stack(spikes, dim=-1)


class tdLayer(nn.Module):  # noqa: N801 (the reference's name)
    """Runs `layer` once per time step on `(B, ..., T)`: `out[..., t] = layer(x[..., t])`."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.layer(x[..., t]) for t in range(x.shape[-1])], dim=-1)


class tdBatchNorm(nn.BatchNorm3d):  # noqa: N801 (the reference's name)
    """tdBN: one BatchNorm over `(B, C, H, W, T)`, statistics over B, H, W and T; scale
    initialized to `scale_init` (v_th), bias 0, eps 1e-5, momentum 0.1."""

    def __init__(self, channels: int, scale_init: float = 0.5):
        super().__init__(channels, eps=1e-5, momentum=0.1)
        nn.init.constant_(self.weight, scale_init)


class BasicBlock(nn.Module):
    """`act2(bn2(conv2(act1(bn1(conv1 x)))) + shortcut(x))`; the shortcut is conv1x1 + BN
    when the block is strided or changes channels. `layers` builds conv, norm and act."""

    def __init__(self, in_c: int, out_c: int, stride: int, layers: Layers):
        super().__init__()
        self.conv1 = layers.conv(in_c, out_c, 3, stride, 1)
        self.bn1, self.act1 = layers.norm(out_c), layers.act()
        self.conv2 = layers.conv(out_c, out_c, 3, 1, 1)
        self.bn2, self.act2 = layers.norm(out_c), layers.act()
        self.has_projection = stride != 1 or in_c != out_c
        if self.has_projection:
            self.shortcut_conv = layers.conv(in_c, out_c, 1, stride, 0)
            self.shortcut_bn = layers.norm(out_c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        shortcut = self.shortcut_bn(self.shortcut_conv(x)) if self.has_projection else x
        return self.act2(y + shortcut)


class Layers:
    """Conv / norm / activation factories: plain 2-D ones for the ANN, per-time-step ones
    (tdLayer, tdBN, LIF) for the SNN. Convs are bias-free, with symmetric padding."""

    def __init__(self, spiking: bool, **neuron: float):
        self.spiking, self.neuron = spiking, neuron  # LIFSpike's decay, v_th, surrogate_width
        self.v_th = neuron.get("v_th", 0.5)

    def conv(self, in_c: int, out_c: int, k: int, stride: int, pad: int) -> nn.Module:
        layer = nn.Conv2d(in_c, out_c, k, stride=stride, padding=pad, bias=False)
        return tdLayer(layer) if self.spiking else layer

    def norm(self, channels: int) -> nn.Module:
        return tdBatchNorm(channels, self.v_th) if self.spiking else nn.BatchNorm2d(channels)

    def act(self) -> nn.Module:
        return LIFSpike(**self.neuron) if self.spiking else nn.ReLU()


class ResNet(nn.Module):
    """CIFAR ResNet (3x3 stem, no max-pool). With `time_steps`, the Spiking ResNet: the image
    is repeated T times on a last axis, and the head averages over H, W, then over T, before
    the Linear layer. Module names follow the Flax paths (`stem.conv`, `stage1.block0.conv1`,
    `head`). Input images `(B, C, H, W)`; returns logits `(B, num_classes)`."""

    def __init__(
        self,
        stage_sizes: tuple[int, ...],
        num_classes: int,
        width: float = 1.0,
        time_steps: int | None = None,
        stem_padding: int = 1,
        **neuron: float,
    ):
        super().__init__()
        layers = Layers(time_steps is not None, **neuron)
        self.time_steps = time_steps
        channels = stage_width(64, width)
        self.stem = nn.Sequential(
            collections.OrderedDict(
                conv=layers.conv(3, channels, 3, 1, stem_padding),
                bn=layers.norm(channels),
                act=layers.act(),
            )
        )
        for i, num_blocks in enumerate(stage_sizes):
            out_c, blocks = stage_width(64 * 2**i, width), collections.OrderedDict()
            for j in range(num_blocks):
                stride = 2 if i > 0 and j == 0 else 1
                blocks[f"block{j}"] = BasicBlock(channels, out_c, stride, layers)
                channels = out_c
            setattr(self, f"stage{i + 1}", nn.Sequential(blocks))
        self.num_stages = len(stage_sizes)
        pool = nn.AdaptiveAvgPool2d(1)
        self.pool = tdLayer(pool) if self.time_steps else pool
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        if self.time_steps:  # direct encoding: (B, C, H, W) -> (B, C, H, W, T)
            x = images.unsqueeze(-1).repeat(1, 1, 1, 1, self.time_steps)
        x = self.stem(x)
        for i in range(self.num_stages):
            x = getattr(self, f"stage{i + 1}")(x)
        x = self.pool(x).flatten(1, 3)  # (B, C) or (B, C, T)
        if self.time_steps:
            x = x.mean(dim=-1)
        return self.head(x)


def stage_width(base: int, width: float) -> int:
    """Channels of a stage, as `idsnn_jax.models.resnet.stage_width`."""
    return max(1, round(base * width))


STAGE_SIZES = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}


def create(name: str, **kwargs: Any) -> ResNet:
    """`resnet18/34` (ANN: ReLU, BatchNorm2d with scale init 1) or `spiking_resnet18/34`
    (`time_steps` default 4; `decay`, `v_th`, `surrogate_width`), named as in
    `idsnn_jax.models`, e.g. `create("spiking_resnet18", num_classes=100, time_steps=4)`."""
    base = name.removeprefix("spiking_")
    if base not in STAGE_SIZES:
        known = [*STAGE_SIZES, *(f"spiking_{k}" for k in STAGE_SIZES)]
        raise ValueError(f"model={name!r} is unknown; known: {known}")
    if base != name:
        kwargs.setdefault("time_steps", 4)
    return ResNet(STAGE_SIZES[base], **kwargs)


# ----------------------------------------------------------------------------------------
# Flax variables <-> torch modules.

_TORCH_NAME = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_TORCH_STAT = {"mean": "running_mean", "var": "running_var"}


def leaves(tree: Mapping, prefix: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """(path, leaf) pairs of a nested dict of arrays, depth first."""
    for key, value in tree.items():
        if isinstance(value, Mapping):
            yield from leaves(value, (*prefix, key))
        else:
            yield (*prefix, key), value


def torch_tensor(model: nn.Module, collection: str, path: tuple[str, ...]) -> torch.Tensor:
    """The torch parameter or buffer that holds the Flax leaf `collection/path` (e.g.
    `params`, `('stage1', 'block0', 'conv1', 'kernel')`), in torch's layout."""
    module = model.get_submodule(".".join(path[:-1]))
    if isinstance(module, tdLayer):
        module = module.layer
    names = _TORCH_NAME if collection == "params" else _TORCH_STAT
    return getattr(module, names[path[-1]])


def _to_torch_layout(array: np.ndarray) -> np.ndarray:
    """Conv kernel HWIO -> OIHW, Dense kernel (in, out) -> (out, in), vectors unchanged."""
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    return array.T if array.ndim == 2 else array


def load_flax_variables(model: nn.Module, variables: Mapping) -> None:
    """Copies Flax `{'params', 'batch_stats'}` (NumPy or jax arrays) into `model` in place.

    Raises ValueError on a shape mismatch or on a torch parameter/buffer left unset.
    """
    unset = {n for n, _ in model.named_parameters()}
    unset |= {n for n, _ in model.named_buffers() if not n.endswith("num_batches_tracked")}
    slots = {id(t): n for n, t in [*model.named_parameters(), *model.named_buffers()]}
    for collection in ("params", "batch_stats"):
        for path, value in leaves(variables.get(collection, {})):
            target = torch_tensor(model, collection, path)
            array = _to_torch_layout(np.asarray(value, np.float64))
            if tuple(target.shape) != array.shape:
                raise ValueError(f"{collection}/{'/'.join(path)}: {array.shape} vs {target.shape}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(array).to(target.dtype))
            unset.discard(slots[id(target)])
    if unset:
        raise ValueError(f"torch tensors not set from the Flax variables: {sorted(unset)}")


# ----------------------------------------------------------------------------------------
# Train step.


def idsnn_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    tau: float,
) -> torch.Tensor:
    """`CE + alpha * tau^2 * KL(softmax(t / tau) || softmax(s / tau))`, batch means."""
    kl = F.kl_div(
        F.log_softmax(logits / tau, dim=-1),
        F.log_softmax(teacher_logits / tau, dim=-1),
        reduction="batchmean",
        log_target=True,
    )
    return F.cross_entropy(logits, labels) + alpha * tau**2 * kl


def make_torch_step(
    student: nn.Module,
    teacher: nn.Module | None = None,
    *,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 1e-4,
    kd_alpha: float = 0.3,
    kd_tau: float = 4.0,
    compile: bool = False,
    amp_dtype: torch.dtype | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`step(images (B, C, H, W) float, labels (B,) int64) -> loss`: one SGD step (PyTorch's
    momentum and weight decay) of the student on CE, or on `idsnn_loss` against the frozen
    teacher (eval mode, no grad). The student's `.grad`s are kept after the step.

    `compile` wraps the forward and loss in `torch.compile` (compiled on the first call);
    `amp_dtype` (e.g. torch.bfloat16) runs the forwards under `torch.autocast`. The loss is
    computed in float32 at least, as in `idsnn_jax.losses`.
    """
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    device_type = next(student.parameters()).device.type

    def loss_fn(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = student(images)
            if teacher is not None:
                with torch.no_grad():
                    teacher_logits = teacher(images)
        dtype = torch.promote_types(logits.dtype, torch.float32)
        if teacher is None:
            return F.cross_entropy(logits.to(dtype), labels)
        return idsnn_loss(logits.to(dtype), teacher_logits.to(dtype), labels, kd_alpha, kd_tau)

    if compile:
        loss_fn = torch.compile(loss_fn)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        student.train()
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(images, labels)
        loss.backward()
        opt.step()
        return loss.detach()

    return step
