"""TAT-QA scoring with exactly the numbers of the official scorer (NExTplusplus/TAT-QA), own implementation.

Per question (see :func:`score_prediction`):

* An empty prediction (``None``, ``""``, ``[]`` and, as in the official scorer, the numbers ``0``/``0.0``)
  scores EM 0, F1 0, and no scale credit. So does a gold answer with no items.
* Gold and prediction each become ONE comparison string (:func:`hpml_ft.tatqa.normalize.answer_string`):
  items sorted, numbers rounded to 2 decimals and multiplied by the scale, joined with spaces. A wrong
  scale therefore breaks EM for numbers, and adds the scale word to text spans. Multi-span answers are
  compared as one joined string, so the 1-to-1 span alignment of DROP always has a single pair here.
* EM: the normalised strings are equal. F1: bag-of-words F1 between the normalised strings, rounded to 2
  decimals the way numpy rounds (``rint(x * 100) / 100``). For "arithmetic" and "count" gold types F1 = EM.
* A lone unscaled numeric prediction is also tried un-rounded (the percent quirk: 0.2342 matches 23.42
  with scale "percent"); the better (EM, F1) pair wins.
* Scale accuracy counts ``pred_scale == gold["scale"]`` only for questions that were scored (non-empty
  prediction and gold).

Totals are plain sums in gold-file order divided by the number of questions; the per answer_type x
answer_from breakdown uses compensated (Kahan) means as pandas does.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from hpml_ft.tatqa.normalize import (
    SCALES,
    answer_string,
    is_number,
    normalize_answer,
    parse_model_output,
    prediction_strings,
    to_number,
)

__all__ = [
    "SCALES",
    "QuestionScore",
    "TaTQAScorer",
    "answer_string",
    "gold_items",
    "is_number",
    "iter_questions",
    "normalize_answer",
    "parse_model_output",
    "score_file",
    "score_prediction",
    "score_predictions",
    "to_number",
    "write_official_predictions",
]


class QuestionScore(NamedTuple):
    """Scores of one question: exact match (0/1), F1 (0..1, 2 decimals) and whether the scale counts."""

    em: float
    f1: float
    scale_ok: bool


def _numpy_round2(value: float) -> float:
    """Round to 2 decimals like ``numpy.round``: scale by 100, round half to even, scale back."""
    return round(value * 100.0) / 100.0


def _bag_f1(predicted: set[str], gold: set[str]) -> float:
    """DROP bag-of-words F1; an empty bag has precision (or recall) 1."""
    common = len(gold & predicted)
    precision = common / float(len(predicted)) if predicted else 1.0
    recall = common / float(len(gold)) if gold else 1.0
    if precision == 0.0 and recall == 0.0:
        return 0.0
    return (2 * precision * recall) / (precision + recall)


def _em_f1(predicted: str, gold: str) -> tuple[float, float]:
    """Exact match and rounded bag F1 of two comparison strings."""
    pred_norm, gold_norm = normalize_answer(predicted), normalize_answer(gold)
    em = 1.0 if pred_norm == gold_norm else 0.0
    return em, _numpy_round2(_bag_f1(set(pred_norm.split()), set(gold_norm.split())))


def gold_items(gold: Mapping[str, Any]) -> list[Any]:
    """Answer items of a gold question: span lists as is, counts as an int string, others as a string."""
    answer_type, answer = gold["answer_type"], gold["answer"]
    if answer_type in ("span", "multi-span"):
        return list(answer)
    if answer_type == "count":
        return [str(int(answer))]
    return [str(answer)]


def score_prediction(gold: Mapping[str, Any], pred_answer: Any, pred_scale: str | None) -> QuestionScore:
    """Score one prediction against a TAT-QA question dict (answer, answer_type, scale)."""
    items = gold_items(gold)
    if not pred_answer or not items:
        return QuestionScore(0.0, 0.0, False)
    gold_string = answer_string(items, gold["scale"])
    em, f1 = max(_em_f1(candidate, gold_string) for candidate in prediction_strings(pred_answer, pred_scale))
    if gold["answer_type"] in ("arithmetic", "count"):
        f1 = em
    return QuestionScore(em, f1, pred_scale == gold["scale"])


@dataclass
class _Cell:
    """Running count and compensated sums of EM and F1 for one answer_type x answer_from cell."""

    count: int = 0
    sums: list[float] = field(default_factory=lambda: [0.0, 0.0])
    carry: list[float] = field(default_factory=lambda: [0.0, 0.0])

    def add(self, em: float, f1: float) -> None:
        """Add one question's EM and F1 (Kahan summation, like pandas' grouped mean)."""
        self.count += 1
        for i, value in enumerate((em, f1)):
            adjusted = value - self.carry[i]
            total = self.sums[i] + adjusted
            self.carry[i] = total - self.sums[i] - adjusted
            self.sums[i] = total

    def means(self) -> dict[str, float]:
        """``{count, em, f1}`` with mean EM and F1; zeros for an empty cell (pandas' fillna(0))."""
        if not self.count:
            return {"count": 0, "em": 0.0, "f1": 0.0}
        return {"count": self.count, "em": self.sums[0] / self.count, "f1": self.sums[1] / self.count}


class TaTQAScorer:
    """Accumulates question scores; :meth:`summary` gives the official overall and breakdown numbers."""

    def __init__(self) -> None:
        self.count = 0
        self._em = 0.0
        self._f1 = 0.0
        self._scale = 0
        self._cells: dict[tuple[str, str], _Cell] = {}

    def add(self, gold: Mapping[str, Any], pred_answer: Any, pred_scale: str | None) -> QuestionScore:
        """Score one question, add it to the totals and return its score."""
        score = score_prediction(gold, pred_answer, pred_scale)
        self.count += 1
        self._em += score.em
        self._f1 += score.f1
        self._scale += int(score.scale_ok)
        key = (str(gold["answer_type"]), str(gold["answer_from"]))
        self._cells.setdefault(key, _Cell()).add(score.em, score.f1)
        return score

    def breakdown(self) -> dict[str, dict[str, dict[str, float]]]:
        """``{answer_type: {answer_from: {count, em, f1}}}`` over every type and source seen (0 if empty)."""
        types = sorted({answer_type for answer_type, _ in self._cells})
        sources = sorted({source for _, source in self._cells})
        return {
            kind: {source: self._cells.get((kind, source), _Cell()).means() for source in sources}
            for kind in types
        }

    def summary(self) -> dict[str, Any]:
        """Overall EM, F1 and scale accuracy as fractions (official prints them x100, 2 decimals)."""
        n = self.count
        return {
            "count": n,
            "em": self._em / n if n else 0.0,
            "f1": self._f1 / n if n else 0.0,
            "scale": self._scale / n if n else 0.0,
            "breakdown": self.breakdown(),
        }


def iter_questions(dataset: Iterable[Mapping[str, Any]]) -> Iterable[Mapping[str, Any]]:
    """Questions of a TAT-QA dataset (a list of contexts with "questions"), in file order."""
    for context in dataset:
        yield from context["questions"]


def score_predictions(dataset: Iterable[Mapping[str, Any]], predictions: Mapping[str, Any]) -> dict[str, Any]:
    """Score ``{uid: [answer, scale]}`` predictions on every gold question; a missing uid scores 0."""
    scorer = TaTQAScorer()
    for question in iter_questions(dataset):
        answer, scale = predictions.get(question["uid"], (None, None))
        scorer.add(question, answer, scale)
    return scorer.summary()


def score_file(gold_path: str | os.PathLike[str], pred_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Score an official-format prediction file against a TAT-QA gold file (see `TaTQAScorer.summary`)."""
    dataset = json.loads(Path(gold_path).read_text(encoding="utf-8"))
    predictions = json.loads(Path(pred_path).read_text(encoding="utf-8"))
    return score_predictions(dataset, predictions)


def write_official_predictions(preds: Mapping[str, tuple[Any, str]], path: str | os.PathLike[str]) -> Path:
    """Write ``{uid: [answer, scale]}`` JSON atomically (temporary file in the same folder, then replace)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = {uid: [answer, scale] for uid, (answer, scale) in preds.items()}
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, ensure_ascii=False, indent=1)
            handle.write("\n")
        os.replace(tmp_name, target)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return target
