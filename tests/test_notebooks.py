"""The Colab quickstart runs top to bottom: every code cell, in order, as plain Python.

No Jupyter needed: the notebook's JSON is read, each code cell's source is `exec`-ed in one
shared namespace with a temporary working directory, and the end state is checked. The
notebook's cells are written as plain Python (no `!pip`, no `%magic`) so this works. Needs the
real Fashion-MNIST IDX files of Debian's `dataset-fashion-mnist` (CI installs it); the test
makes sure the notebook neither downloads them nor clones or installs anything.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import tempfile
import urllib.request

import numpy as np
import pytest

from idsnn_jax import datasets

pytestmark = pytest.mark.slow  # subprocesses or whole pipelines: not in the fast lane

NOTEBOOKS = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
FASHION_MNIST_DIR = datasets.DEFAULT_FASHION_MNIST_DIR


def code_cells(path: pathlib.Path) -> list[str]:
    """The source of every code cell of the notebook at `path`, in order."""
    notebook = json.loads(path.read_text())
    assert notebook["nbformat"] == 4
    cells = []
    for cell in notebook["cells"]:
        source = cell["source"]
        source = "".join(source) if isinstance(source, list) else source
        if cell["cell_type"] == "code":
            assert not cell.get("outputs"), f"{path.name}: outputs are saved; clear them"
            assert not any(line.lstrip().startswith(("!", "%")) for line in source.splitlines())
            cells.append(source)
    return cells


def _forbidden(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"the notebook tried to {what}: {args!r}")

    return fail


def _no_clone_or_install(real_run):
    """`subprocess.run` that refuses `git clone` and `pip install` (the notebook's Colab path)."""

    def run(args, *rest, **kwargs):
        words = [str(a) for a in args] if isinstance(args, (list, tuple)) else str(args).split()
        if "clone" in words or "pip" in words:
            raise AssertionError(f"the notebook tried to clone or install: {args!r}")
        return real_run(args, *rest, **kwargs)

    return run


def test_quickstart_runs_top_to_bottom(tmp_path, monkeypatch):
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip(
            f"needs Fashion-MNIST in {FASHION_MNIST_DIR} (apt-get install dataset-fashion-mnist)"
        )
    path = NOTEBOOKS / "quickstart.ipynb"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("IDSNN_QUICKSTART_TINY", "1")  # configs/tiny.py: 64 images, 1 epoch
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the notebook's workdir goes here
    monkeypatch.setattr(urllib.request, "urlretrieve", _forbidden("download"))
    monkeypatch.setattr(urllib.request, "urlopen", _forbidden("download"))
    monkeypatch.setattr(subprocess, "run", _no_clone_or_install(subprocess.run))
    namespace: dict = {"__name__": "__main__"}
    for i, source in enumerate(code_cells(path)):
        code = compile(source, f"{path.name}[code cell {i}]", "exec")
        exec(code, namespace)

    assert namespace["DATA_DIR"] == FASHION_MNIST_DIR
    summary = namespace["summary"]
    accuracy = summary["student_best_accuracy"]
    assert math.isfinite(accuracy) and 0.0 <= accuracy <= 1.0
    assert summary["student_epochs"] == 1
    table = namespace["metrics_table"]
    assert [(row["stage"], row["epoch"]) for row in table] == [("teacher", 1), ("student", 1)]
    assert namespace["rates"], "no firing rates in the student's metrics"
    assert all(0.0 <= rate <= 1.0 for rate in namespace["rates"].values())
    # Section 5: a binary raster of 64 neurons over T steps for 4 images, and an energy table
    # whose per-layer counts add up to the recorded totals.
    spikes = namespace["layer_spikes"]
    assert spikes.shape == (2, 4, 64) and set(np.unique(spikes)) <= {0.0, 1.0}
    student = namespace["last_student"]
    for kind in ("sops", "macs"):
        layers = sum(student[f"{kind}/{layer}"] for layer in namespace["layers"])
        assert layers == pytest.approx(student[f"test_{kind}"], rel=1e-6)
    assert student["test_sops"] > 0 and namespace["last_teacher"]["test_macs"] > 0
