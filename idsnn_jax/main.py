"""Command line entry: `python -m idsnn_jax.main --config=configs/cifar100.py --workdir=DIR`.

Deliberately short: all logic lives in `pipeline.run(config, workdir)`, which tests and
notebooks call directly. Override any value with `--config.key=value`, e.g.
`--config.student.time_steps=6 --config.distill=False`. Rerunning the same command
resumes every stage where it stopped.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file.", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from idsnn_jax import pipeline  # after flags parsing, so --help is fast

    logging.set_verbosity(logging.WARNING)  # orbax and JAX are chatty at INFO
    print(f"config:\n{_CONFIG.value}", flush=True)
    pipeline.run(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
    app.run(main)
