"""The workdir's config record: what it records (the resolved dtype, the shard count), which
changes a resume takes, and a damaged record named with what to do."""

from __future__ import annotations

import json
import os

import jax
import pytest

from idsnn_jax import resume
from idsnn_jax.configs import tiny


def _started(workdir, record: dict) -> None:
    """A workdir with a saved teacher epoch (placeholder) and `record` as its config.json."""
    os.makedirs(workdir / "teacher" / "1" / "state")
    (workdir / resume.CONFIG_FILE).write_text(json.dumps(record))


def test_auto_dtype_is_recorded_resolved_and_kept(tmp_path, monkeypatch):
    """'auto' is float32 here: resuming with 'auto' on a GPU backend (bfloat16) is refused;
    a record from before the resolved dtype was written ('auto') is taken as it is now."""
    config = tiny.get_config()
    assert config.dtype == "auto" and resume.config_record(config)["dtype"] == "float32"
    _started(tmp_path / "run", resume.config_record(config))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert resume.config_record(config)["dtype"] == "bfloat16"
    with pytest.raises(ValueError, match=r"refusing to resume it: dtype: 'float32' -> 'bfloat16'"):
        resume.check_workdir(config, str(tmp_path / "run"))
    config.dtype = "float32"
    resume.check_workdir(config, str(tmp_path / "run"))
    old = resume.config_record(config) | {"dtype": "auto"}
    _started(tmp_path / "old", old)
    resume.check_workdir(tiny.get_config(), str(tmp_path / "old"))


def test_keys_added_since_are_read_with_the_values_runs_had(tmp_path):
    """A record written before the memory options existed resumes with them off, and not
    with them on."""
    record = resume.config_record(tiny.get_config())
    for key in ("remat", "pack_spikes"):
        del record["student"][key]
    _started(tmp_path, record)
    resume.check_workdir(tiny.get_config(), str(tmp_path))
    config = tiny.get_config()
    config.student.pack_spikes = True
    with pytest.raises(ValueError, match=r"student\.pack_spikes: False -> True"):
        resume.check_workdir(config, str(tmp_path))


def test_teacher_checkpoint_may_move(tmp_path):
    """Where the teacher is may change on resume (the stages check what it is)."""
    config = tiny.get_config()
    config.teacher.checkpoint = "/old/place/teacher"
    _started(tmp_path, resume.config_record(config))
    config.teacher.checkpoint = "/new/place/teacher"
    resume.check_workdir(config, str(tmp_path))


def test_damaged_record_is_named_with_what_to_do(tmp_path):
    _started(tmp_path, {})
    (tmp_path / resume.CONFIG_FILE).write_text('{"seed": ')
    with pytest.raises(ValueError) as err:
        resume.check_workdir(tiny.get_config(), str(tmp_path))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / resume.CONFIG_FILE} is not valid JSON (")
    assert "delete it to resume without the check" in message and "\n" not in message


def test_record_is_rewritten_only_when_it_changes(tmp_path):
    config = tiny.get_config()
    resume.write_config(config, str(tmp_path))
    path = tmp_path / resume.CONFIG_FILE
    os.utime(path, ns=(1, 1))
    resume.write_config(config, str(tmp_path))
    assert path.stat().st_mtime_ns == 1
    config.log_every_steps = 9
    resume.write_config(config, str(tmp_path))
    assert json.loads(path.read_text())["log_every_steps"] == 9


def test_stage_budgets_are_recorded_resolved_and_older_records_read_the_global_one(tmp_path):
    """config.json records the budget each stage trains with; a record from before the
    per-stage keys (one global budget) resumes with it and refuses another student budget."""
    config = tiny.get_config()
    config.max_train_examples, config.student.max_train_examples = 48, None
    record = resume.config_record(config)
    assert record["teacher"]["max_train_examples"] == record["student"]["max_train_examples"] == 48
    for role in ("teacher", "student"):
        del record[role]["max_train_examples"]
    _started(tmp_path, record)
    resume.check_workdir(config, str(tmp_path))
    config.student.max_train_examples = 32
    with pytest.raises(
        ValueError, match=r"refusing to resume it: student\.max_train_examples: 48 -> 32\. "
    ):
        resume.check_workdir(config, str(tmp_path))
