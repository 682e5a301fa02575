"""The NIR export read by independent consumers (`idsnn_jax.nir_consumers`): snnTorch's
`import_from_nir` as shipped, and Norse's node mapping under nirtorch's `nir_to_torch`, run
the default (float32) export of tiny students on one batch of images. Their output, averaged
over the time steps, must be the Flax model's eval logits, and every LIF layer must fire the
model's number of spikes (to float32 rounding at the threshold). Standard, SEW, bottleneck
and IF (decay = 1) students.

The students (`nir_students`: random weights, BN statistics near the data's, every layer
firing) see 300 of sklearn's 8x8 digits; their head has no bias, so the logits come from
spikes alone. With CI set, a consumer that is not installed fails the test; elsewhere it skips.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest


def _consumer_package(name: str):
    """The installed package `name`; CI (which installs the nir-consumers extra) needs it."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


for _name in ("nir", "torch", "nirtorch", "snntorch", "norse"):
    _consumer_package(_name)

import nir  # noqa: E402
import torch  # noqa: E402
from nir_students import random_variables  # noqa: E402  (tests/ is on sys.path)
from sklearn.datasets import load_digits  # noqa: E402

from idsnn_jax import nir_consumers, plan, resume, steps  # noqa: E402
from idsnn_jax.checkpoints import StageCheckpoints  # noqa: E402
from idsnn_jax.configs import tiny  # noqa: E402
from idsnn_jax.datasets import dataset_info, load_split  # noqa: E402
from idsnn_jax.export_nir import export_nir  # noqa: E402
from idsnn_jax.input_pipeline import normalize  # noqa: E402
from idsnn_jax.models import create_model, firing_rates, spiking_resnet  # noqa: E402
from idsnn_jax.models.resnet import Bottleneck  # noqa: E402

T, IMAGES, CLASSES = 2, 300, 10
_KW = {"num_classes": CLASSES, "width": 0.0625, "time_steps": T}
CASES = {
    "standard": lambda: create_model("spiking_resnet18", **_KW),
    "sew": lambda: create_model("sew_resnet18", **_KW),
    "bottleneck": lambda: spiking_resnet((1, 1, 1, 1), Bottleneck, **_KW),
    "if": lambda: create_model("spiking_resnet18", **_KW, decay=1.0, v_th=1.0),
}
# What each consumer must reach (the bar): argmax agreement, share of images whose
# logits all lie within ATOL of the model's.
MIN_ARGMAX, MIN_CLOSE, ATOL = 0.99, 0.98, 1e-3
# Spikes a layer may gain or lose in all: float32 rounds the consumers' scaled potential and
# the model's apart, so a potential within ~1e-7 of the threshold may flip (none here; one in
# 300k on a trained student). A wrong convention moves thousands.
MAX_FLIPS = 2
_SNNTORCH_IF = pytest.mark.xfail(
    raises=TypeError,
    strict=True,
    reason="snnTorch 1.0.0 imports nir.IF as snn.Leaky(beta=0.9, init_hidden=False): leaky, "
    "and its (spk, mem) tuple reaches the next conv (jeshraghian/snntorch#416; fixed upstream "
    "by PRs #395 and #452, after 1.0.0)",
)
_MARKS = {("if", "snntorch"): _SNNTORCH_IF}
PAIRS = [
    pytest.param(case, consumer, marks=_MARKS.get((case, consumer), ()))
    for case in sorted(CASES)
    for consumer in nir_consumers.CONSUMERS
]


@dataclasses.dataclass(frozen=True)
class Student:
    graph: nir.NIRGraph  # the default export, written to a file and read back
    images: np.ndarray  # (B, C, H, W) float32, normalized
    logits: np.ndarray  # (B, K): the model's eval logits
    spikes: dict[str, np.ndarray]  # per LIF node: the model's spikes per image (B,)


def _digits() -> np.ndarray:
    """The first IMAGES of sklearn's digits, normalized, as (B, 8, 8, 1) float32."""
    x = load_digits().images[:IMAGES].astype(np.float32)
    return ((x - x.mean()) / x.std())[..., None]


@functools.cache
def _student(case: str) -> Student:
    model, images = CASES[case](), _digits()
    variables = random_variables(model, jnp.asarray(images[:64]), seed=2)
    variables = jax.tree.map(np.float32, variables)
    variables["params"]["head"]["bias"][:] = 0.0
    evaluate = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
    logits, state = evaluate(variables, jnp.asarray(images))
    graph = export_nir(model, variables, images.shape[1:])
    with tempfile.TemporaryDirectory() as folder:
        nir.write(os.path.join(folder, "model.nir"), graph)
        graph = nir.read(os.path.join(folder, "model.nir"))
    spikes = nir_consumers.model_spikes(firing_rates(state["intermediates"]), graph, T)
    for name, per_image in spikes.items():  # every layer fires, none always
        assert 0 < per_image.sum() < T * graph.nodes[name].v_threshold.size * IMAGES, name
    return Student(graph, images.transpose(0, 3, 1, 2), np.asarray(logits), spikes)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """torch on one thread: on 2 shared cores its 2 threads wait on each other (a run took 7 s
    on 2 threads, 0.2 s on 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(("case", "consumer"), PAIRS)
def test_consumer_gives_the_model_logits_and_spikes(case, consumer):
    student = _student(case)
    net = nir_consumers.LOADERS[consumer](student.graph)
    per_step, counts = nir_consumers.run(net, student.graph, student.images, T)
    assert per_step.shape == (T, IMAGES, CLASSES)  # the batch axis kept to the end
    found = nir_consumers.agreement(student.logits, per_step, student.spikes, counts, ATOL)
    print(f"{case} in {consumer}: {found}")  # the README's table (pytest -s)
    assert found["argmax"] >= MIN_ARGMAX, found
    assert found["close"] >= MIN_CLOSE, found
    flips = {n: abs(counts[n].sum() - student.spikes[n].sum()) for n in student.spikes}
    assert max(flips.values()) <= MAX_FLIPS, flips


def test_agreement_script_measures_a_saved_run(tmp_path, data_fashion_mnist_dir):
    """experiments/nir_agreement.py on a saved run of the tiny config (a random student, the
    tiny IDX test set): one row per consumer, every image and layer in agreement."""
    import nir_agreement  # experiments/ is on pytest's pythonpath

    config = tiny.get_config()
    config.data_dir = str(data_fashion_mnist_dir)
    with open(tmp_path / resume.CONFIG_FILE, "w") as f:
        json.dump(resume.config_record(config), f)
    info = dataset_info(config.dataset)
    images = normalize(load_split(config.dataset, "test", config.data_dir).images, info)
    model = plan.build_model(config, "student", info)
    unsynced = model.clone(bn_axis_name=None)  # train-mode BN outside the mesh
    variables = jax.tree.map(np.float32, random_variables(unsynced, images, seed=0))
    ckpt = StageCheckpoints(str(tmp_path / "student"))
    ckpt.save(1, steps.create_train_state(variables, optax.sgd(0.1), seed=0), {}, 0.5)
    ckpt.close()
    rows = nir_agreement.measure(str(tmp_path), "student", num_images=len(images), batch=8)
    assert [r["consumer"] for r in rows] == list(nir_consumers.CONSUMERS)
    for row in rows:
        assert row["images"] == len(images)
        assert row["argmax"] == row["close"] == row["layers_equal"] == 1.0, row
