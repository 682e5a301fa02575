"""How independent NIR consumers run a pipeline run's exported student, against the model.

  python experiments/nir_agreement.py --workdir=runs/tiny --images=1000 [--stage=baseline]

Exports the best checkpoint of `<workdir>/<stage>` (as `python -m idsnn_jax.export_nir`
does, written and read back), evaluates the model on the first `--images` test images of
the run's dataset, runs the graph on the same images, in one batch, in each consumer of
`idsnn_jax.nir_consumers` (snnTorch's `import_from_nir`, Norse's node mapping under nirtorch)
and prints one markdown row per consumer: argmax agreement, share of images whose logits all
lie within 1e-3 of the model's, the largest gap, the share of LIF layers that fired the
model's number of spikes and the largest relative gap of a layer's firing rate (or the error
of a consumer that cannot run the graph). Needs the `nir-consumers` extra.
"""

from __future__ import annotations

import functools
import os
import sys
import tempfile

import common  # beside this script (pytest: pythonpath)
import jax
import jax.numpy as jnp
import nir
import numpy as np
import torch
from absl import app, flags, logging

from idsnn_jax import nir_consumers
from idsnn_jax.datasets import dataset_info, load_split
from idsnn_jax.export_nir import export_nir
from idsnn_jax.input_pipeline import normalize
from idsnn_jax.models import firing_rates
from idsnn_jax.resume import load_run

FLAGS = flags.FLAGS


def evaluate(model, variables, images: np.ndarray, batch: int) -> tuple[np.ndarray, dict]:
    """The model's eval logits (B, K) and firing rates ({layer: (B,)}) on images (B, H, W, C)."""
    apply = jax.jit(functools.partial(model.apply, train=False, mutable=["intermediates"]))
    logits, rates = [], []
    for start in range(0, len(images), batch):
        out, state = apply(variables, jnp.asarray(images[start : start + batch]))
        logits.append(np.asarray(out))
        rates.append(firing_rates(state["intermediates"]))
    return np.concatenate(logits), {k: np.concatenate([r[k] for r in rates]) for k in rates[0]}


def measure(workdir: str, stage: str, num_images: int, batch: int) -> list[dict]:
    """One row per consumer (see the module docstring)."""
    config, model, variables = load_run(workdir, stage)
    info = dataset_info(config.dataset)
    split = load_split(config.dataset, "test", config.data_dir, max_examples=num_images)
    images = np.asarray(normalize(split.images, info))
    logits, rates = evaluate(model, variables, images, batch)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.nir")
        nir.write(path, export_nir(model, variables, info.image_shape))
        graph = nir.read(path)
    spikes = nir_consumers.model_spikes(rates, graph, model.time_steps)
    rows = []
    for consumer in nir_consumers.CONSUMERS:
        row = {"consumer": consumer, "images": len(images)}
        try:  # a consumer that cannot load or run the graph gets a row saying why
            net = nir_consumers.LOADERS[consumer](graph)
            chw = images.transpose(0, 3, 1, 2)
            per_step, counts = nir_consumers.run(net, graph, chw, model.time_steps)
        except Exception as err:  # noqa: BLE001  (any consumer-side failure is a result)
            rows.append({**row, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"})
            continue
        rows.append({**row, **nir_consumers.agreement(logits, per_step, spikes, counts)})
    return rows


def _cells(r: dict) -> list[str]:
    """One consumer's row of the agreement table."""
    if "error" in r:
        return [r["consumer"], str(r["images"]), f"fails: {r['error'][:60]}", "", "", "", ""]
    return [
        r["consumer"],
        str(r["images"]),
        f"{100 * r['argmax']:.1f}%",
        f"{100 * r['close']:.1f}%",
        f"{r['max_gap']:.2g}",
        f"{100 * r['layers_equal']:.0f}%",
        f"{r['rate_gap']:.1g}",
    ]


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    torch.set_num_threads(FLAGS.torch_threads)
    rows = measure(FLAGS.workdir, FLAGS.stage, FLAGS.images, FLAGS.eval_batch)
    header = ["consumer", "images", "argmax equal", "within 1e-3", "max gap"]
    header += ["LIF layers equal", "rate gap"]
    print(common.markdown_table(header, [_cells(r) for r in rows]), end="")
    sys.stdout.flush()


if __name__ == "__main__":  # flags only here, so tests can import this module beside others
    flags.DEFINE_string("workdir", None, "A pipeline run's directory (holding config.json).")
    flags.DEFINE_enum("stage", "student", ["student", "baseline"], "The checkpoint to export.")
    flags.DEFINE_integer("images", 1000, "How many test images (the first ones).")
    flags.DEFINE_integer("eval_batch", 250, "The model's evaluation batch (memory only).")
    flags.DEFINE_integer("torch_threads", 1, "torch's threads (2 on 2 shared cores: 40x slower).")
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
