"""The workdir's config record: a rerun resumes only the run that is there.

Every run writes `<workdir>/config.json` (`write_config`); a rerun in that workdir must have
the same config (`check_workdir`) except for what a resume may change (`RESUME_FREE`,
`RESUME_GROW`, and `RESUME_AFTER_DIVERGENCE` after a run that stopped on a non-finite loss
and left `DIVERGED_FILE`). Keys newer than a workdir's record count with the value runs had
before them (`ADDED_KEYS`, `ADDED_FROM`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from idsnn_jax import files
from idsnn_jax.checkpoints import has_checkpoint, load_variables
from idsnn_jax.datasets import dataset_info
from idsnn_jax.logs import logger
from idsnn_jax.plan import ROLES, build_model, data_shards, dotted, train_examples
from idsnn_jax.precision import compute_dtype

CONFIG_FILE = "config.json"
# Keys that may change when a workdir is resumed: they decide where data is, what is logged or
# kept, and how evaluation is batched (exact counts either way), not the trained weights. Where
# the data and the teacher are may change, not what they are: each stage's checkpoints record
# their content (`checkpoints.fingerprint`), checked when it resumes (`train.fit`).
RESUME_FREE = frozenset(
    {
        "data_dir",
        "teacher.checkpoint",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_keep",
        "checkpoint_every_epochs",
        "compare_baseline",  # adds (or skips) the baseline stage; the others are unchanged
        "steps_per_call",
        "energy",  # what evaluation counts, not what trains
    }
)
# Keys that may grow: a milestone at or after the old last epoch acts only after it, so the
# extended run equals one configured longer from the start. The teacher's only while no
# student stage has started from it (the student would have learned from another teacher).
RESUME_GROW = {"student.num_epochs": (), "teacher.num_epochs": ("student", "baseline")}
# Keys that may be lowered only to resume a run that stopped on a non-finite loss (it left
# DIVERGED_FILE): the epochs trained from then on use the new value, the saved ones keep
# theirs (each epoch's rate is in metrics.jsonl), so the run no longer equals a fresh run of
# either config; it is the one repair a diverged run needs without losing its epochs.
RESUME_AFTER_DIVERGENCE = frozenset({"optimizer.learning_rate"})
DIVERGED_FILE = "diverged.txt"


# Keys newer than some workdirs' config.json, with the value the runs of those had.
ADDED_KEYS = {
    "data_shards": 1,
    "label_smoothing": 0.0,
    "tet_weight": 0.0,
    "kd_per_step": False,
    "ema_decay": 0.0,
    "optimizer.schedule": "step",
    "optimizer.warmup_epochs": 0,
    "augment.cutout": 0,
    "augment.auto_augment": False,
    "student.remat": False,
    "student.pack_spikes": False,
    "student.gradient": "bptt",
    "student.sltt_k": None,
}
# Per-stage keys that, absent from an older record, had the value of a global key then.
ADDED_FROM = {
    "teacher.max_train_examples": "max_train_examples",
    "student.max_train_examples": "max_train_examples",
}


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """`config` as the JSON-able nested dict `<workdir>/config.json` holds (tuples as lists),
    `data_shards=0` as the process count (the data order), each stage's
    `max_train_examples` as the budget it trains with (`plan.train_examples`) and
    `dtype='auto'` as the dtype it resolves to here (a resume on another backend must not
    change it)."""
    record = json.loads(config.to_json_best_effort())
    record["data_shards"] = data_shards(config)
    for role in ROLES:
        record[role]["max_train_examples"] = train_examples(config, role)
    record["dtype"] = jnp.dtype(compute_dtype(config.dtype)).name
    return record


def check_workdir(config: ml_collections.ConfigDict, workdir: str) -> None:
    """ValueError naming every key (old -> new value) in which `config` differs from the run
    whose checkpoints `workdir` holds, beyond what a resume may change (`RESUME_FREE`,
    `RESUME_GROW`, `RESUME_AFTER_DIVERGENCE` when the workdir holds `DIVERGED_FILE`). Generic
    over the config tree: a key that only one side has differs too.
    Nothing to check when the workdir has no checkpoint or no `config.json` (a run of an
    older version: it is written now).
    """
    path = os.path.join(workdir, CONFIG_FILE)
    started = sorted(
        name
        for name in (os.listdir(workdir) if os.path.isdir(workdir) else [])
        if has_checkpoint(os.path.join(workdir, name))
    )
    if not started:
        return
    if not os.path.isfile(path):
        logger.warning("%s has checkpoints but no %s to check them against", workdir, CONFIG_FILE)
        return
    what = "it records the run's config: restore it, or delete it to resume without the check"
    old = ADDED_KEYS | dotted(files.read_json(path, what))
    for key, source in ADDED_FROM.items():
        old.setdefault(key, old.get(source))
    new = dotted(config_record(config))
    if old.get("dtype") == "auto":  # recorded before the resolved dtype was
        old["dtype"] = new["dtype"]
    absent = "<absent>"
    diverged = os.path.isfile(os.path.join(workdir, DIVERGED_FILE))
    diffs = []
    for key in sorted(old.keys() | new.keys()):
        was, now = old.get(key, absent), new.get(key, absent)
        if was == now or key in RESUME_FREE:
            continue
        grows = isinstance(was, int) and isinstance(now, int) and now > was
        if key in RESUME_GROW and grows and not set(RESUME_GROW[key]) & set(started):
            continue
        numbers = all(isinstance(v, int | float) for v in (was, now))
        if key in RESUME_AFTER_DIVERGENCE and diverged and numbers and now < was:
            logger.warning("%s: %r -> %r to resume the diverged run in %s", key, was, now, workdir)
            continue
        diffs.append(f"{key}: {was!r} -> {now!r}")
    if diffs:
        raise ValueError(
            f"{workdir} holds a run of another config ({path}; checkpoints of "
            f"{', '.join(started)}), refusing to resume it: {'; '.join(diffs)}. Use a new "
            "--workdir, rerun with the old values, or delete that config.json to resume anyway"
        )


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes `<workdir>/config.json` (replaced whole, and only when it changes); the run it
    now records has not diverged (yet)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, CONFIG_FILE)
        files.write_text(path, json.dumps(config_record(config), indent=2) + "\n", changed=True)
        if os.path.isfile(os.path.join(workdir, DIVERGED_FILE)):
            os.remove(os.path.join(workdir, DIVERGED_FILE))


def load_run(workdir: str, stage: str = "student") -> tuple[ml_collections.ConfigDict, Any, Any]:
    """(config, model, variables) of the best checkpoint of `<workdir>/<stage>`, a student
    stage of a pipeline run, whose `config.json` rebuilds the model."""
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"no workdir {workdir!r}")
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_FILE} in {workdir!r}: not a run's workdir")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    model = build_model(config, "student", dataset_info(config.dataset))
    return config, model, load_variables(os.path.join(workdir, stage))
