"""The low-bit table: results.json, results.md and lowbit.png (accuracy vs ms/token, marker size = size)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hpml_ft.outputs import versions, write_json_atomic, write_text_atomic

COLUMNS = [
    ("accuracy", "accuracy"),
    ("ms_per_token", "ms/token"),
    ("tokens_per_s", "tokens/s"),
    ("speedup_b1", "x fp32"),
    ("ms_per_token_b8", "ms/token b8"),
    ("tokens_per_s_b8", "tokens/s b8"),
    ("size_on_disk_mib", "size on disk MiB"),
    ("packed_weights_mib", "packed weights MiB"),
    ("cpu_peak_rss_mib", "peak RSS MiB"),
    ("gpu_peak_allocated_mib", "peak GPU MiB"),
]


def markdown(summary: dict[str, Any], results: list[dict], header: str = "") -> str:
    """The table under `header` (the bench's command, machine, versions, commit and date line)."""
    cols = [(k, h) for k, h in COLUMNS if any(k in r for r in results)]
    lines = [
        *([header, ""] if header else []),
        f"Low-bit variants on {summary['n']} {summary['kind']} samples (greedy; accuracy and x fp32 at batch 1, "
        "b8 = batch 8 throughput)\n",
        "| model | " + " | ".join(h for _, h in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(str(r.get(k, "")) for k, _ in cols) + " |")
    rec = summary.get("recovery")
    lines.append(
        f"\nrecovery at int{summary['bits']} = (QAT - PTQ) / (fp32 - PTQ) = "
        + (
            f"{100 * rec['recovery']:.1f}% (95% CI {100 * rec['low']:.1f} - {100 * rec['high']:.1f}, paired "
            "bootstrap over the questions)"
            if rec is not None
            else "n/a (needs --qat, exact match and fp32 != PTQ)"
        )
    )
    return "\n".join(lines) + "\n"


def plot(path: Path, results: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.scatter(r["ms_per_token"], r["accuracy"], s=20 + r["size_on_disk_mib"] / 2, alpha=0.7)
        ax.annotate(
            r["name"],
            (r["ms_per_token"], r["accuracy"]),
            fontsize=8,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("ms / token (greedy, batch 1)")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Low-bit variants (marker area ~ size on disk)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(out: Path, summary: dict[str, Any], results: list[dict], header: str = "") -> str:
    """results.json, results.md and lowbit.png in `out`; returns the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    md = markdown(summary, results, header)
    write_json_atomic(out / "results.json", {**summary, "versions": versions(), "rows": results})
    write_text_atomic(out / "results.md", md)
    plot(out / "lowbit.png", results)
    return md
