"""TAT-QA assistant targets and table renderings (data.tatqa_target, data.tatqa_table).

Targets, built from the gold `answer`, `answer_type`, `scale` and `derivation` fields:

* ``answer``: the plain answer with its scale (`tatqa.render.render_answer`), as before.
* ``derivation``: arithmetic -> the gold derivation in one canonical spelling, then its scale
  (``(44.1 - 56.7) / 56.7 * 100 | percent``); count -> ``count: item | item`` (the executor counts the items);
  spans -> the plain answer. A target is kept only when `tatqa.executor.execute` turns it back into the gold answer
  under the official scorer; otherwise (no derivation, or one that does not reproduce the answer) the sample falls
  back to the plain answer, and the loader reports how many did.
* ``extract``: as ``derivation``, with one line per number before the expression, naming the table cell it
  came from (``Inventories, 2019: 1,571.7``) or ``text`` for numbers from the paragraphs (TAT-LLM's
  extract-then-compute).

Tables: ``pipe`` (a markdown pipe table) or ``cells`` (one line per cell named by its row and column,
``Inventories, 2019: 1,571.7``), so that copying a number means copying a labelled fact.
"""

from __future__ import annotations

import re
from typing import Any

from hpml_ft.tatqa.executor import ExecError, evaluate_expression, execute, render_derivation
from hpml_ft.tatqa.metric import score_prediction

# The example's numbers are made up on purpose. The first version used `(44.1 - 56.7) / 56.7 * 100`, a real
# dev-file question whose table is held out: the tuned model wrote it (or its first half) for four held-out
# questions of that table, two of them right, so the held-out score partly measured the prompt.
DERIVATION_SYSTEM = (
    "Answer the question from the table and the paragraphs of a financial report. If the answer needs a "
    "calculation, reply with the arithmetic over numbers copied from the table or paragraphs, then ' | ' and the "
    "scale (thousand, million, billion or percent) when it has one, e.g. '(1,234.5 - 987.6) / 987.6 * 100 | percent'. "
    "If it is a count, reply 'count: ' and the items counted, separated by ' | '. Otherwise reply with the exact "
    "text span, with its scale when it has one; separate several spans with ' | '."
)
_NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?")


def _cell_text(cell: Any) -> str:
    return str(cell).strip().replace("\n", " ")


def _is_numeric(text: str) -> bool:
    return bool(re.fullmatch(r"[-$(€£¥\s]*[\d,.]+\s*%?\)?", text))


def _is_header(text: str) -> bool:
    return not _is_numeric(text) or bool(re.fullmatch(r"(?:19|20)\d\d", text))


def cell_labels(rows: list[list[Any]]) -> list[tuple[str, str]]:
    """(label, value) per non-empty data cell: 'row label, column header' (header rows merged)."""
    if not rows:
        return []
    width = max(len(r) for r in rows)
    grid = [[_cell_text(c) for c in r] + [""] * (width - len(r)) for r in rows]
    n_head = 1
    while n_head < len(grid) and not grid[n_head][0] and all(_is_header(c) for c in grid[n_head]):
        n_head += 1  # more header rows: empty label, text or years only ("", "2019", "2018")
    columns = [" ".join(r[j] for r in grid[:n_head] if r[j]).strip() for j in range(width)]
    out = []
    for row in grid[n_head:]:
        label, values = row[0], row[1:]
        if not any(values):
            if label:
                out.append((label, ""))  # a section row ("Assets:"), kept as a heading line
            continue
        for col, value in zip(columns[1:], values, strict=True):
            if value:
                out.append((", ".join(x for x in (label, col) if x) or "value", value))
    return out


def render_cells(rows: list[list[Any]]) -> str:
    """One line per cell: `Inventories, 2019: 1,571.7`; header names, then each row label's cells."""
    if not rows:
        return "(no table)"
    return "\n".join(f"{label}: {value}" if value else label for label, value in cell_labels(rows))


def _top_level_sum(expr: str) -> bool:
    """True when a binary + or - sits outside every parenthesis (so `* 100` needs parentheses)."""
    depth, prev = 0, ""
    for ch in expr.replace(" ", ""):
        depth += ch in "([" and 1 or (ch in ")]" and -1 or 0)
        if depth == 0 and ch in "+-" and prev and prev not in "+-*/([":
            return True
        prev = ch
    return False


def _candidates(derivation: str, scale: str) -> list[str]:
    """The canonical derivation and, for percent answers written as a ratio, the same times 100."""
    expr = render_derivation(derivation)
    out = [expr]
    if scale == "percent":
        out.append(f"({expr}) * 100" if _top_level_sum(expr) else f"{expr} * 100")
    return out


def _reproduces(q: dict, text: str) -> bool:
    ex = execute(text)
    return ex.executed and score_prediction(q, ex.answer, ex.scale).em == 1.0


def _labelled_numbers(expr: str, rows: list[list[Any]]) -> list[str]:
    """`label: number` for each distinct number of the expression; `text` when no table cell holds it."""
    cells: dict[str, str] = {}
    for label, value in cell_labels(rows):
        for m in _NUMBER.finditer(value):
            cells.setdefault(m.group(0).replace(",", ""), label)
    lines, seen = [], set()
    for m in _NUMBER.finditer(expr):
        number = m.group(0)
        if number in seen or number == "100" and expr.endswith("* 100"):
            continue
        seen.add(number)
        lines.append(f"{cells.get(number.replace(',', ''), 'text')}: {number}")
    return lines


def derivation_target(q: dict, rows: list[list[Any]], extract: bool = False) -> str | None:
    """The derivation-form assistant turn for one question, or None when the plain answer must be used."""
    kind, derivation, scale = q.get("answer_type"), q.get("derivation"), q.get("scale") or ""
    if not isinstance(derivation, str) or not derivation.strip():
        return None
    if kind == "count":
        items = [x.strip().replace("|", "/") for x in derivation.split("##") if x.strip()]
        text = "count: " + " | ".join(items)
        return text if items and _reproduces(q, text) else None
    if kind != "arithmetic":
        return None
    try:
        evaluate_expression(derivation, scale)
    except ExecError:
        return None
    for expr in _candidates(derivation, scale):
        text = f"{expr} | {scale}" if scale else expr
        full = "\n".join([*_labelled_numbers(expr, rows), text]) if extract else text
        if _reproduces(q, full):
            return full
    return None
