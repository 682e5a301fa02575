"""The benchmark's report: a markdown table of its rows and a plot of images/s and memory
against T (`write_outputs` writes JSON, .md and .png)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import common  # beside this script (pytest: pythonpath)


def _ms(row: dict, prefix: str = "") -> str:
    if row.get(prefix + "step_s_median") is None:
        return "-"
    values = [1e3 * row[prefix + k] for k in ("step_s_median", "step_s_min", "step_s_max")]
    return "{:.1f} [{:.1f}, {:.1f}]".format(*values)


def num(value: float | None, scale: float = 1.0, fmt: str = "{:.1f}") -> str:
    """`value / scale` in `fmt`, or '-' for None."""
    return "-" if value is None else fmt.format(value / scale)


COLUMNS: list[tuple[str, Callable[[dict], str]]] = [
    ("case", lambda r: r["case"]),
    ("T", lambda r: "-" if r["time_steps"] is None else str(r["time_steps"])),
    ("batch", lambda r: str(r["batch"])),
    ("dtype", lambda r: r["dtype"]),
    ("variant", lambda r: r["variant"]),
    ("k", lambda r: str(r["steps_per_call"])),
    ("step ms median [min, max]", _ms),
    ("img/s", lambda r: num(r.get("images_per_s"))),
    ("GFLOP/s", lambda r: num(r.get("flops_per_s"), 1e9)),
    ("% matmul peak", lambda r: num(r.get("peak_fraction"), 0.01)),
    ("compiled MiB", lambda r: num(r.get("compiled_peak_bytes"), 2**20)),
    ("device peak MiB", lambda r: num(r.get("device_peak_bytes"), 2**20)),
    ("torch ms median [min, max]", lambda r: _ms(r, "torch_")),
    ("torch img/s", lambda r: num(r.get("torch_images_per_s"))),
    ("torch MiB", lambda r: num(r.get("torch_max_memory_bytes"), 2**20)),
    ("ours/torch", lambda r: num(r.get("ours_vs_torch"), fmt="{:.2f}x")),
    ("note", lambda r: r.get("error") or r.get("torch_error") or ""),
]


def markdown(
    rows: list[dict], header: bool = True, columns: list[tuple[str, Callable]] = COLUMNS
) -> str:
    """The rows as a markdown table of `columns` (name, row -> cell text), with its header
    line unless `header=False`."""
    names = [name for name, _ in columns] if header else None
    return common.markdown_table(names, [[fn(r) for _, fn in columns] for r in rows]).rstrip("\n")


def _series(rows: list[dict]) -> dict[str, dict]:
    """label -> {T: (images/s, bytes or None)}: ours per (case, batch, dtype, variant), torch
    per (case, batch, dtype); the teacher's T is None."""
    out: dict[str, dict] = {}
    for r in rows:
        tag, t = f"{r['case']} b{r['batch']} {r['dtype']}", r["time_steps"]
        if r.get("images_per_s"):
            point = (r["images_per_s"], r["compiled_peak_bytes"])
            k = f" k={r['steps_per_call']}" if r["steps_per_call"] != 1 else ""
            out.setdefault(f"{tag} {r['variant']}{k}", {})[t] = point
        if r.get("torch_images_per_s"):
            point = (r["torch_images_per_s"], r.get("torch_max_memory_bytes"))
            out.setdefault(f"torch {tag} ({r['torch_mode']})", {})[t] = point
    return out


def plot(rows: list[dict], path: str) -> None:
    """images/s and memory (MiB) against T: ours solid, torch dashed; the teacher's step
    (no T) as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(13, 5))
    for label, points in _series(rows).items():
        style = "s--" if label.startswith("torch") else "o-"
        if None in points:  # the teacher
            ax_speed.axhline(points[None][0], ls=style[1:], color="gray", label=label)
            continue
        ts = sorted(points)
        lines = ax_speed.plot(ts, [points[t][0] for t in ts], style, label=label)
        if all(points[t][1] for t in ts):
            mem = [points[t][1] / 2**20 for t in ts]
            ax_mem.plot(ts, mem, style, color=lines[0].get_color(), label=label)
    ax_speed.set(xlabel="T", ylabel="images/s", yscale="log", title="train-step throughput")
    ax_mem.set(xlabel="T", ylabel="MiB per device", title="memory (ours: XLA compiled peak)")
    for ax in (ax_speed, ax_mem):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    info = rows[0]["machine"]
    fig.suptitle(f"{info['device_kind']} ({info['platform']}, {info['cpus']} CPUs visible)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(rows: list[dict], out: str) -> None:
    """`out`: the rows as JSON (its folder made if needed), replaced whole: a run killed while
    writing leaves the previous file, not half of the new one."""
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(rows, f, indent=1)
    os.replace(out + ".tmp", out)


def write_outputs(rows: list[dict], out: str) -> None:
    """`out` (JSON rows), and the markdown table and the plot beside it (.md, .png)."""
    write_json(rows, out)
    stem = os.path.splitext(out)[0]
    with open(stem + ".md", "w") as f:
        f.write(markdown(rows) + "\n")
    plot(rows, stem + ".png")
