"""Answer normalisation with the same results as the official TAT-QA scorer (own implementation).

The official scorer (NExTplusplus/TAT-QA, ``tatqa_metric.py`` + ``tatqa_utils.py``) turns every answer into
ONE string before comparing: the answer items are sorted as given, each numeric item is rewritten as its
value times the scale with four decimals, non-numeric items get the scale word appended, and the items are
joined with spaces. That string is then normalised token by token (lower case, punctuation dropped unless
the token reads as a number, numbers re-printed, articles dropped). The rules reproduced here, quirks
included, are:

* A text "is a number" when its first whitespace word, with the characters ``'"\\$€£¥%(),[]`` removed,
  parses as a Python ``float`` that is not NaN ("inf" counts), and its second word, if any, is a scale word.
* Its value is the first ``[+-]?digits[.digits]`` in the cleaned text (a leading-dot number such as ".5"
  has NO value), times the scale of the first "number word" pair (hundred/thousand/million/billion/
  percent, by substring), times -1 when a ``(digits)`` group appears (not ``(1,234)``: the comma blocks
  it), times 0.01 when digits are followed by "%"; rounded to 4 decimals.
* A numeric answer item becomes ``f"{round(value, 2) * scale:.4f}"``; an item containing "%" becomes
  ``f"{value:.4f}"`` (its scale is ignored).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from typing import Any

Number = int | float

SCALES: tuple[str, ...] = ("", "thousand", "million", "billion", "percent")
_SCALE_WORDS: tuple[tuple[str, Number], ...] = (
    ("hundred", 100),
    ("thousand", 1000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
    ("percent", 0.01),
)
_NUMBER_JUNK = frozenset("'\"\\$€£¥%(),[]")
_PUNCTUATION = frozenset(string.punctuation)
_FIRST_NUMBER = re.compile(r"[+-]?\d+(?:\.\d+)?|[+-]?\.\d+")
_NUMBER_WORD = re.compile(r"[\d.]+\s?[a-zA-Z]+")
_NEGATIVE = re.compile(r"\([\d.\s]+\)")
_PERCENT = re.compile(r"[\d.\s]+%")
_ARTICLE = re.compile(r"\b(?:a|an|the)\b")


def scale_factor(scale: str) -> Number:
    """Multiplier of a scale text, found by substring in the order hundred..percent; 1 if none."""
    lowered = scale.lower()
    for word, factor in _SCALE_WORDS:
        if word in lowered:
            return factor
    return 1


def _strip_number_junk(text: str) -> str:
    """Drop currency signs, quotes, brackets, commas and "%" (characters that may surround a number)."""
    return "".join(ch for ch in text if ch not in _NUMBER_JUNK)


def is_number(text: str) -> bool:
    """True when the text reads as a number (optionally followed by a scale word), per the official rule."""
    words = [cleaned for cleaned in (_strip_number_junk(w) for w in text.split()) if cleaned]
    if not words:
        return False
    try:
        value = float(words[0])
    except ValueError:
        return False
    if value != value:  # NaN
        return False
    return len(words) < 2 or scale_factor(words[1]) != 1


def _first_number(text: str) -> Number | None:
    """First number in the cleaned text; None when absent or when it starts with a bare dot (".5")."""
    match = _FIRST_NUMBER.search(_strip_number_junk(text))
    if match is None:
        return None
    token = match.group(0)
    if token.lstrip("+-").startswith("."):
        return None
    return float(token) if "." in token else int(token)


def to_number(text: str) -> Number | None:
    """Value of a numeric text with word scale, "(123)" negation and "%" applied, rounded to 4 decimals."""
    number = _first_number(text)
    word = _NUMBER_WORD.search(text)
    word_scale = scale_factor(word.group(0)) if word else 1
    sign = -1 if _NEGATIVE.search(text.strip()) else 1
    percent = 0.01 if _PERCENT.search(text.strip()) else 1
    if number is None:
        return None
    return round(number * word_scale * sign * percent, 4)


def _normalize_token(token: str) -> str:
    """Normalise one space-separated token: lower, de-punctuate non-numbers, re-print numbers, no articles."""
    token = token.lower()
    if not is_number(token):
        token = "".join(ch for ch in token if ch not in _PUNCTUATION)
    if is_number(token):
        token = str(to_number(token))  # may print "None" (e.g. ".5"), as the official scorer does
    return " ".join(_ARTICLE.sub(" ", token).split())


def normalize_answer(text: str) -> str:
    """Normalised form of an answer string: tokens split on single spaces, normalised, empties dropped."""
    parts = [_normalize_token(token) for token in text.split(" ")]
    return " ".join(part for part in parts if part.strip()).strip()


def _sorted_items(items: Sequence[Any]) -> list[Any]:
    """Items in Python sort order (the official order); mixed str/number lists fall back to text order."""
    try:
        return sorted(items)
    except TypeError:  # the official scorer raises here; we compare by text instead
        return sorted(items, key=str)


def _item_string(item: Any, scale: str) -> str:
    """One answer item as the official scorer prints it before normalisation."""
    text = str(item)
    if not is_number(text):
        return f"{text} {scale}" if scale else text
    value = to_number(text)
    if value is None:
        return f"{text} {scale}" if scale else text
    if "%" in text:
        return f"{value:.4f}"
    return f"{round(value, 2) * scale_factor(scale):.4f}"


def answer_string(items: Sequence[Any], scale: str | None) -> str:
    """The single comparison string of an answer: sorted items, scaled numbers, joined with spaces."""
    scale = scale or ""
    return " ".join(_item_string(item, scale) for item in _sorted_items(items))


def prediction_strings(prediction: Any, scale: str | None) -> list[str]:
    """Candidate strings of a prediction: its answer string, plus the raw value for a lone unscaled number.

    The second candidate is the official "percent" quirk: a prediction of 0.2342 with no scale and no "%"
    also matches a gold 23.42 with scale "percent" (whose string is "0.2342"); it is not rounded to 2 places.
    """
    items = list(prediction) if isinstance(prediction, list | tuple) else [prediction]
    candidates = [answer_string(items, scale)]
    if len(items) == 1:
        text = str(items[0])
        if not scale and "%" not in text and is_number(text):
            value = to_number(text)
            if value is not None:
                candidates.append(f"{value:.4f}")
    return candidates
