"""Independent NumPy references that the tests assert against, each written once.

A test that compares idsnn_jax with a reference checks the package against the method's
equations only if the reference shares nothing with the package: so these are plain NumPy in
float64 (loops where they read clearer), importing nothing from idsnn_jax. Keeping one copy of
each here means a test file never grows its own slightly different LIF or BatchNorm, and a
change of semantics is made, and reviewed, in one place.

Layouts are the models': images and feature maps NHWC, conv kernels HWIO, Dense kernels (in, out).
"""

from __future__ import annotations

import numpy as np

BN_EPS = 1e-5  # tdBN / BN epsilon (PyTorch's default)


def lif_forward(x: np.ndarray, decay: float = 0.25, v_th: float = 0.5):
    """Multi-step LIF over the leading time axis: ``x (T, ...) -> (u, s)``, both ``(T, ...)``.

    ``u[0] = x[0]``; ``u[t] = decay * u[t-1] * (1 - s[t-1]) + x[t]``; ``s[t] = u[t] > v_th``
    (strict), i.e. a hard reset to 0 after a spike.
    """
    x = np.asarray(x, np.float64)
    u, s = np.zeros_like(x), np.zeros_like(x)
    for t in range(x.shape[0]):
        u[t] = x[t] if t == 0 else decay * u[t - 1] * (1.0 - s[t - 1]) + x[t]
        s[t] = u[t] > v_th
    return u, s


def conv2d(x: np.ndarray, kernel: np.ndarray, stride: int = 1, pad: int | None = None):
    """Cross-correlation ``(N, H, W, Ci) x (kh, kw, Ci, Co) -> (N, Ho, Wo, Co)``, no bias.

    Symmetric zero padding of ``pad`` pixels on every side (PyTorch's ``padding=pad``), by
    default ``kh // 2``; ``Ho = (H + 2 pad - kh) // stride + 1``.
    """
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    n, h, w, _ = x.shape
    kh, kw, _, co = kernel.shape
    pad = kh // 2 if pad is None else pad
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    ho, wo = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, ho, wo, co))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + stride * ho : stride, j : j + stride * wo : stride, :]
            out += patch @ kernel[i, j]
    return out


def conv2d_vjp(x, kernel, g, stride: int = 1, pad: int | None = None):
    """Gradients ``(dx, dkernel)`` of ``sum(conv2d(x, kernel, stride, pad) * g)``, float64."""
    x, kernel, g = (np.asarray(a, np.float64) for a in (x, kernel, g))
    n, h, w, _ = x.shape
    kh, kw, _, _ = kernel.shape
    pad = kh // 2 if pad is None else pad
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dxp, dkernel = np.zeros_like(xp), np.zeros_like(kernel)
    ho, wo = g.shape[1:3]
    for i in range(kh):
        for j in range(kw):
            window = (
                slice(None),
                slice(i, i + stride * ho, stride),
                slice(j, j + stride * wo, stride),
            )
            dkernel[i, j] = np.einsum("nhwc,nhwd->cd", xp[window], g)
            dxp[window] += g @ kernel[i, j].T
    return dxp[:, pad : pad + h, pad : pad + w], dkernel


def moments(x: np.ndarray):
    """Per-channel mean and (biased) variance over every axis but the last."""
    x = np.asarray(x, np.float64)
    axes = tuple(range(x.ndim - 1))
    return x.mean(axis=axes), x.var(axis=axes)


def batch_norm(x, scale, bias, mean=None, var=None, eps: float = BN_EPS):
    """``(x - mean) / sqrt(var + eps) * scale + bias`` over the last (channel) axis.

    Train mode: leave ``mean`` and ``var`` out, and the batch's own statistics over all other
    axes are used (for time-folded activations ``(T*B, H, W, C)`` that is tdBN: over T, B, H, W).
    Eval mode: pass the running ``mean`` and ``var``.
    """
    x = np.asarray(x, np.float64)
    if mean is None and var is None:
        mean, var = moments(x)
    return (x - mean) / np.sqrt(np.asarray(var, np.float64) + eps) * scale + bias


def relu(x: np.ndarray) -> np.ndarray:
    return np.maximum(np.asarray(x, np.float64), 0.0)


def global_avg_pool(x: np.ndarray) -> np.ndarray:
    """``(N, H, W, C) -> (N, C)``: the mean over H and W."""
    return np.asarray(x, np.float64).mean(axis=(1, 2))


