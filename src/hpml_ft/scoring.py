"""The one scoring path: every score (eval, training's quick eval, infer's verdicts, bench lowbit) comes from
`score_samples`: exact match / token F1 of plain answers, and TAT-QA through the derivation executor and the
official scorer's semantics (hpml_ft.tatqa)."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from hpml_ft.tatqa.executor import execute
from hpml_ft.tatqa.metric import TaTQAScorer


def normalize(text: str) -> str:
    """Lower-case, drop punctuation and articles, squeeze spaces (SQuAD-style)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize(pred) == normalize(gold))


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if not p or not g or not common:
        return float(p == g)
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def _pct(x: float) -> float:
    return round(100 * x, 2)


def prompt_text(messages: list[dict]) -> str:
    """A prompt as readable text: a lone user turn as is, else one `role: content` block per turn."""
    if len(messages) == 1 and messages[0]["role"] == "user":
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _tatqa_rows(samples: list[dict], preds: list[str]) -> tuple[list[dict], dict[str, Any]]:
    scorer, rows = TaTQAScorer(), []
    for s, pred in zip(samples, preds, strict=True):
        gold = s["meta"]["gold"]
        # derivations (`expr | scale`, `count: a | b`) are computed by the safe executor; other answers keep
        # numbers as written: models trained here answer in the gold's own text form (tatqa_data.render_answer)
        run = execute(pred)
        answer, scale = run.answer, run.scale
        score = scorer.add(gold, answer, scale)
        rows.append(
            {
                "pred_answer": answer,
                "pred_scale": scale,
                "derivation": run.derivation,
                "executed": run.executed,
                "exec_failed": run.failed,
                "em": score.em,
                "f1": score.f1,
                "scale_ok": score.scale_ok,
                "answer_type": gold.get("answer_type"),
                "answer_from": gold.get("answer_from"),
            }
        )
    summary = scorer.summary()
    breakdown = {
        kind: {
            src: {"count": c["count"], "exact_match": _pct(c["em"]), "f1": _pct(c["f1"])}
            for src, c in by_src.items()
        }
        for kind, by_src in summary["breakdown"].items()
    }
    metrics = {
        "exact_match": _pct(summary["em"]),
        "f1": _pct(summary["f1"]),
        "scale_accuracy": _pct(summary["scale"]),
        "breakdown": breakdown,
        # answers the executor computed from a derivation / derivation-shaped answers it could not compute
        "executor": {
            "executed": sum(r["executed"] for r in rows),
            "parse_failures": sum(r["exec_failed"] for r in rows),
        },
    }
    return rows, metrics


def score_samples(samples: list[dict], preds: list[str], fmt: str) -> tuple[list[dict], dict[str, Any]]:
    """Per-sample rows (id, prompt, gold, pred, em, f1, ...) and the metrics of the whole set (percent)."""
    if fmt == "tatqa":
        extra, metrics = _tatqa_rows(samples, preds)
    else:
        golds = [s["messages"][-1]["content"] for s in samples]
        extra = [
            {"em": exact_match(p, g), "f1": round(token_f1(p, g), 4)}
            for p, g in zip(preds, golds, strict=True)
        ]
        n = max(len(preds), 1)
        metrics = {
            "exact_match": _pct(sum(r["em"] for r in extra) / n),
            "f1": _pct(sum(r["f1"] for r in extra) / n),
        }
    rows = [
        {
            "id": s.get("id", i),
            "prompt": prompt_text(s["messages"][:-1]),
            "gold": s["messages"][-1]["content"],
            "pred": p,
            **e,
        }
        for i, (s, p, e) in enumerate(zip(samples, preds, extra, strict=True))
    ]
    return rows, {"n": len(samples), **metrics}


def official_predictions(rows: list[dict]) -> dict[str, tuple[Any, str]]:
    """TAT-QA `{uid: (answer, scale)}` from scored rows, for `tatqa.metric.write_official_predictions`."""
    return {r["id"]: (r["pred_answer"], r["pred_scale"]) for r in rows}
