"""Voting over executed answers (self-consistency over programs): K sampled outputs per question, each
executed (TAT-QA derivations) or normalised (plain answers), and the most common resulting answer wins.

Two outputs vote together when they *compute* the same answer, not when they are written alike: `(a - b) / b`
and `a / b - 1` over the same cells agree. Ties go to the greedy output's answer when it is among the tied,
else to the tied answer sampled first; outputs that do not parse or compute cast no vote, and with no vote
at all the greedy output stands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
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
    """(the output whose answer won, {votes cast, votes for the winner, distinct answers, greedy won, votes for
    the greedy output's answer})."""
    keys = [answer_key(s, fmt) for s in samples]
    counts = Counter(k for k in keys if k is not None)
    if not counts:
        return greedy, {"votes": 0, "winner_votes": 0, "distinct": 0, "greedy": True, "for_greedy": 0}
    top = max(counts.values())
    tied = [k for k, c in counts.items() if c == top]  # Counter keeps first-seen order
    greedy_key = answer_key(greedy, fmt)
    if greedy_key in tied:
        chosen, from_greedy = greedy, True
    else:
        chosen, from_greedy = samples[keys.index(tied[0])], False
    info = {"votes": sum(counts.values()), "winner_votes": top, "distinct": len(counts), "greedy": from_greedy}
    return chosen, {**info, "for_greedy": counts.get(greedy_key, 0)}  # counts holds no None: no vote, 0


def vote_all(greedy: list[str], sampled: list[list[str]], fmt: str) -> tuple[list[str], list[dict]]:
    """`vote` for every question: (chosen outputs, per-question info with every sample kept)."""
    chosen, infos = [], []
    for g, samples in zip(greedy, sampled, strict=True):
        text, info = vote(g, samples, fmt)
        chosen.append(text)
        infos.append({**info, "greedy_output": g, "samples": samples})
    return chosen, infos


def sample_summary(
    greedy_em: Sequence[float], sample_em: Sequence[Sequence[float]], for_greedy: Sequence[int]
) -> dict[str, float]:
    """What the K samples held, in percent: EM of one sample on average; pass@K, questions some sample got right
    (no rule that picks one of the samples can beat it); the same counting the greedy output too (the ceiling of
    voting with ties to greedy); and the share of samples computing the greedy output's answer. Voting can only
    gain where greedy is wrong and the right answer is among the samples, more often than any wrong one."""
    n, k = len(greedy_em), len(sample_em[0]) if sample_em else 0
    if not n or not k:
        return {"sample_em": 0.0, "pass_at_k": 0.0, "ceiling": 0.0, "agree_greedy": 0.0}
    return {
        "sample_em": round(100 * sum(map(sum, sample_em)) / (n * k), 2),
        "pass_at_k": round(100 * sum(max(row) for row in sample_em) / n, 2),
        "ceiling": round(100 * sum(max(g, *row) for g, row in zip(greedy_em, sample_em, strict=True)) / n, 2),
        "agree_greedy": round(100 * sum(for_greedy) / (n * k), 2),
    }
