"""TAT-QA rewards for reward fine-tuning (GRPO): each model output scored as eval scores it, one float per output.

Every function takes TRL's reward-function call, `f(completions=[...], gold=[...], **columns) -> list[float]`:
`completions` are the sampled outputs (plain strings, or for chat prompts `[{"role": "assistant", "content":
...}]`), `gold` the dataset column holding each question's gold dict (`uid, answer, answer_type, answer_from,
scale, derivation`, as `tatqa.render` keeps it in `meta["gold"]`; a JSON string or a dict). The output goes through
the same executor and official-metric semantics as `python -m hpml_ft.eval` (`executor.execute`,
`metric.score_prediction`), so a reward of 1 is an answer eval counts as right. Pure functions: no model, no
training imports.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from hpml_ft.tatqa.executor import Execution, execute
from hpml_ft.tatqa.metric import QuestionScore, score_prediction

DERIVED_TYPES = ("arithmetic", "count")  # the answer types whose derivation-target answer is a derivation


def completion_text(completion: Any) -> str:
    """The text of one sampled completion: a string as is, a chat completion's last message content."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], Mapping):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
            return "".join(b.get("text", "") for b in content if isinstance(b, Mapping))
        return str(content or "")
    return str(completion or "")


def gold_dict(gold: Any) -> Mapping[str, Any]:
    """A question's gold dict from the dataset column (stored as JSON so that mixed answer types fit one column)."""
    return json.loads(gold) if isinstance(gold, str) else gold


def _scored(completions: list[Any], gold: list[Any]) -> list[tuple[Execution, QuestionScore]]:
    out = []
    for completion, g in zip(completions, gold, strict=True):
        run = execute(completion_text(completion))
        out.append((run, score_prediction(gold_dict(g), run.answer, run.scale)))
    return out


def tatqa_correct(completions: list[Any], gold: list[Any], **_: Any) -> list[float]:
    """1.0 when the (executed) answer is an exact match under the official metric, else 0.0."""
    return [score.em for _, score in _scored(completions, gold)]


def tatqa_f1(completions: list[Any], gold: list[Any], **_: Any) -> list[float]:
    """The official F1 (0..1): partial credit for spans; equal to exact match for arithmetic and count."""
    return [score.f1 for _, score in _scored(completions, gold)]


def tatqa_scale(completions: list[Any], gold: list[Any], **_: Any) -> list[float]:
    """1.0 when the answer carries the gold scale (official scale accuracy: an empty answer gets none)."""
    return [float(score.scale_ok) for _, score in _scored(completions, gold)]


def tatqa_format(completions: list[Any], gold: list[Any], **_: Any) -> list[float]:
    """1.0 for an output the executor reads as intended: for an arithmetic/count question a derivation that
    computes (`expr | scale`, `count: a | b`); for a span question a non-empty answer that is not a broken
    derivation. 0.0 for a derivation that does not parse or compute, an empty answer, or a plain number where
    the derivation-target recipes (data.tatqa_target: derivation/extract) teach a derivation."""
    rewards = []
    for completion, g in zip(completions, gold, strict=True):
        run = execute(completion_text(completion))
        derived = gold_dict(g).get("answer_type") in DERIVED_TYPES
        rewards.append(float(run.executed if derived else bool(run.answer) and not run.failed))
    return rewards


REWARDS = {f.__name__: f for f in (tatqa_correct, tatqa_f1, tatqa_scale, tatqa_format)}
