"""TAT-QA native JSON -> chat samples: table rendered as a table, paragraphs, question, answer with its scale."""

from __future__ import annotations

import sys
from typing import Any

from hpml_ft.errors import fail
from hpml_ft.tatqa.target import DERIVATION_SYSTEM, derivation_target, render_cells

TATQA_SYSTEM = (
    "Answer the question from the table and the paragraphs of a financial report. Reply with the answer only: "
    "a number or the exact text span, with its scale (thousand, million, billion or %) when it has one. "
    "Separate several answers with ' | '."
)
_SCALE_WORDS = {"thousand", "million", "billion"}


def render_table(rows: list[list[Any]]) -> str:
    """A pipe table; empty cells stay empty so column positions are kept."""
    if not rows:
        return "(no table)"
    width = max(len(r) for r in rows)
    lines = []
    for i, row in enumerate(rows):
        cells = [str(c).strip().replace("|", "/") for c in row] + [""] * (width - len(row))
        lines.append("| " + " | ".join(cells) + " |")
        if i == 0:
            lines.append("|" + "---|" * width)
    return "\n".join(lines)


def render_context(ctx: dict, table: str = "pipe") -> str:
    """Table (`pipe`, or `cells`: one labelled line per cell, see tatqa.target) and paragraphs."""
    paras = sorted(ctx.get("paragraphs", []), key=lambda p: p.get("order", 0))
    text = "\n".join(p["text"] for p in paras)
    rows = ctx["table"]["table"]
    return f"Table:\n{render_cells(rows) if table == 'cells' else render_table(rows)}\n\nParagraphs:\n{text}"


def _fmt_number(x: float | int) -> str:
    if isinstance(x, float) and not x.is_integer():
        return f"{x:.2f}".rstrip("0").rstrip(".")
    return str(int(x))


def render_answer(answer: Any, scale: str) -> str:
    """Gold answer as the model should write it: spans joined by ' | ', numbers to 2 decimals, scale appended."""
    if isinstance(answer, list):
        text = " | ".join(str(a) for a in answer)
    elif isinstance(answer, int | float):
        text = _fmt_number(answer)
    else:
        text = str(answer)
    if scale == "percent" and not text.endswith("%"):
        text += "%"
    elif scale in _SCALE_WORDS:
        text += f" {scale}"
    return text


def _bad(where: str, field: str, expected: str, value: Any) -> None:
    shown = "null" if value is None else f"{type(value).__name__} {str(value)[:40]!r}"
    fail(f"{where}: '{field}' must be {expected}, got {shown}; fix the record")


def _check_question(q: Any, where: str) -> None:
    if not isinstance(q, dict):
        _bad(where, "question", "a dict", q)
    missing = {"uid", "question", "answer", "answer_type", "scale"} - set(q)
    if missing:
        fail(f"{where}: question lacks {sorted(missing)}; is this a TAT-QA file with answers?")
    for field in ("uid", "question", "answer_type", "scale"):
        if not isinstance(q[field], str):
            _bad(where, field, "a string", q[field])
    a = q["answer"]
    if isinstance(a, bool) or not isinstance(a, str | int | float | list):
        _bad(where, "answer", "a string, a number or a list of strings", a)
    if isinstance(a, list) and not all(isinstance(x, str | int | float) for x in a):
        _bad(where, "answer", "a list of strings", a)


