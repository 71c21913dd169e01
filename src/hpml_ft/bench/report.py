"""Bench results: JSON + markdown table + PNG chart, with machine, versions, git commit, command and date;
and the torch.profiler output (Chrome trace + top-15 operators) written next to them."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpml_ft.outputs import versions, write_json_atomic, write_text_atomic


def git_commit() -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if res.returncode:
        return "unknown"
    return res.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU)"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU {platform.machine()}, {cores} cores, {torch.get_num_threads()} torch threads"


def metadata(argv: list[str]) -> dict[str, Any]:
    v = versions()
    return {
        "command": "python -m hpml_ft.bench " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine(),
        "git_commit": git_commit(),
        "versions": {k: v[k] for k in ("python", "torch", "transformers", "trl", "peft") if k in v},
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return "" if value is None else str(value).replace("|", "/")


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def header_line(meta: dict[str, Any]) -> str:
    v = meta["versions"]
    return (
        f"`{meta['command']}`  \n{meta['machine']}; torch {v.get('torch')}, transformers "
        f"{v.get('transformers')}, trl {v.get('trl')}; commit {meta['git_commit']}; {meta['date']}"
    )


def write_chart(path: Path, rows: list[dict[str, Any]], label: str, metrics: list[tuple[str, str]]) -> None:
    """One horizontal bar panel per (key, title); rows without the metric (errors, skips) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        1, len(metrics), figsize=(5 * len(metrics), 0.45 * len(rows) + 1.5), squeeze=False
    )
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        shown = [r for r in rows if isinstance(r.get(key), int | float)]
        ax.barh([str(r[label]) for r in shown], [r[key] for r in shown], color="#4c72b0")
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
        ax.tick_params(labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(
    out: Path,
    kind: str,
    rows: list[dict[str, Any]],
    meta: dict[str, Any],
    columns: list[str],
    chart: tuple[str, list[tuple[str, str]]],
    notes: list[str] = (),  # type: ignore[assignment]
) -> str:
    """results.json, results.md and <kind>.png in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", {"kind": kind, **meta, "rows": rows})
    md = f"{header_line(meta)}\n\n{markdown_table(rows, columns)}\n"
    if notes:
        md += "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    write_text_atomic(out / "results.md", md)
    write_chart(out / f"{kind}.png", rows, chart[0], chart[1])
    return md


@contextmanager
def profiled(out: Path | None, name: str) -> Iterator[Any]:
    """torch.profiler around a block when `out` is set: <out>/profile-<name>.json (Chrome trace, opens in
    Perfetto) and <out>/profile-<name>.md (top-15 operators by self CPU/CUDA time)."""
    if out is None:
        yield None
        return
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts, record_shapes=False, profile_memory=True) as prof:
        yield prof
    write_profile(prof, out, name)


def write_profile(prof: Any, out: Path, name: str) -> None:
    import torch

    out.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out / f"profile-{name}.json"))
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=15)
    write_text_atomic(out / f"profile-{name}.md", f"# top 15 operators: {name}\n\n```\n{table}\n```\n")
    print(f"[bench] profile: {out / f'profile-{name}.json'}", file=sys.stderr)


def print_json_line(data: dict[str, Any]) -> None:
    """A worker's result: the last stdout line, read by the parent process."""
    sys.stdout.flush()
    print(json.dumps(data, default=str))
