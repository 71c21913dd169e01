"""The judge's prompt (Prometheus-style 1-5 rubric), score parsing and summaries, and what a judge is
(`JudgeSpec`): everything of LLM-as-judge except running it (`hpml_ft.eval.judge`)."""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from hpml_ft.config import redact_text
from hpml_ft.config import runtime as rt

JUDGE_TASK = """You are grading one answer written by an AI assistant.

# What you are given
- INSTRUCTION: what the assistant was asked (it may contain a table, a passage or other input).
- RESPONSE: the assistant's answer. This is the text you grade.
- REFERENCE ANSWER: an answer that deserves the top score, when one is available. Use it to check facts and \
numbers; a response may be worded differently and still be fully correct.
- RUBRIC: the criterion and what each score from 1 to 5 means.

# How to answer
1. Write a short feedback paragraph that judges the RESPONSE against the RUBRIC only, not your general taste.
2. Then choose one whole number from 1 to 5, following the RUBRIC.
3. Your reply must end with a line of exactly this form: [RESULT] N
   where N is that number. Write nothing after it.

# INSTRUCTION
{instruction}

# RESPONSE
{response}
{reference_block}
# RUBRIC
{rubric}

# Your feedback, then the [RESULT] line
Feedback:"""

REFERENCE_BLOCK = "\n# REFERENCE ANSWER (deserves a 5)\n{reference}\n"

DEFAULT_RUBRIC = """Does the response answer the instruction correctly, completely and to the point?
Score 1: Wrong or irrelevant: it does not answer the question, contradicts the reference, or is unreadable.
Score 2: Mostly wrong: it addresses the question, but its key fact, number or conclusion is incorrect.
Score 3: Partly right: some of the needed content is correct, but parts are missing, wrong, or badly off in \
unit or scale.
Score 4: Right with small flaws: the answer is correct, with minor omissions, extra text or imprecise wording.
Score 5: Fully right: correct, complete and concise, matching the reference in substance."""

_NUM = r"\**\s*\(?\s*([1-5])(?:\.0+)?(?!\.?\d)"  # 1..5, "4.0" ok; "4.5", "10", "45" are not scores
_RESULT = re.compile(r"\[\s*RESULT\s*\]\s*[:=\-]?\s*" + _NUM, re.I)
_FALLBACKS = (
    # "Score: 4", "rating of 4"; not an echoed rubric line "Score 4: ..."
    re.compile(
        r"\b(?:final\s+)?(?:score|rating|grade|result)\s*(?:is|of|=|:)?\s*[:=]?\s*" + _NUM + r"(?!\s*:)", re.I
    ),
    re.compile(r"\b([1-5])\s*(?:/|out\s+of)\s*5\b", re.I),
)


def build_judge_prompt(
    instruction: str, response: str, reference: str | None = None, rubric: str = DEFAULT_RUBRIC
) -> str:
    """The judge's full prompt; the reference block is left out when there is no reference answer."""
    block = REFERENCE_BLOCK.format(reference=reference.strip()) if reference and reference.strip() else ""
    return JUDGE_TASK.format(
        instruction=instruction.strip(),
        response=response.strip() or "(empty response)",
        reference_block=block,
        rubric=rubric.strip(),
    )


def parse_score(text: str | None) -> int | None:
    """The judge's 1-5 score: the last `[RESULT] N`; else the last `Score: N(/5)` or `N/5`; else None."""
    if not text:
        return None
    for pattern in (_RESULT, *_FALLBACKS):
        found = pattern.findall(text)
        if found:
            return int(found[-1])
    return None


def summarize(scores: list[int | None], errors: int = 0) -> dict[str, Any]:
    """Mean over parsed scores, the 1-5 distribution, and how many were unparsed (request errors included)."""
    parsed = [s for s in scores if s is not None]
    counts = Counter(parsed)
    return {
        "n": len(scores),
        "parsed": len(parsed),
        "unparsed": len(scores) - len(parsed),
        "errors": errors,
        "mean": round(sum(parsed) / len(parsed), 3) if parsed else None,
        "distribution": {str(k): counts.get(k, 0) for k in range(1, 6)},
    }


@dataclass(frozen=True)
class JudgeSpec:
    path: str | None = None  # a resolved local model directory (or hub id)
    adapter: str | None = None  # an unmerged PEFT adapter applied to `path`
    url: str | None = None  # OpenAI-compatible base URL ending in /v1
    model: str | None = None  # model name sent to the endpoint
    timeout: float = rt.JUDGE_TIMEOUT_S  # seconds per request
    max_new_tokens: int = rt.JUDGE_MAX_NEW_TOKENS
    batch_size: int = rt.JUDGE_BATCH_SIZE  # local judge
    concurrency: int = rt.JUDGE_CONCURRENCY  # endpoint requests in flight at once
    retries: int = rt.JUDGE_RETRIES  # extra tries of a failed endpoint request
    rubric: str = DEFAULT_RUBRIC
    api_key: str | None = field(default=None, repr=False)  # sent as a Bearer token to `url` only

    @property
    def name(self) -> str:
        """What outputs and records show: a password in the URL (user:pass@host) as ***."""
        return f"{redact_text(self.url)} ({self.model})" if self.url else str(self.path)
