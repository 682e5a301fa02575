"""PyTorch teachers in: a CIFAR ResNet built in PyTorch with the reference repository's
module names (and torchvision's), saved, imported, and compared with PyTorch in float64."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idsnn_jax import torch_import
from idsnn_jax.datasets import DatasetInfo
from idsnn_jax.models import create_model, init_variables

torch = pytest.importorskip("torch")
nn = torch.nn

INFO = DatasetInfo("tiny", 10, (8, 8, 3), (0.5,) * 3, (0.25,) * 3)


class _Basic(nn.Module):
    """The reference's BasicBlock: residual_function (conv, bn, relu, conv, bn), shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.residual_function = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        return torch.relu(self.residual_function(x) + self.shortcut(x))


class _ReferenceResNet(nn.Module):
    """The reference's CIFAR ResNet (`models/ResNet.py` names), widths 64 * width * 2^i."""

    def __init__(self, num_blocks, widths, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        cin = widths[0]
        for i, (n, cout) in enumerate(zip(num_blocks, widths, strict=True)):
            blocks = [
                _Basic(cin if j == 0 else cout, cout, (1 if i == 0 else 2) if j == 0 else 1)
                for j in range(n)
            ]
            setattr(self, f"conv{i + 2}_x", nn.Sequential(*blocks))
            cin = cout
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        for name in ("conv1", "conv2_x", "conv3_x", "conv4_x", "conv5_x"):
            x = getattr(self, name)(x)
        return self.fc(x.mean(dim=(2, 3)))


def _torchvision_names(state_dict):
    """The same tensors under torchvision's ResNet names (renamed here, independently)."""
    out = {}
    for key, value in state_dict.items():
        key = re.sub(r"^conv1\.0\.", "conv1.", key)
        key = re.sub(r"^conv1\.1\.", "bn1.", key)
        m = re.match(r"conv(\d)_x\.(\d+)\.(residual_function|shortcut)\.(\d)\.(.*)", key)
        if m:
            stage, block, part, index, leaf = m.groups()
            layer = f"layer{int(stage) - 1}.{block}"
            if part == "shortcut":
                key = f"{layer}.downsample.{index}.{leaf}"
            else:
                name = {"0": "conv1", "1": "bn1", "3": "conv2", "4": "bn2"}[index]
                key = f"{layer}.{name}.{leaf}"
        out[key] = value
    return out


def _trained_torch_teacher():
    torch.manual_seed(0)
    model = _ReferenceResNet((3, 4, 6, 3), (4, 8, 16, 32), 10).double()
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            model(torch.randn(6, 3, 8, 8, dtype=torch.float64) * 2 + 0.5)
    return model.eval()


def _flax_logits(variables, images):
    model = create_model("resnet34", num_classes=10, width=0.0625, dtype=jnp.float64)
    return np.asarray(model.apply(variables, jnp.asarray(images), train=False))


@pytest.mark.slow
@pytest.mark.parametrize("layout, suffix", [("reference", ".pt"), ("torchvision", ".safetensors")])
def test_imported_teacher_gives_pytorch_logits(tmp_path, layout, suffix):
    teacher = _trained_torch_teacher()
    state = {k: v for k, v in teacher.state_dict().items()}
    if layout == "torchvision":
        state = _torchvision_names(state)
    path = str(tmp_path / f"teacher{suffix}")
    if suffix == ".pt":
        torch.save({"module." + k: v for k, v in state.items()}, path)  # as saved under DDP
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    images = np.random.default_rng(0).normal(size=(5, 8, 8, 3))
    with torch.no_grad():
        expected = teacher(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    with jax.enable_x64(True):
        model = create_model("resnet34", num_classes=10, width=0.0625)
        target = jax.tree.map(lambda x: np.asarray(x, np.float64), init_variables(model, INFO, 0))
        variables = torch_import.load_torch_teacher(path, target)
        got = _flax_logits(variables, images)
    # Computed in float64 throughout; the model casts its logits to float32 at the very end.
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)


def _target(num_classes=10, width=0.0625):
    model = create_model("resnet34", num_classes=num_classes, width=width)
    return init_variables(
        model, DatasetInfo("t", num_classes, (8, 8, 3), (0.5,) * 3, (0.25,) * 3), 0
    )


@pytest.mark.slow
def test_mismatched_shape_names_the_key_and_both_shapes():
    state = _trained_torch_teacher().state_dict()
    with pytest.raises(ValueError) as err:
        torch_import.from_torch_state_dict(state, _target(num_classes=7))
    assert str(err.value) == (
        "state_dict key 'fc.bias' is (10,) (as params/head/bias: (10,)) but the "
        "model's params/head/bias is (7,)"
    )


def test_missing_and_unknown_keys_are_named():
    state = dict(_trained_torch_teacher().state_dict())
    del state["conv3_x.0.shortcut.1.running_var"]
    with pytest.raises(
        ValueError,
        match=r"no key 'conv3_x\.0\.shortcut\.1\.running_var' for "
        r"batch_stats/stage2/block0/shortcut_bn/var",
    ):
        torch_import.from_torch_state_dict(state, _target())
    state = dict(_trained_torch_teacher().state_dict())
    state["extra.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"no place for: \['extra\.weight'\]"):
        torch_import.from_torch_state_dict(state, _target())
    with pytest.raises(ValueError, match="unknown state_dict layout"):
        torch_import.from_torch_state_dict({"w": np.zeros(2)}, _target())


@pytest.mark.slow
def test_pipeline_takes_a_pytorch_teacher(data_fashion_mnist_dir, tmp_path):
    """`config.teacher.checkpoint=<file>.pth`: no teacher stage; the student is initialized
    from the PyTorch weights (same width: its stem kernel is PyTorch's, transposed)."""
    from idsnn_jax import pipeline
    from idsnn_jax import teacher as teacher_io
    from idsnn_jax.configs import tiny

    torch.manual_seed(1)
    teacher = _ReferenceResNet((2, 2, 2, 2), (4, 8, 16, 32), 10, in_channels=1).eval()
    path = tmp_path / "teacher.pth"
    torch.save(teacher.state_dict(), path)
    config = tiny.get_config()
    config.data_dir = str(data_fashion_mnist_dir)
    config.max_train_examples, config.max_test_examples = 32, 8
    config.teacher.checkpoint = str(path)
    ctx, plan = pipeline.create_context(config, str(tmp_path / "run"))  # checks the file
    ctx.writer.close()
    variables = teacher_io.load(plan.teacher, plan.data.dataset, plan.abstract_variables["teacher"])
    np.testing.assert_array_equal(
        variables["params"]["stem"]["conv"]["kernel"],
        teacher.conv1[0].weight.detach().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["stage4"]["block1"]["bn2"]["var"],
        teacher.conv5_x[1].residual_function[4].running_var.numpy(),
    )
    pipeline.run(config, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "teacher").exists()
    report = (tmp_path / "run" / "student_transfer_report.txt").read_text()
    assert "copied params/stem/conv/kernel" in report
    bad = tiny.get_config()
    bad.data_dir = str(data_fashion_mnist_dir)
    bad.teacher.checkpoint = str(path)
    bad.teacher.width = 0.125
    with pytest.raises(
        ValueError, match=r"teacher\.pth: state_dict key 'fc\.weight' is \(10, 32\)"
    ):
        pipeline.run(bad, str(tmp_path / "bad"))


def _teacher_file(tmp_path, dtype, suffix):
    """The trained teacher's state_dict in `dtype` (every floating tensor; the BN counters
    stay int64), saved as `suffix`; returns (path, the state_dict)."""
    state = {
        k: v.to(dtype) if v.is_floating_point() else v
        for k, v in _trained_torch_teacher().state_dict().items()
    }
    path = str(tmp_path / f"teacher{suffix}")
    if suffix == ".pt":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path, state


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_teacher_imports_as_float32(tmp_path, dtype, suffix):
    """A float16 or bfloat16 teacher: every floating tensor comes in as float32 with the
    values torch's own cast gives (exact: both are widenings)."""
    path, state = _teacher_file(tmp_path, getattr(torch, dtype), suffix)
    loaded = torch_import.load_state_dict(path)
    assert sorted(loaded) == sorted(state)
    for key, value in state.items():
        expected = value.float().numpy() if value.is_floating_point() else value.numpy()
        assert loaded[key].dtype == expected.dtype, key
        np.testing.assert_array_equal(loaded[key], expected, err_msg=key)
    variables = torch_import.load_torch_teacher(path, _target())
    np.testing.assert_array_equal(
        variables["params"]["stem"]["conv"]["kernel"],
        state["conv1.0.weight"].float().numpy().transpose(2, 3, 1, 0),
    )
    np.testing.assert_array_equal(
        variables["batch_stats"]["stage4"]["block2"]["bn2"]["var"],
        state["conv5_x.2.residual_function.4.running_var"].float().numpy(),
    )


@pytest.mark.parametrize(
    "version, cves",
    [("2.9.1", "CVE-2026-24747"), ("2.5.1+cu121", "CVE-2025-32434, CVE-2026-24747")],
)
def test_pickle_checkpoint_refused_below_torch_2_10(tmp_path, monkeypatch, version, cves):
    """Below torch 2.10, `torch.load(weights_only=True)` can run code from the file: a .pt is
    refused before torch.load is called, naming the version and the CVEs; safetensors files,
    which need no pickle, still load."""
    path, _ = _teacher_file(tmp_path, torch.float32, ".pt")
    safe, _ = _teacher_file(tmp_path, torch.float32, ".safetensors")
    monkeypatch.setattr(torch, "__version__", version)
    calls, torch_load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or torch_load(*a, **k))
    with pytest.raises(ValueError) as err:
        torch_import.load_torch_teacher(path, _target())
    message = str(err.value)
    assert message.startswith(f"{path}: refusing to torch.load a pickle checkpoint with torch ")
    assert f"torch {version}" in message and f"({cves})" in message, message
    assert "\n" not in message and message.count(path) == 1
    assert calls == []
    torch_import.load_torch_teacher(safe, _target())
    monkeypatch.setattr(torch, "__version__", "2.10.0")
    assert sorted(torch_import.load_state_dict(path)) == sorted(torch_import.load_state_dict(safe))
    assert len(calls) == 1
