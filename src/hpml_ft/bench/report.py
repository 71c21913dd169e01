"""Bench results: JSON + markdown table + PNG chart, with machine, versions, git commit, command and date;
the torch.profiler output (Chrome trace + top-15 operators) written next to them; and `--docs FILE`: the same
markdown written into a doc between its `<!-- bench:<block> -->` and `<!-- /bench:<block> -->` markers."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hpml_ft.errors import fail
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


def add_docs_args(p: argparse.ArgumentParser) -> None:
    """--docs / --docs-tag of every bench (`bench lowbit` included)."""
    p.add_argument(
        "--docs",
        metavar="FILE",
        help="also write the table(s) into FILE between <!-- bench:KIND --> and <!-- /bench:KIND --> markers "
        "(KIND train / generate / lowbit; checked before anything runs)",
    )
    p.add_argument(
        "--docs-tag", metavar="TAG", help="use the markers bench:KIND:TAG (several tables of a kind)"
    )


def docs_block(kind: str, tag: str | None) -> str:
    """The marker name of a bench's table in a doc: `train`, or `train:packing` with --docs-tag packing."""
    return f"{kind}:{tag}" if tag else kind


def _block_span(text: str, block: str) -> tuple[int, int] | None:
    """(start, end) of the text between the block's begin and end markers, when each occurs once, in order."""
    begin, end = f"<!-- bench:{block} -->", f"<!-- /bench:{block} -->"
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        return None
    return text.index(begin) + len(begin), text.index(end)


def check_docs(path: str | Path, blocks: list[str]) -> None:
    """--docs FILE, checked before any benchmark runs: FILE exists and holds each block's markers once."""
    p = Path(path)
    if not p.is_file():
        fail(f"--docs {p}: no such file; pass the markdown file whose bench tables this run replaces")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        fail(f"--docs {p}: not UTF-8 text (byte {err.start}); pass a markdown file")
    missing = [b for b in blocks if _block_span(text, b) is None]
    if missing:
        pairs = ", ".join(f"<!-- bench:{b} --> ... <!-- /bench:{b} -->" for b in missing)
        fail(f"--docs {p}: needs the markers {pairs} (each once, in order) around the table to replace")


def write_docs(path: str | Path, tables: dict[str, str]) -> None:
    """Replace the text between each block's markers in FILE with that run's results.md, in one atomic write
    (a crash leaves the old doc or the new one, never half of it); the file keeps its permissions."""
    p = Path(path)
    check_docs(p, list(tables))
    text = p.read_text(encoding="utf-8")
    for block, md in tables.items():
        start, end = _block_span(text, block)  # type: ignore[misc]  # check_docs saw every block
        text = text[:start] + "\n" + md.strip("\n") + "\n" + text[end:]
    mode = os.stat(p).st_mode & 0o777
    write_text_atomic(p, text)
    os.chmod(p, mode)
    print(f"[bench] {', '.join(tables)} table(s) written into {p}", file=sys.stderr)


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
