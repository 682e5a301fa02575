"""The command line (idsnn_jax.main): every way a run ends is one line and an exit status;
`--traceback` shows the stack instead."""

from __future__ import annotations

import errno
import os
import signal

import pytest
from absl import flags

from idsnn_jax import faults, main, pipeline

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(tmp_path, *args: str, config: str = f"{REPO}/configs/tiny.py") -> None:
    """`main.main` with `--config=config` (default: the tiny one), `--workdir=tmp_path` and
    `args` parsed as flags."""
    flags.FLAGS(["main", f"--config={config}", f"--workdir={tmp_path}", *args])
    try:
        main.main(["main"])
    finally:
        flags.FLAGS.unparse_flags()


@pytest.mark.parametrize(
    "error, status, line",
    [
        (
            FloatingPointError("[student] training loss is nan at epoch 3, step 2 of the epoch"),
            1,
            "error: [student] training loss is nan at epoch 3, step 2 of the epoch",
        ),
        (faults.Preempted(signal.SIGTERM, "interrupted by SIGTERM in ..."), 143, None),
        (
            OSError(errno.ENOSPC, "No space left on device", "/runs/x/teacher/3"),
            1,
            "error: cannot write /runs/x/teacher/3: No space left on device; free space (or fix "
            "the permissions) and rerun the same command: it resumes from the last checkpoint",
        ),
        (
            ValueError("config.student.width=0 is invalid:\n  expected a number > 0"),
            1,
            "error: config.student.width=0 is invalid: expected a number > 0",
        ),
    ],
    ids=["divergence", "preempted", "full_disk", "bad_input_over_lines"],
)
@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
def test_cli_exit_status_and_line(error, status, line, monkeypatch, capsys, tmp_path):
    def run(config, workdir):
        raise error

    monkeypatch.setattr(pipeline, "run", run)
    monkeypatch.setattr(faults, "install_stop_handlers", lambda: None)  # not in pytest
    with pytest.raises(SystemExit) as exit_:
        _main(tmp_path)
    if line:  # sys.exit(message): status 1, the message on stderr
        assert exit_.value.code == line
    else:
        assert exit_.value.code == status
        assert capsys.readouterr().err == f"{error}\n"


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
def test_traceback_flag_raises_instead(monkeypatch, tmp_path):
    def run(config, workdir):
        raise ValueError("config.dtype='float16' is invalid")

    monkeypatch.setattr(pipeline, "run", run)
    monkeypatch.setattr(faults, "install_stop_handlers", lambda: None)
    with pytest.raises(ValueError, match="float16"):
        _main(tmp_path, "--traceback")


@pytest.mark.filterwarnings("ignore:the load_module:DeprecationWarning")  # config_flags
def test_a_bad_config_value_ends_before_any_work(monkeypatch, tmp_path):
    """The real pipeline: a bad value is named in one line and nothing is written."""
    monkeypatch.setattr(faults, "install_stop_handlers", lambda: None)
    config = tmp_path / "bad.py"
    config.write_text(
        "from idsnn_jax.configs import tiny\n\n\ndef get_config():\n"
        "    config = tiny.get_config()\n    config.student.neuron.surrogate = 'nope'\n"
        "    return config\n"
    )
    with pytest.raises(SystemExit) as exit_:
        _main(tmp_path / "run", config=str(config))
    assert exit_.value.code.startswith("error: config.student.neuron.surrogate='nope'")
    assert "\n" not in exit_.value.code
    assert not (tmp_path / "run").exists()
