"""Stage 1's teacher when the config names one: loaded from one of our checkpoints or imported
from a PyTorch file (`torch_import`), and checked against the model the config describes,
before any work, reading only metadata (`check_checkpoint`).
"""

from __future__ import annotations

import os
from typing import Any

from idsnn_jax import files, torch_import
from idsnn_jax.checkpoints import load_variables, locate, saved_shapes
from idsnn_jax.logs import logger
from idsnn_jax.plan import TeacherSpec
from idsnn_jax.resnet_paths import leaf_paths
from idsnn_jax.resume import CONFIG_FILE


def load(spec: TeacherSpec, dataset: str, expected: Any) -> dict[str, Any]:
    """The variables of the teacher at `spec.checkpoint` as host arrays (a PyTorch file is
    mapped onto `expected`, the model's abstract variables)."""
    if torch_import.is_torch_file(spec.checkpoint):
        variables = torch_import.load_torch_teacher(spec.checkpoint, expected)
        logger.info("[teacher] imported from PyTorch %s", spec.checkpoint)
        return variables
    variables = load_variables(spec.checkpoint)
    _check_shapes(spec, dataset, variables, expected)
    logger.info("[teacher] loaded from %s", spec.checkpoint)
    return variables


def check_checkpoint(spec: TeacherSpec, dataset: str, expected: Any) -> None:
    """ValueError unless `spec.checkpoint` holds the teacher `spec` describes (`expected`: its
    abstract variables).

    Reads only metadata: every tree path's shape and dtype against the model's (another
    architecture, width or class count names the first differing path and both shapes), then,
    when the checkpoint's run left its `config.json`, the model and width it was trained as
    (a spiking student's stage has the shapes of an ANN of its depth, but is not one). A
    PyTorch file is mapped onto the model (`torch_import`: errors name key, path and shapes).
    """
    path = spec.checkpoint
    if torch_import.is_torch_file(path):
        torch_import.load_torch_teacher(path, expected)
        return
    _check_shapes(spec, dataset, saved_shapes(path), expected)
    stage_dir, _ = locate(os.path.abspath(path))
    run_config = os.path.join(os.path.dirname(stage_dir), CONFIG_FILE)
    if not os.path.isfile(run_config):
        return
    run = files.read_json(run_config, "it says what the teacher checkpoint is: restore it")
    role = "teacher" if os.path.basename(stage_dir) == "teacher" else "student"
    saved = {key: run.get(role, {}).get(key) for key in ("model", "width")}
    want = {"model": spec.model, "width": spec.width}
    if None not in saved.values() and saved != want:
        raise ValueError(
            f"config.teacher.checkpoint={path!r} is the {os.path.basename(stage_dir)} stage of a "
            f"run of {role}.model={saved['model']!r}, {role}.width={saved['width']} "
            f"({run_config}), but config.teacher.model={want['model']!r}, "
            f"config.teacher.width={want['width']}"
        )


def _check_shapes(spec: TeacherSpec, dataset: str, variables: Any, expected: Any) -> None:
    """ValueError naming the first tree path whose shape or dtype differs from the model's,
    missing paths and extra ones (a deeper checkpoint) included, with both shapes."""
    got, want = dict(_shapes(variables)), dict(_shapes(expected))
    differ = [p for p in want if got.get(p) != want[p]] + [p for p in got if p not in want]
    if differ:
        first = min(differ, key=lambda p: p.startswith("batch_stats"))  # a kernel says more
        show = lambda s: "missing" if s is None else f"{s[0]} {s[1]}"
        n = len(differ) - 1
        more = f" ({n} more path{'s differ' if n > 1 else ' differs'})" if n else ""
        raise ValueError(
            f"config.teacher.checkpoint={spec.checkpoint!r} does not hold a "
            f"{spec.model!r} of width {spec.width} for {dataset}: "
            f"{first} is {show(got.get(first))} in the checkpoint but {show(want.get(first))} "
            f"in the model{more}; teacher.model, teacher.width and dataset (its class count) "
            "must match it"
        )


def _shapes(tree: Any) -> list[tuple[str, tuple]]:
    """(path 'params/stem/conv/kernel', (shape, dtype)) of every leaf of `tree`."""
    paths, leaves, _ = leaf_paths(tree)
    return [(p, (tuple(x.shape), str(x.dtype))) for p, x in zip(paths, leaves, strict=True)]
