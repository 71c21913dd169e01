"""A safe executor for TAT-QA derivations: `(44.1 - 56.7) / 56.7 * 100 | percent` -> ("-22.22", "percent").

The model writes the arithmetic (or, for counting, the items counted) and this module computes the answer, so a
small model never has to do arithmetic itself (TAT-LLM's extractor -> reasoner -> executor split).

Forms (the assistant turns built by `tatqa.target` in derivation mode):

* ``EXPR [| SCALE]``: numbers (``1,571.7``, ``$3.2``, ``-3``, ``12.5%``), ``+ - * /``, parentheses ``()`` or ``[]``; SCALE is
  thousand, million, billion or percent. The value of EXPR is the answer in that scale (a ratio shown as a
  percent carries its own ``* 100``). ``x%`` is ``x`` when the scale is percent (a percent of percents) and
  ``x / 100`` otherwise. Extract-then-compute answers put labelled values on lines before EXPR; the last line
  is the expression.
* ``count: ITEM | ITEM | ...``: the answer is the number of items.

Anything else is not a derivation and is left to `normalize.parse_model_output`. A derivation that fails to
parse or compute (garbage, division by zero, a value beyond 1e15, deeper than 12 parentheses, longer than 400
characters) falls back to that parser too; never an exception, never `eval`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hpml_ft.tatqa.normalize import parse_model_output

MAX_CHARS = 400  # a derivation longer than this is not one
MAX_DEPTH = 12  # parenthesis nesting
MAX_TOKENS = 120
MAX_ABS = 1e15  # every intermediate value; TAT-QA amounts are far smaller
SCALE_WORDS = ("thousand", "million", "billion", "percent")

_TOKEN = re.compile(
    r"\s*(?:[$€£¥]\s*)?(?:(\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)(%?)|([-+*/()\[\]]))"
)
_OPERATOR = re.compile(r"\d%?[)\]\s]*[-+*/^][-+*/^(\[\s$€£¥]*[\d.]")  # `^`, `**`: shaped, refused later
_COUNT = re.compile(r"^\s*count\s*:\s*", re.I)
_NUMBER_ONLY = re.compile(r"[$€£¥]?\s*-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


class ExecError(ValueError):
    """The text is not a computable expression (caught inside this module, never raised to callers)."""


@dataclass(frozen=True)
class Execution:
    """The outcome for one model output: the (answer, scale) to score and how it was obtained."""

    answer: str | list[str]
    scale: str
    derivation: str | None  # the expression/items part, when the text had the shape of a derivation
    executed: bool  # the executor computed the answer
    failed: bool  # it had the shape of a derivation but did not parse or compute


def _tokens(expr: str) -> list[tuple[str, str]]:
    """('num', '1,571.7') / ('pct', '12.5') / ('op', '+'); raises ExecError on any other character."""
    out, pos, text = [], 0, expr.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ExecError(f"unexpected {text[pos : pos + 10]!r}")
        number, pct, op = m.groups()
        out.append(("op", op) if op else ("pct" if pct else "num", number.replace(",", "")))
        pos = m.end()
        if len(out) > MAX_TOKENS:
            raise ExecError("too many tokens")
    return out


class _Parser:
    """Recursive descent: expr := term (('+'|'-') term)*; term := unary (('*'|'/') unary)*;
    unary := '-' unary | '+' unary | atom; atom := number | '(' expr ')' | '[' expr ']'."""

    def __init__(self, tokens: list[tuple[str, str]], percent_scale: bool) -> None:
        self.tokens, self.i, self.depth, self.percent_scale = tokens, 0, 0, percent_scale

    def peek(self) -> str | None:
        return (
            self.tokens[self.i][1] if self.i < len(self.tokens) and self.tokens[self.i][0] == "op" else None
        )

    def parse(self) -> float:
        if not self.tokens:
            raise ExecError("empty")
        value = self.expr()
        if self.i != len(self.tokens):
            raise ExecError("trailing tokens")
        return value

    def expr(self) -> float:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.tokens[self.i][1]
            self.i += 1
            value = _checked(value + self.term() if op == "+" else value - self.term())
        return value

    def term(self) -> float:
        value = self.unary()
        while self.peek() in ("*", "/"):
            op = self.tokens[self.i][1]
            self.i += 1
            rhs = self.unary()
            if op == "/" and rhs == 0:
                raise ExecError("division by zero")
            value = _checked(value * rhs if op == "*" else value / rhs)
        return value

    def unary(self) -> float:
        if self.peek() in ("-", "+"):
            sign = -1.0 if self.tokens[self.i][1] == "-" else 1.0
            self.i += 1
            self._enter()
            value = sign * self.unary()
            self.depth -= 1
            return value
        return self.atom()

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExecError("nested too deeply")

    def atom(self) -> float:
        if self.i >= len(self.tokens):
            raise ExecError("unexpected end")
        kind, text = self.tokens[self.i]
        self.i += 1
        if kind in ("num", "pct"):
            value = float(text)
            return _checked(value if kind == "num" or self.percent_scale else value / 100)
        closing = {"(": ")", "[": "]"}.get(text)
        if closing is None:
            raise ExecError(f"unexpected {text!r}")
        self._enter()
        value = self.expr()
        if self.peek() != closing:
            raise ExecError("unbalanced parentheses")
        self.i += 1
        self.depth -= 1
        return value


def _checked(value: float) -> float:
    if not abs(value) <= MAX_ABS:  # also catches nan
        raise ExecError("value out of range")
    return value


def evaluate_expression(expr: str, scale: str = "") -> float:
    """The value of an arithmetic expression (raises ExecError when it is not one)."""
    if len(expr) > MAX_CHARS:
        raise ExecError("too long")
    return _Parser(_tokens(expr), scale == "percent").parse()


def format_number(value: float) -> str:
    """Rounded to 2 decimals as TAT-QA answers are, trailing zeros dropped: 2.1, -22.22, 172."""
    text = f"{round(value, 2):.2f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def split_scale(text: str) -> tuple[str, str]:
    """('expr', 'percent') from 'expr | percent'; ('expr', '') when no scale word ends the text."""
    head, sep, tail = text.rpartition("|")
    if sep and tail.strip().lower() in SCALE_WORDS:
        return head.strip(), tail.strip().lower()
    return text.strip(), ""


def looks_like_expression(text: str) -> bool:
    """A binary operator between numbers: what a derivation has and a number or a span rarely has."""
    return bool(_OPERATOR.search(text)) and not re.search(r"[A-Za-z_]", text)


def _count(text: str) -> Execution:
    body = _COUNT.sub("", text, count=1)
    items = [item.strip() for item in body.split("|") if item.strip()]
    if not items or len(text) > 4 * MAX_CHARS:
        return _fallback(text, body, failed=True)
    return Execution(str(len(items)), "", body.strip(), True, False)


def _fallback(text: str, derivation: str | None, failed: bool) -> Execution:
    answer, scale = parse_model_output(text, keep_number_text=True)
    return Execution(answer, scale, derivation, False, failed)


def execute(text: str) -> Execution:
    """Score-ready (answer, scale) for one model output; derivations are computed, everything else parsed."""
    text = text.strip()
    if _COUNT.match(text):
        return _count(text)
    expr, scale = split_scale(text)
    expr = expr.splitlines()[-1].strip() if expr else expr  # extract-then-compute: the last line
    shaped = looks_like_expression(expr) or (bool(scale) and bool(re.search(r"\d%?[)\]\s]*[-+*/]", expr)))
    if not shaped:
        # `5,687 | thousand`: a number and its scale, not two spans
        if scale and _NUMBER_ONLY.fullmatch(expr):
            return _fallback(f"{expr}%" if scale == "percent" else f"{expr} {scale}", None, failed=False)
        return _fallback(text, None, failed=False)
    try:
        value = evaluate_expression(expr, scale)
    except ExecError:
        return _fallback(text, expr, failed=True)
    return Execution(format_number(value), scale, expr, True, False)


def render_derivation(expr: str) -> str:
    """A derivation in one canonical spelling: single spaces around operators, [] as (), no currency signs."""
    parts = []
    for m in re.finditer(r"(\d[\d,]*(?:\.\d+)?|\.\d+)(%?)|([-+*/()\[\]])", expr):
        number, pct, op = m.groups()
        parts.append(number + pct if number else {"[": "(", "]": ")"}.get(op, op))
    text = " ".join(parts)
    text = re.sub(r"\( ", "(", re.sub(r" \)", ")", text))
    # a sign (not a binary minus) sticks to its number: at the start, after an operator or '('
    return re.sub(r"(^|[-+*/(] )- (?=[\d(.])", r"\1-", re.sub(r"\(- ", "(-", text))