def dense(x: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """``x (N, in) @ kernel (in, out) + bias (out,)``."""
    return np.asarray(x, np.float64) @ np.asarray(kernel, np.float64) + bias


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """``z - logsumexp(z)`` along ``axis``, shifted by the max for stability."""
    z = np.asarray(z, np.float64)
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def cyclic(src: np.ndarray, shape: tuple[int, ...], axes: tuple[int, ...]) -> np.ndarray:
    """IDSNN's channel rule (cyclic "loop" interpolation) as tiling: ``src`` repeated along
    each of ``axes`` until it reaches ``shape[axis]``, then cut there, so
    ``out[..., i, ...] = src[..., i mod n, ...]``: a wider source is truncated, a narrower one
    tiled. Other axes must already match.
    """
    src = np.asarray(src)
    reps = [1] * src.ndim
    for axis in axes:
        reps[axis] = -(-shape[axis] // src.shape[axis])  # ceil
    tiled = np.tile(src, reps)
    return tiled[tuple(slice(0, shape[a]) if a in axes else slice(None) for a in range(src.ndim))]


def synaptic_events(x: np.ndarray, k: int, stride: int, pad: int, out_channels: int) -> np.ndarray:
    """Per row of x (N, H, W, C): sum over output positions and output channels of the input
    values in each k x k window (inside the image): a conv's SOPs for spike (count) inputs,
    its connections (MACs) for an all-ones input. Plain loops, per output position."""
    n, h, w, _ = x.shape
    out_h, out_w = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    events = np.zeros(n)
    for i in range(out_h):
        for j in range(out_w):
            for di in range(k):
                for dj in range(k):
                    r, c = i * stride - pad + di, j * stride - pad + dj
                    if 0 <= r < h and 0 <= c < w:
                        events += x[:, r, c, :].sum(axis=1)
    return events * out_channels


# --- Augmentations (idsnn_jax/augment.py) ---
# Geometry in float64. Pixel arithmetic in float32, deliberately: the ops are defined as float32
# then rounded half to even, and x * 0.1 at x = 15 is a tie in exact arithmetic, so only the same
# precision rounds every pixel the same way.


def cutout(image: np.ndarray, cy: int, cx: int, size: int) -> np.ndarray:
    """DeVries & Taylor's rule on image (H, W, C): zero rows max(cy - size // 2, 0) ..
    min(cy + size // 2, H) - 1 and the same columns around cx."""
    out = np.array(image)
    h, w = image.shape[:2]
    for y in range(h):
        for x in range(w):
            if cy - size // 2 <= y < cy + size // 2 and cx - size // 2 <= x < cx + size // 2:
                out[y, x] = 0
    return out


def _sample_nearest(image: np.ndarray, source) -> np.ndarray:
    """out[y, x] = image[round(sy), round(sx)] (half to even) for (sy, sx) = source(y, x),
    0 outside the image."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            sy, sx = (int(np.round(v)) for v in source(y, x))
            if 0 <= sy < h and 0 <= sx < w:
                out[y, x] = image[sy, sx]
    return out


def rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation about ((H - 1) / 2, (W - 1) / 2), counter-clockwise as displayed (row 0 on top,
    so a point right of the center moves up): output samples the input rotated back."""
    cy, cx = (image.shape[0] - 1) / 2, (image.shape[1] - 1) / 2
    t = np.deg2rad(degrees)
    return _sample_nearest(
        image,
        lambda y, x: (
            cy + np.cos(t) * (y - cy) + np.sin(t) * (x - cx),
            cx - np.sin(t) * (y - cy) + np.cos(t) * (x - cx),
        ),
    )


def shear_x(image: np.ndarray, s: float) -> np.ndarray:
    """Output (y, x) samples input (y, x + s (y - cy)): rows slide by s per row from the center."""
    cy = (image.shape[0] - 1) / 2
    return _sample_nearest(image, lambda y, x: (y, x + s * (y - cy)))


def shear_y(image: np.ndarray, s: float) -> np.ndarray:
    """Output (y, x) samples input (y + s (x - cx), x)."""
    cx = (image.shape[1] - 1) / 2
    return _sample_nearest(image, lambda y, x: (y + s * (x - cx), x))


def translate(image: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Content moves down by dy and right by dx pixels; the uncovered border is 0."""
    h, w = image.shape[:2]
    out = np.zeros_like(image)
    for y in range(h):
        for x in range(w):
            if 0 <= y - dy < h and 0 <= x - dx < w:
                out[y, x] = image[y - dy, x - dx]
    return out


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x), 0, 255).astype(np.uint8)


def brightness(image: np.ndarray, factor) -> np.ndarray:
    return _to_uint8(image.astype(np.float32) * np.float32(factor))


def contrast(image: np.ndarray, factor) -> np.ndarray:
    """Blend with the mean grey level: mean + factor (x - mean); grey 0.299 R + 0.587 G +
    0.114 B for RGB, the image itself for one channel."""
    x = image.astype(np.float32)
    if x.shape[-1] == 1:
        grey = x[..., 0]
    else:
        grey = 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]
    mean = np.float32(grey.astype(np.float64).mean())
    return _to_uint8(mean + np.float32(factor) * (x - mean))


def solarize(image: np.ndarray, threshold: int) -> np.ndarray:
    return np.where(image >= threshold, 255 - image, image).astype(np.uint8)


def posterize(image: np.ndarray, bits: int) -> np.ndarray:
    """Keeps the top `bits` bits of each uint8 pixel."""
    return (image // 2 ** (8 - bits) * 2 ** (8 - bits)).astype(np.uint8)


def trivial_augment_op(image: np.ndarray, name: str, m: float) -> np.ndarray:
    """The op `name` at magnitude m in [0, 1] on a uint8 image (H, W, C): signed parameters are
    (2 m - 1) * max (rotate 30 degrees, shear 0.3, translate 0.3 of the side, brightness and
    contrast factor 1 + that with max 0.9), solarize threshold round(256 (1 - m)), posterize
    8 - floor(4 m) bits."""
    m32 = np.float32(m)
    signed = float(2 * m - 1)
    factor = np.float32(1) + (np.float32(2) * m32 - np.float32(1)) * np.float32(0.9)
    h, w = image.shape[:2]
    ops = {
        "identity": lambda: image.copy(),
        "rotate": lambda: rotate(image, signed * 30),
        "shear_x": lambda: shear_x(image, signed * 0.3),
        "shear_y": lambda: shear_y(image, signed * 0.3),
        "translate_x": lambda: translate(image, 0, int(np.round(signed * 0.3 * w))),
        "translate_y": lambda: translate(image, int(np.round(signed * 0.3 * h)), 0),
        "brightness": lambda: brightness(image, factor),
        "contrast": lambda: contrast(image, factor),
        "solarize": lambda: solarize(image, int(np.round(np.float32(256) * (1 - m32)))),
        "posterize": lambda: posterize(image, 8 - int(np.floor(4 * m))),
    }
    return ops[name]()


def _flat_dict(tree: dict, prefix: str = "") -> dict:
    """{"a/b/c": leaf} of a nested dict."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        out.update(_flat_dict(v, key + "/") if isinstance(v, dict) else {key: v})
    return out


def resnet_forward(
    variables,
    images,
    *,
    stage_sizes,
    bottleneck=False,
    time_steps=1,
    lif=None,
    train=False,
    sew=False,
    stem_padding=1,
):
    """Float64 logits (B, classes) of a CIFAR ResNet, per LIF layer `(u, s)` each (T, B, ...),
    and in train mode `{bn path: (mean, var)}` of the batch statistics each BN used.

    `lif`: None for the ANN (ReLU), else `(decay, v_th)`. `train`: BN with the batch's
    statistics over every axis but the channel (tdBN: T*B, H, W), else the running ones.
    """
    params = {k: np.asarray(v, np.float64) for k, v in _flat_dict(variables["params"]).items()}
    stats = {k: np.asarray(v, np.float64) for k, v in _flat_dict(variables["batch_stats"]).items()}
    used, lif_layers, stats_used = set(), [], {}
    t, b = time_steps, images.shape[0]

    def get(tree, key):
        used.add(key)
        return tree[key]

    def conv_bn(h, block, conv, bn, stride=1, pad=None):
        h = conv2d(h, get(params, f"{block}/{conv}/kernel"), stride, pad)
        bn = f"{block}/{bn}"
        scale, bias = get(params, f"{bn}/scale"), get(params, f"{bn}/bias")
        if train:
            stats_used[bn] = moments(h)
            return batch_norm(h, scale, bias)
        return batch_norm(h, scale, bias, get(stats, f"{bn}/mean"), get(stats, f"{bn}/var"))

    def act(h):
        if lif is None:
            return relu(h)
        u, s = lif_forward(h.reshape(t, b, *h.shape[1:]), *lif)
        lif_layers.append((u, s))
        return s.reshape(h.shape)

    h = np.concatenate([np.asarray(images, np.float64)] * t)  # direct encoding, time-major
    h = act(conv_bn(h, "stem", "conv", "bn", pad=stem_padding))
    for i, num_blocks in enumerate(stage_sizes):
        for j in range(num_blocks):
            blk, stride = f"stage{i + 1}/block{j}", 2 if i > 0 and j == 0 else 1
            if bottleneck:
                y = act(conv_bn(h, blk, "conv1", "bn1"))
                y = act(conv_bn(y, blk, "conv2", "bn2", stride))
                y = conv_bn(y, blk, "conv3", "bn3")
            else:
                y = act(conv_bn(h, blk, "conv1", "bn1", stride))
                y = conv_bn(y, blk, "conv2", "bn2")
            shortcut = h
            if stride != 1 or h.shape[-1] != y.shape[-1]:
                shortcut = conv_bn(h, blk, "shortcut_conv", "shortcut_bn", stride, pad=0)
                shortcut = act(shortcut) if sew else shortcut
            h = act(y) + shortcut if sew else act(y + shortcut)
    features = global_avg_pool(h).reshape(t, b, -1).mean(axis=0)
    logits = dense(features, get(params, "head/kernel"), get(params, "head/bias"))
    unused = (set(params) | (set() if train else set(stats))) - used
    assert not unused, f"leaves the reference did not use: {sorted(unused)}"
    return logits, lif_layers, stats_used
