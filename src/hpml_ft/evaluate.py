"""Scoring model answers against gold: exact match / token F1, and TAT-QA's official semantics."""

from __future__ import annotations

from collections import Counter
from typing import Any

from hpml_ft.generation import exact_match, normalize


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return float(p == g)
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def score_answers(samples: list[dict], preds: list[str], fmt: str) -> dict[str, Any]:
    """Mean EM and F1 in percent; TAT-QA samples use the official scale-aware scorer."""
    if fmt == "tatqa":
        from hpml_ft.tatqa_metric import parse_model_output, score_prediction

        rows = [score_prediction(s["meta"]["gold"], *parse_model_output(p)) for s, p in zip(samples, preds, strict=True)]
        ems, f1s = [r[0] for r in rows], [r[1] for r in rows]
    else:
        golds = [s["messages"][-1]["content"] for s in samples]
        ems = [exact_match(p, g) for p, g in zip(preds, golds, strict=True)]
        f1s = [token_f1(p, g) for p, g in zip(preds, golds, strict=True)]
    n = max(len(preds), 1)
    return {"exact_match": round(100 * sum(ems) / n, 2), "f1": round(100 * sum(f1s) / n, 2)}
