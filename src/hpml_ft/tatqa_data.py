"""TAT-QA native JSON -> chat samples: table rendered as a table, paragraphs, question, answer with its scale."""

from __future__ import annotations

from typing import Any

from hpml_ft.errors import fail

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


def render_context(ctx: dict) -> str:
    paras = sorted(ctx.get("paragraphs", []), key=lambda p: p.get("order", 0))
    text = "\n".join(p["text"] for p in paras)
    return f"Table:\n{render_table(ctx['table']['table'])}\n\nParagraphs:\n{text}"


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


def _check_context(ctx: Any, i: int, path: str) -> None:
    if not isinstance(ctx, dict) or not {"table", "paragraphs", "questions"} <= ctx.keys():
        fail(
            f"{path}: item {i} is not a TAT-QA context (needs table, paragraphs, questions); check --format/data.format"
        )
    if not isinstance(ctx["table"], dict) or "table" not in ctx["table"]:
        fail(f"{path}: item {i} has a malformed table (expected {{'uid', 'table': [[cells]]}})")
    for q in ctx["questions"]:
        missing = {"uid", "question", "answer", "answer_type", "scale"} - set(q)
        if missing:
            fail(f"{path}: item {i} question lacks {sorted(missing)}; is this a TAT-QA file with answers?")


def tatqa_samples(contexts: list[dict], path: str, system_prompt: str | None = None) -> list[dict]:
    """One sample per question; `group` is the context uid so splits can keep contexts whole."""
    samples = []
    for i, ctx in enumerate(contexts):
        _check_context(ctx, i, path)
        context_text = render_context(ctx)
        for q in sorted(ctx["questions"], key=lambda q: q.get("order", 0)):
            messages = [
                {"role": "system", "content": system_prompt or TATQA_SYSTEM},
                {"role": "user", "content": f"{context_text}\n\nQuestion: {q['question']}"},
                {"role": "assistant", "content": render_answer(q["answer"], q["scale"])},
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
