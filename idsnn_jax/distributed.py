"""Many processes, many hosts: JAX's distributed runtime, started before any JAX work.

A run on several processes (one per host, or one per GPU) is the same program in each: the
mesh spans the devices of all of them (`jax.devices()`, process by process), the steps'
collectives cross processes (NCCL on GPUs; gloo on CPUs, JAX's default CPU collectives), and
each process holds only its data shards (`input_pipeline.train_rows`). The CLI calls
`initialize` with its flags first. Explicit flags are passed to
`jax.distributed.initialize` (what they leave out, JAX looks up in the cluster environment);
without them a launcher that started several processes is recognized (Slurm's `srun`, Open
MPI's `mpirun`) and `jax.distributed.initialize()` finds coordinator, process count and id
itself; otherwise the run is one process and nothing starts.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import jax

# Launchers whose environment JAX's cluster detection reads, and their variable for the number
# of processes started. Slurm's SLURM_NTASKS is not used: a batch script sees it too, where
# one process runs (and JAX's Slurm detection needs a job step, which srun starts).
LAUNCHER_TASKS = ("SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE")


def launched_processes(environ: Mapping[str, str]) -> int:
    """How many processes a known launcher started together with this one (1: none)."""
    return max((int(environ[key]) for key in LAUNCHER_TASKS if key in environ), default=1)


def initialize_args(
    environ: Mapping[str, str],
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> dict[str, Any] | None:
    """The keyword arguments of `jax.distributed.initialize` for this process (the flags given;
    {} when a launcher started several processes), or None when it runs alone."""
    given = {
        "coordinator_address": coordinator_address,
        "num_processes": num_processes,
        "process_id": process_id,
    }
    given = {key: value for key, value in given.items() if value is not None}
    if given:
        return given
    return {} if launched_processes(environ) > 1 else None


def initialize(**flags: Any) -> None:
    """Starts JAX's distributed runtime when `initialize_args` says so; before any JAX work."""
    args = initialize_args(os.environ, **flags)
    if args is not None:
        jax.distributed.initialize(**args)
