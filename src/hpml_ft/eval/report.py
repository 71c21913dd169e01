"""Result tables (markdown) and the result folder of `python -m hpml_ft.eval`: results.json, results.md,
predictions/<model>.jsonl and, for TAT-QA, predictions/<model>.official.json (the official scorer's input)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.eval.safety import safety_markdown
from hpml_ft.eval.stats import add_intervals, interval_text
from hpml_ft.outputs import atomic_dir, versions, write_json_atomic, write_text_atomic
from hpml_ft.scoring import official_predictions
from hpml_ft.tatqa.metric import write_official_predictions

if TYPE_CHECKING:
    from hpml_ft.eval.tasks import Task


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value).replace("|", "/")


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def _judge_cells(m: dict) -> list[Any]:
    j = m.get("judge")
    return [j["mean"], f"{j['unparsed']}/{j['n']}"] if j else []


def _ci(interval: list[float] | None) -> str:
    return f"{interval[0]:.1f} - {interval[1]:.1f}" if interval else "-"


def paired_lines(results: list[dict]) -> list[str]:
    """`- model: +X EM, 95% CI [a, b] (McNemar p)` for each model after the first: the same questions, paired."""
    lines = [f"- {r['name']}: {interval_text(r['metrics'])}" for r in results if r["metrics"].get("vs_first")]
    if not lines:
        return []
    head = f"## Against {results[0]['name']} on the same questions (paired bootstrap, McNemar's exact test)"
    return [head, "", *lines, ""]


def comparison_table(results: list[dict], fmt: str) -> str:
    """One row per model: EM/F1 (+ scale accuracy for TAT-QA, + judge mean when judged) and speed."""
    judged = any(r["metrics"].get("judge") for r in results)
    header = ["model", "n", "EM", "EM 95% CI", "F1", "F1 95% CI"]
    header += ["scale acc", "executed", "exec failed"] if fmt == "tatqa" else []
    header += (["judge mean (1-5)", "judge unparsed"] if judged else []) + ["tokens/s"]
    rows = []
    for r in results:
        m = r["metrics"]
        row = [r["name"], m["n"], m["exact_match"], _ci(m.get("exact_match_ci")), m["f1"], _ci(m.get("f1_ci"))]
        ex = m.get("executor", {})
        row += [m["scale_accuracy"], ex.get("executed"), ex.get("parse_failures")] if fmt == "tatqa" else []
        if judged:
            row += _judge_cells(m) or ["-", "-"]
        row.append(r["speed"]["tokens_per_s"])
        rows.append(row)
    return md_table(header, rows)


def voting_lines(results: list[dict]) -> list[str]:
    """What each vote row's samples held (eval.voting.sample_summary): why voting gained what it did."""
    voted = [r for r in results if r["metrics"].get("voting")]
    if not voted:
        return []
    header = ["vote row", "K", "T", "one sample EM", "pass@K", "greedy or a sample right", "samples = greedy", "EM"]
    cols = ("samples", "temperature", "sample_em", "pass_at_k", "ceiling", "agree_greedy")
    rows = [[r["name"], *(r["metrics"]["voting"].get(c) for c in cols), r["metrics"]["exact_match"]] for r in voted]
    note = (
        "pass@K counts a question when any of its K samples is right: no rule picking one sample beats it. "
        "'samples = greedy': the share of samples computing the greedy answer (percent)."
    )
    return ["## Voting: what the samples held", "", md_table(header, rows), "", note, ""]


def breakdown_table(breakdown: dict[str, dict[str, dict]]) -> str:
    """TAT-QA answer_type x answer_from: `EM / F1 (n)` per cell."""
    sources = sorted({src for by_src in breakdown.values() for src in by_src})
    rows = [
        [kind]
        + [
            f"{c['exact_match']:.2f} / {c['f1']:.2f} ({c['count']})" if c["count"] else "-"
            for c in (by_src.get(src, {"count": 0}) for src in sources)
        ]
        for kind, by_src in breakdown.items()
    ]
    return md_table(["answer_type \\ answer_from", *sources], rows)


def results_markdown(results: list[dict], fmt: str, data: str) -> str:
    """The whole report: comparison table, then the TAT-QA breakdown and judge distribution per model."""
    parts = [
        f"# Evaluation on `{data}` ({fmt}, {results[0]['metrics']['n'] if results else 0} samples)",
        "",
        comparison_table(results, fmt),
        "",
        *paired_lines(results),
        *voting_lines(results),
    ]
    for r in results:
        m = r["metrics"]
        if fmt == "tatqa" and m.get("breakdown"):
            parts += [
                f"## {r['name']}: EM / F1 by answer type and source",
                "",
                breakdown_table(m["breakdown"]),
                "",
            ]
        if m.get("judge"):
            dist = m["judge"]["distribution"]
            parts += [
                f"## {r['name']}: judge scores",
                "",
                md_table([*dist, "unparsed"], [[*dist.values(), m["judge"]["unparsed"]]]),
                "",
            ]
    return "\n".join(parts)


def ifeval_markdown(results: list[dict], data: str) -> str:
    """One row per model with the four accuracies; unsupported instruction ids listed below."""
    header = [
        "model",
        "prompts",
        "prompt strict",
        "prompt loose",
        "instr strict",
        "instr loose",
        "unsupported",
        "tokens/s",
    ]
    keys = ("prompts_scored", "prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")
    rows = [
        [
            r["name"],
            *(r["metrics"][k] for k in keys),
            sum(u["count"] for u in r["metrics"]["unsupported"].values()),
            r.get("speed", {}).get("tokens_per_s"),
        ]
        for r in results
    ]
    parts = [f"# Instruction following on `{data}`", "", md_table(header, rows), ""]
    unsupported = {iid: u["why"] for r in results for iid, u in r["metrics"]["unsupported"].items()}
    if unsupported:
        parts += ["Unsupported instructions (left out of every accuracy):", ""]
        parts += [f"- `{iid}`: {why}" for iid, why in sorted(unsupported.items())] + [""]
    return "\n".join(parts)


def write_results(
    out: Path, task: Task, results: list[dict], args: argparse.Namespace, judge: str | None
) -> str:
    """Everything into a temp folder renamed into place: a result folder is complete or absent."""
    if task.kind == "ifeval":
        md = ifeval_markdown(results, task.data)
    elif task.kind == "safety":
        md = safety_markdown(results, task.data)
    else:
        add_intervals(results)  # EM/F1 intervals and the paired comparison, in results.json and results.md
        md = results_markdown(results, task.fmt, task.data)
    summary = {
        "kind": "eval",
        "task": task.kind,
        "format": task.fmt,
        "data": task.data,
        "n": len(task.items),
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "judge": judge,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "models": [],
    }
    with atomic_dir(out, {"kind": "eval"}) as tmp:
        for r in results:
            entry = {k: r[k] for k in ("name", "path", "adapter", "metrics", "speed") if k in r}
            entry["predictions"] = f"predictions/{r['name']}.jsonl"
            lines = [json.dumps(x, ensure_ascii=False, default=str) + "\n" for x in r["rows"]]
            write_text_atomic(tmp / entry["predictions"], "".join(lines))
            if task.fmt == "tatqa":
                entry["official_predictions"] = f"predictions/{r['name']}.official.json"
                official = official_predictions(r["rows"])
                write_official_predictions(official, tmp / entry["official_predictions"])
            summary["models"].append(entry)
        write_text_atomic(tmp / "results.md", md)
        write_json_atomic(tmp / "results.json", summary)
    return md
