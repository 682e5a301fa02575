"""What the experiment tools share: run summaries, seeds and runs' directories, tables, and the
command-line flags of the studies.

The tools import this module (and each other's public names) from beside them: their
directory is on `sys.path` when run as scripts, and on pytest's `pythonpath`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
from typing import Any

import ml_collections
from absl import flags
from ml_collections import config_flags

from idsnn_jax.report import text_table  # noqa: F401 (the console table; one copy, the package's)

SUMMARY_FILE = "summary.json"  # what `pipeline.run` writes at the end of a run


def load_summary(workdir: str) -> dict[str, Any] | None:
    """The `summary.json` of a finished `pipeline.run` in `workdir`, or None."""
    path = os.path.join(workdir, SUMMARY_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def duration(seconds: float) -> str:
    """`1h02m` or `3m05s`."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


def seed_dir(root: str, seed: int) -> str:
    """Where a study keeps one seed's runs."""
    return os.path.join(root, f"seed_{seed}")


def schedule_dir(interval: int, epochs: int) -> str:
    """The run name of IDSNN with the lr stepped every `interval` epochs for `epochs` epochs."""
    return f"idsnn_lr{interval}_e{epochs}"


def with_seed(config: ml_collections.ConfigDict, seed: int) -> Any:
    """A copy of `config` with `seed`."""
    out = config.copy_and_resolve_references()
    out.seed = seed
    return out


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value)."""
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std}


def markdown_table(header: list[str] | None, lines: list[list[str]]) -> str:
    """A markdown table of `lines` under `header` (None: the rows alone, to append)."""
    rows = [header, ["---"] * len(header), *lines] if header else lines
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


@dataclasses.dataclass(frozen=True)
class StudyFlags:
    """The flags every study defines: the config, the root of its runs, and, for studies over
    seeds, the seeds and where the report goes."""

    config: flags.FlagHolder
    root: flags.FlagHolder
    seeds: flags.FlagHolder | None = None
    out: flags.FlagHolder | None = None
    report_only: flags.FlagHolder | None = None


def define_study_flags(default_config: str, root_help: str, *, seeds: bool) -> StudyFlags:
    """Defines --config (file, `--config.key=value` overrides), the required --root, and with
    `seeds` --seeds, --out and --report_only. Call under `if __name__ == "__main__":` so the
    tools import beside each other without clashing flags."""
    config = config_flags.DEFINE_config_file(
        "config", default_config, "Config file; --config.key=value overrides.", lock_config=True
    )
    root = flags.DEFINE_string("root", None, root_help)
    flags.mark_flag_as_required("root")
    if not seeds:
        return StudyFlags(config, root)
    return StudyFlags(
        config,
        root,
        flags.DEFINE_list("seeds", ["1", "2", "3"], "Seeds (config.seed) to run."),
        flags.DEFINE_string("out", None, "Directory for the report (default: --root)."),
        flags.DEFINE_bool("report_only", False, "Only (re)write the report."),
    )
