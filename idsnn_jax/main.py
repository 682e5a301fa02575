"""Command line entry: `python -m idsnn_jax.main --config=configs/cifar100.py --workdir=DIR`.

Deliberately short: all logic lives in `pipeline.run(config, workdir)`, which tests and
notebooks call directly. Override any value with `--config.key=value`, e.g.
`--config.student.time_steps=6 --config.distill=False`. Rerunning the same command
resumes every stage where it stopped. Bad input (a config value, a data file, a teacher
checkpoint, a workdir of another run) ends the run before any work with one line,
`error: ...`, on stderr and exit status 1, and so does a diverging loss (naming stage, epoch
and step); `--traceback` shows the whole stack instead. SIGTERM or SIGINT stops the run at
the next safe point (`faults`), after its pending checkpoint save, with one line saying how
to resume and exit status 128 + the signal's number (143, 130).

Several processes (hosts, or GPUs of one host) run the same command, each with
`--coordinator_address=HOST:PORT --num_processes=P --process_id=p`, or under `srun` / `mpirun`
with none of them (`idsnn_jax.distributed`); only process 0 prints and writes files.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
_TRACEBACK = flags.DEFINE_bool(
    "traceback", False, "On bad input, raise with the whole stack instead of printing one line."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0, for a run on several processes."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. P - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    import jax  # after flags parsing, so --help is fast

    from idsnn_jax import distributed, faults, pipeline, report

    logging.set_verbosity(logging.WARNING)  # orbax and JAX are chatty at INFO
    if _CONFIG.value.dtype == "float64":  # before any array exists
        jax.config.update("jax_enable_x64", True)
    try:
        distributed.initialize(
            coordinator_address=_COORDINATOR.value,
            num_processes=_NUM_PROCESSES.value,
            process_id=_PROCESS_ID.value,
        )
        faults.install_stop_handlers()  # after: with several processes SIGTERM is JAX's
        pipeline.run(_CONFIG.value, _WORKDIR.value)  # logs the key settings and the results
        if jax.process_index() == 0:
            print(report.next_steps(_CONFIG.value, _WORKDIR.value), flush=True)
    except faults.Preempted as stop:
        print(stop, file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    except (ValueError, FileNotFoundError, FloatingPointError) as err:  # bad input, divergence
        if _TRACEBACK.value:
            raise
        sys.exit("error: " + " ".join(line.strip() for line in str(err).splitlines()))
    except OSError as err:  # a full disk, a read-only or vanished workdir
        if _TRACEBACK.value:
            raise
        sys.exit(
            f"error: cannot write {err.filename or 'a file'}: {err.strerror or err}; free space "
            "(or fix the permissions) and rerun the same command: it resumes from the last "
            "checkpoint"
        )


if __name__ == "__main__":
    app.run(main)