def _check_context(ctx: Any, where: str) -> None:
    """Types of every field the renderer and the scorer read, checked once with a clear message."""
    if not isinstance(ctx, dict) or not {"table", "paragraphs", "questions"} <= ctx.keys():
        fail(
            f"{where} is not a TAT-QA context (needs table, paragraphs, questions); check --format/data.format"
        )
    table = ctx["table"]
    if not isinstance(table, dict) or "table" not in table:
        fail(f"{where} has a malformed table (expected {{'uid', 'table': [[cells]]}})")
    if not isinstance(table.get("uid", ""), str):
        _bad(where, "table.uid", "a string", table["uid"])
    if not isinstance(table["table"], list) or not all(isinstance(r, list) for r in table["table"]):
        _bad(where, "table.table", "a list of rows (lists of cells)", table["table"])
    if not isinstance(ctx["paragraphs"], list):
        _bad(where, "paragraphs", "a list of {uid, order, text} dicts", ctx["paragraphs"])
    for j, para in enumerate(ctx["paragraphs"]):
        if not isinstance(para, dict) or not isinstance(para.get("text"), str):
            _bad(where, f"paragraphs[{j}]", "a dict with a string 'text'", para)
        if not isinstance(para.get("order", 0), int):
            _bad(where, f"paragraphs[{j}].order", "an integer", para["order"])
    if not isinstance(ctx["questions"], list):
        _bad(where, "questions", "a list of question dicts", ctx["questions"])
    for j, q in enumerate(ctx["questions"]):
        _check_question(q, f"{where}, questions[{j}]")
        if not isinstance(q.get("order", 0), int):
            _bad(f"{where}, questions[{j}]", "order", "an integer", q["order"])


def tatqa_samples(
    contexts: list[dict],
    path: str,
    system_prompt: str | None = None,
    where: list[str] | None = None,
    target: str = "answer",
    table: str = "pipe",
) -> list[dict]:
    """One sample per question; `group` is the context uid so splits can keep contexts whole.

    `where` names each context for error messages (e.g. 'data.json: record 3'); default: item numbers."""
    where = where or [f"{path}: item {i}" for i in range(len(contexts))]
    for i, ctx in enumerate(contexts):
        _check_context(ctx, where[i])
    system = system_prompt or (TATQA_SYSTEM if target == "answer" else DERIVATION_SYSTEM)
    samples, fell_back, computed = [], 0, 0
    for i, ctx in enumerate(contexts):
        context_text = render_context(ctx, table)
        for q in sorted(ctx["questions"], key=lambda q: q.get("order", 0)):
            answer = None
            if target != "answer" and q["answer_type"] in ("arithmetic", "count"):
                answer = derivation_target(q, ctx["table"]["table"], extract=target == "extract")
                computed, fell_back = computed + 1, fell_back + (answer is None)
            messages = [
                {"role": "system", "content": system},
                {"role": "user", "content": f"{context_text}\n\nQuestion: {q['question']}"},
                {"role": "assistant", "content": answer or render_answer(q["answer"], q["scale"])},
            ]
            gold = {
                k: q.get(k) for k in ("uid", "answer", "answer_type", "answer_from", "scale", "derivation")
            }
            samples.append(
                {
                    "id": q["uid"],
                    "group": ctx["table"].get("uid", str(i)),
                    "messages": messages,
                    "meta": {
                        "question": q["question"],
                        "table": ctx["table"]["table"],
                        "paragraphs": [p["text"] for p in ctx["paragraphs"]],
                        "gold": gold,
                    },
                }
            )
    if computed:
        print(
            f"[hpml_ft] {path}: {target} targets for {computed - fell_back} of {computed} arithmetic/count "
            f"questions; {fell_back} fell back to the plain answer (no derivation, or it does not reproduce "
            "the gold answer)",
            file=sys.stderr,
        )
    return samples


def group_conversations(samples: list[dict]) -> list[list[dict]]:
    """All questions of one context as one multi-turn conversation: the table is read once per context."""
    by_group: dict[str, list[dict]] = {}
    for s in samples:
        by_group.setdefault(s["group"], []).append(s)
    convs = []
    for group in by_group.values():
        first = group[0]["messages"]
        conv = list(first)
        for s in group[1:]:
            conv.append({"role": "user", "content": f"Question: {s['meta']['question']}"})
            conv.append(s["messages"][-1])
        convs.append(conv)
    return convs
