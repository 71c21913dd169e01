"""Voting over executed answers (self-consistency over programs): K sampled outputs per question, each
executed (TAT-QA derivations) or normalised (plain answers), and the most common resulting answer wins.

Two outputs vote together when they *compute* the same answer, not when they are written alike: `(a - b) / b`
and `a / b - 1` over the same cells agree. Ties go to the greedy output's answer when it is among the tied,
else to the tied answer sampled first; outputs that do not parse or compute cast no vote, and with no vote
at all the greedy output stands.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from hpml_ft.scoring import normalize
from hpml_ft.tatqa.executor import execute


def _canonical(value: str) -> str:
    """A number as a number (so '1,200.0' and '1200' agree), anything else normalised text."""
    text = value.replace(",", "").strip()
    try:
        return f"{round(float(text), 4):g}"
    except ValueError:
        return normalize(value)


def answer_key(text: str, fmt: str) -> tuple | None:
    """What an output votes for: TAT-QA's executed (answer, scale); else the normalised text. None: no vote."""
    if fmt != "tatqa":
        return (normalize(text),) if text.strip() else None
    run = execute(text)
    if run.failed:
        return None
    answer = run.answer
    parts = tuple(sorted(_canonical(a) for a in answer)) if isinstance(answer, list) else (_canonical(answer),)
    return (parts, run.scale or "")


def vote(greedy: str, samples: list[str], fmt: str) -> tuple[str, dict[str, Any]]:
    """(the output whose answer won, {votes cast, votes for the winner, distinct answers, greedy won})."""
    keys = [answer_key(s, fmt) for s in samples]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return greedy, {"votes": 0, "winner_votes": 0, "distinct": 0, "greedy": True}
    top = max(counts.values())
    tied = [k for k, c in counts.items() if c == top]  # Counter keeps first-seen order
    greedy_key = answer_key(greedy, fmt)
    if greedy_key in tied:
        chosen, from_greedy = greedy, True
    else:
        chosen, from_greedy = samples[keys.index(tied[0])], False
    info = {"votes": sum(counts.values()), "winner_votes": top, "distinct": len(counts), "greedy": from_greedy}
    return chosen, info


def vote_all(greedy: list[str], sampled: list[list[str]], fmt: str) -> tuple[list[str], list[dict]]:
    """`vote` for every question: (chosen outputs, per-question info with every sample kept)."""
    chosen, infos = [], []
    for g, samples in zip(greedy, sampled, strict=True):
        text, info = vote(g, samples, fmt)
        chosen.append(text)
        infos.append({**info, "greedy_output": g, "samples": samples})
    return chosen, infos
