"""NIR export: the exported graph, written and read back, run by a NumPy NIR interpreter
(`nir_interpreter`), gives the Flax model's eval logits (mean over time of the per-step
output) for standard, SEW and bottleneck Spiking ResNets; the CLI rebuilds a saved run.

Comparisons run in float64 (`jax.enable_x64`, float64 export): the folded BN and the NIR
Euler step round differently from the model, and in float32 a potential within rounding of
the threshold could flip a spike. BN statistics and affine parameters are random (`nir_students`)
and the firing rate of every layer is checked to lie strictly between 0 and 1, so folding,
spikes and resets all matter.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

nir = pytest.importorskip("nir")
import nir_interpreter  # noqa: E402  (tests/ is on sys.path)
from nir_students import random_variables  # noqa: E402

from idsnn_jax import plan, resume, steps  # noqa: E402
from idsnn_jax.checkpoints import StageCheckpoints, load_variables  # noqa: E402
from idsnn_jax.configs import tiny  # noqa: E402
from idsnn_jax.datasets import dataset_info  # noqa: E402
from idsnn_jax.export_nir import export_nir, export_run  # noqa: E402
from idsnn_jax.models import create_model, firing_rates, spiking_resnet  # noqa: E402
from idsnn_jax.models.resnet import Bottleneck  # noqa: E402
from idsnn_jax.neuron import lif_scan  # noqa: E402
from idsnn_jax.nir_neurons import IF_DT, LIF_DT  # noqa: E402

T, B, H, CLASSES = 2, 4, 8, 5
_KW = {"num_classes": CLASSES, "width": 0.0625, "time_steps": T, "dtype": jnp.float64}
CASES = {
    "standard": lambda: create_model("spiking_resnet18", **_KW),
    "sew": lambda: create_model("sew_resnet18", **_KW),
    # decay 1 exports nir.IF; stem padding 3 grows the maps (12x12 from 8x8).
    "bottleneck_if": lambda: spiking_resnet(
        (1, 1, 1, 1), Bottleneck, **_KW, decay=1.0, v_th=1.0, stem_padding=3
    ),
}


def _roundtrip(graph, tmp_path):
    path = os.path.join(tmp_path, "model.nir")
    nir.write(path, graph)
    return nir.read(path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_exported_graph_computes_the_model_logits(case, tmp_path):
    with jax.enable_x64(True):
        model = CASES[case]()
        images = jax.random.normal(jax.random.PRNGKey(1), (B, H, H, 3), jnp.float64)
        variables = random_variables(model, images, seed=2)
        evaluate = functools.partial(model.apply, train=False, mutable=["intermediates"])
        logits, state = jax.jit(evaluate)(variables, images)
        rates = {k: float(v.mean()) for k, v in firing_rates(state["intermediates"]).items()}
        graph = _roundtrip(export_nir(model, variables, (H, H, 3), dtype=np.float64), tmp_path)
    assert all(0 < r < 1 for r in rates.values()), rates
    lif_nodes = {k for k, n in graph.nodes.items() if isinstance(n, (nir.LIF, nir.IF))}
    assert lif_nodes == {k.replace("/", ".") for k in rates}
    assert graph.metadata["time_steps"] == T
    assert graph.metadata["dt"] == (IF_DT if case.endswith("_if") else LIF_DT)
    x = np.broadcast_to(np.asarray(images).transpose(0, 3, 1, 2), (T, B, 3, H, H))
    per_step = nir_interpreter.run(graph, x, dt=graph.metadata["dt"])
    np.testing.assert_allclose(per_step.mean(axis=0), logits, rtol=1e-4, atol=1e-5)


def test_lif_node_resets_then_decays():
    """An exported LIF node, stepped by the interpreter, spikes as `lif_scan` on currents for
    which the reset matters: without it, step 1 would fire too (0.25 * 0.6 + 0.4 > 0.5)."""
    with jax.enable_x64(True):
        model = create_model("spiking_resnet18", **_KW)
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, H, H, 3)))
    variables = jax.tree.map(lambda s: np.ones(s.shape), dict(shapes))
    node = export_nir(model, variables, (H, H, 3), dtype=np.float64).nodes["stem.act"]
    currents = [0.6, 0.4, 0.45, 0.0]
    v, spikes = np.zeros(node.r.shape), []
    for c in currents:
        v, s = nir_interpreter.neuron_step(node, v, np.full(v.shape, c), dt=LIF_DT)
        spikes.append(float(s.reshape(-1)[0]))
    assert spikes == [1.0, 0.0, 1.0, 0.0]
    assert spikes == lif_scan(jnp.array(currents), decay=0.25, v_th=0.5).tolist()


def test_non_spiking_model_is_refused():
    model = create_model("resnet18", num_classes=CLASSES, width=0.0625)
    with pytest.raises(ValueError, match="not a spiking ResNet"):
        export_nir(model, {}, (H, H, 3))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple:
    """A workdir as a pipeline run leaves it (config.json and a student checkpoint of the tiny
    config), with its student model and dataset info."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = tiny.get_config()
    with open(os.path.join(workdir, resume.CONFIG_FILE), "w") as f:
        json.dump(resume.config_record(config), f)
    info = dataset_info(config.dataset)
    model = plan.build_model(config, "student", info)
    rng = np.random.default_rng(0)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, *info.image_shape)))
    variables = {  # random values (variances positive), without the slow `model.init`
        k: jax.tree.map(lambda s: np.abs(rng.standard_normal(s.shape, np.float32)), shapes[k])
        for k in ("params", "batch_stats")
    }
    ckpt = StageCheckpoints(os.path.join(workdir, "student"))
    ckpt.save(1, steps.create_train_state(variables, optax.sgd(0.1), seed=0), {}, 0.5)
    ckpt.close()
    return workdir, model, info


def test_cli_exports_a_saved_run(tiny_run, tmp_path):
    workdir, model, info = tiny_run
    out = str(tmp_path / "model.nir")
    command = [sys.executable, "-m", "idsnn_jax.export_nir", f"--workdir={workdir}", f"--out={out}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    graph = nir.read(out)
    variables = load_variables(os.path.join(workdir, "student"))
    expected = export_nir(model, variables, info.image_shape)
    assert graph.nodes.keys() == expected.nodes.keys()
    for name in ("stem.conv", "stage2.block0.shortcut_conv", "head"):
        np.testing.assert_array_equal(graph.nodes[name].weight, expected.nodes[name].weight)
    assert tuple(graph.nodes["input"].input_type["input"]) == (1, 28, 28)


def test_missing_workdir_or_checkpoint_is_named(tiny_run, tmp_path):
    out = str(tmp_path / "model.nir")
    with pytest.raises(FileNotFoundError, match="no workdir"):
        export_run(str(tmp_path / "nope"), out)
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_run(str(tmp_path), out)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        export_run(tiny_run[0], out, stage="baseline")
