"""The PyTorch baseline (`experiments/torch_reference.py`, the reference code's structure) computes
what our Flax models compute: logits in eval and train mode, BatchNorm running statistics, and
one SGD step with distillation (gradients and parameters), on the same weights.

Everything runs in float64 (inside `jax.enable_x64`, scoped to each test), so that no spike
flips between the two implementations through float32 rounding near the threshold; our model
still casts its logits (and the loss) to float32, hence tolerances around 1e-6.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util
from jax.sharding import PartitionSpec as P

from idsnn_jax import augment, input_pipeline, optim, steps
from idsnn_jax.datasets import DatasetInfo
from idsnn_jax.losses import idsnn_loss
from idsnn_jax.models import create_model, firing_rates, init_variables

torch = pytest.importorskip("torch")
import torch_reference as tr  # noqa: E402  (experiments/ is on pytest's pythonpath)

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane

WIDTH, T, B, H, CLASSES, LR = 0.0625, 2, 4, 8, 10, 0.05
INFO = DatasetInfo("random", CLASSES, (H, H, 3), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _flax_model(name: str, **kwargs):
    if name.startswith("spiking"):
        kwargs["time_steps"] = T
    return create_model(name, num_classes=CLASSES, width=WIDTH, dtype=jnp.float64, **kwargs)


def _torch_model(name: str, variables) -> torch.nn.Module:
    kwargs = {"time_steps": T} if name.startswith("spiking") else {}
    model = tr.create(name, num_classes=CLASSES, width=WIDTH, **kwargs).double()
    tr.load_flax_variables(model, variables)
    return model


def _flax_tree(model: torch.nn.Module, like: dict, grads: bool = False) -> dict:
    """The torch model's tensors (or their `.grad`s) as NumPy in the structure and layouts
    (HWIO kernels, (in, out) Dense) of the Flax variables `like`."""
    flat = {}
    for collection, tree in like.items():
        for path, _ in tr.leaves(tree):
            tensor = tr.torch_tensor(model, collection, path)
            array = (tensor.grad if grads else tensor).detach().numpy()
            if array.ndim == 4:
                array = array.transpose(2, 3, 1, 0)
            flat[(collection, *path)] = array.T if array.ndim == 2 else array
    return traverse_util.unflatten_dict(flat)


def _variables(model, seed: int) -> dict:
    """Float64 NumPy variables with random BN scales, biases and running statistics, so that
    spikes reach the last layer in eval mode too (at init they would not)."""
    variables = init_variables(model, INFO, seed)
    rng = np.random.default_rng(seed)
    draws = {
        "scale": lambda s: rng.uniform(0.4, 1.2, s),
        "bias": lambda s: rng.uniform(-0.1, 0.3, s),
        "mean": lambda s: rng.normal(0.0, 0.2, s),
        "var": lambda s: rng.uniform(0.02, 0.2, s),
    }
    flat = traverse_util.flatten_dict(variables)
    for path, value in flat.items():
        is_bn = any(p.startswith(("bn", "shortcut_bn")) for p in path)
        draw = draws[path[-1]] if is_bn else None
        flat[path] = draw(value.shape) if draw else np.asarray(value, np.float64)
    return traverse_util.unflatten_dict(flat)


def _nchw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))


def _assert_close(actual, expected, rtol: float = 1e-6, what: str = "") -> None:
    """Leafwise allclose with atol = rtol * max|expected| per leaf (zeros compare too)."""
    flat_a = traverse_util.flatten_dict(actual, sep="/")
    flat_e = traverse_util.flatten_dict(expected, sep="/")
    assert flat_a.keys() == flat_e.keys()
    for key, e in flat_e.items():
        e, a = np.asarray(e, np.float64), np.asarray(flat_a[key], np.float64)
        np.testing.assert_allclose(a, e, rtol=rtol, atol=rtol * np.abs(e).max(), err_msg=what + key)


def _bn_counts(model: torch.nn.Module) -> dict:
    """Hooks that record, per BN module (Flax path), the values per channel n of its input."""
    counts = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):

            def hook(mod, args, name=name):
                counts[name.replace(".", "/")] = args[0].numel() // args[0].shape[1]

            module.register_forward_pre_hook(hook)
    return counts


def _torch_running_var(old, flax_new, counts: dict) -> dict:
    """PyTorch's running variance from Flax's: the batch part unbiased by n / (n - 1)."""
    flat_old = traverse_util.flatten_dict(old, sep="/")
    out = {}
    for key, value in traverse_util.flatten_dict(flax_new, sep="/").items():
        if key.endswith("/var"):
            n = counts[key.rsplit("/", 1)[0]]
            value = 0.9 * flat_old[key] + (value - 0.9 * flat_old[key]) * n / (n - 1)
        out[key] = value
    return traverse_util.unflatten_dict(out, sep="/")


@pytest.mark.parametrize("name", ["spiking_resnet18", "resnet34"])
def test_logits_and_running_stats_match(name):
    model = _flax_model(name)
    variables = _variables(model, seed=1)
    torch_model = _torch_model(name, variables)
    images = np.random.default_rng(2).normal(size=(B, H, H, 3))
    counts = _bn_counts(torch_model)

    expected, inter = model.apply(
        variables, jnp.asarray(images), train=False, mutable=["intermediates"]
    )
    got = torch_model.eval()(_nchw(images)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)

    expected, new = model.apply(
        variables, jnp.asarray(images), train=True, mutable=["batch_stats", "intermediates"]
    )
    got = torch_model.train()(_nchw(images)).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    want = _torch_running_var(variables["batch_stats"], new["batch_stats"], counts)
    got = _flax_tree(torch_model, {"batch_stats": want})["batch_stats"]
    _assert_close(got, want, 1e-9, "batch_stats/")

    if name.startswith("spiking"):  # the comparison means something only if spikes get through
        rate = firing_rates(inter["intermediates"])["stage4/block1/act2"]
        train_rate = firing_rates(new["intermediates"])["stage4/block1/act2"]
        assert 0.02 < float(rate.mean()) < 0.98 and 0.02 < float(train_rate.mean()) < 0.98


def test_sgd_step_with_distillation_matches():
    """One torch SGD step (CE + KD against the frozen teacher) vs jax.grad of our loss and vs
    `idsnn_jax.steps`' train step (no augmentation): gradients, parameters, BN statistics."""
    student, teacher = _flax_model("spiking_resnet18"), _flax_model("resnet18")
    s_vars, t_vars = _variables(student, seed=3), _variables(teacher, seed=4)
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, (B, H, H, 3), dtype=np.uint8)
    labels = rng.integers(0, CLASSES, B)
    images = np.asarray(input_pipeline.normalize(jnp.asarray(pixels), INFO), np.float64)

    t_student, t_teacher = (
        _torch_model("spiking_resnet18", s_vars),
        _torch_model("resnet18", t_vars),
    )
    counts = _bn_counts(t_student)
    torch_loss = tr.make_torch_step(t_student, t_teacher, lr=LR)(
        _nchw(images), torch.from_numpy(labels)
    )
    torch_grads = _flax_tree(t_student, {"params": s_vars["params"]}, grads=True)
    torch_after = _flax_tree(t_student, s_vars)

    def loss_fn(params):
        logits, new = student.apply(
            {"params": params, "batch_stats": s_vars["batch_stats"]},
            jnp.asarray(images),
            train=True,
            mutable=["batch_stats"],
        )
        teacher_logits = teacher.apply(t_vars, jnp.asarray(images), train=False)
        return idsnn_loss(logits, teacher_logits, jnp.asarray(labels)), new

    grads, _ = jax.jit(jax.grad(loss_fn, has_aux=True))(s_vars["params"])
    _assert_close(torch_grads["params"], grads, 1e-5, "grad/")

    # The training step itself, on one device, with augmentation switched off.
    mesh = steps.create_mesh(jax.devices()[:1])
    tx, _ = optim.create_optimizer(optim.OptimizerOptions(learning_rate=LR), 1, 1)
    step = steps.make_train_step(
        _flax_model("spiking_resnet18", bn_axis_name=steps.AXIS),
        tx,
        INFO,
        teacher=teacher,
        augment=augment.AugmentOptions(crop_padding=0, flip=False),
    )
    state = steps.replicate(steps.create_train_state(s_vars, tx, 0), mesh)
    batch = steps.shard_batch({"image": pixels, "label": labels.astype(np.int32)}, mesh)
    train_fn = steps.shard(step, mesh, (P(), P(steps.AXIS), P()), donate=(0,))
    state, metrics = train_fn(state, batch, steps.replicate(t_vars, mesh))
    np.testing.assert_allclose(float(torch_loss), float(metrics["loss"]), rtol=1e-6)
    delta = lambda after: jax.tree.map(np.subtract, after, s_vars["params"])  # noqa: E731
    _assert_close(delta(torch_after["params"]), delta(state.params), 1e-5, "update/")
    # The step normalizes the uint8 images in float32 inside its jit, which may round an ulp
    # away from the eager `normalize` above: statistics agree to float32 precision here.
    want = _torch_running_var(s_vars["batch_stats"], state.batch_stats, counts)
    _assert_close(torch_after["batch_stats"], want, 1e-6, "batch_stats/")


def test_load_flax_variables_rejects_wrong_shapes_and_gaps():
    model = tr.create("spiking_resnet18", num_classes=CLASSES, width=WIDTH, time_steps=T)
    head = {"kernel": np.zeros((32, CLASSES + 1)), "bias": np.zeros(CLASSES + 1)}
    with pytest.raises(ValueError, match="params/head/kernel"):
        tr.load_flax_variables(model, {"params": {"head": head}})
    head = {"kernel": np.zeros((32, CLASSES)), "bias": np.zeros(CLASSES)}
    with pytest.raises(ValueError, match="not set .*stem.conv.layer.weight"):
        tr.load_flax_variables(model, {"params": {"head": head}})
