"""TAT-QA answer text: the official scorer's normalisation (own implementation) and model output parsing.

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

:func:`parse_model_output` turns free-form model text into an ``(answer, scale)`` prediction.
"""

from __future__ import annotations

import ast
import json
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


_PREFIX = re.compile(
    r"^\s*(?:(?:the\s+)?(?:final\s+)?answer\s*(?:is\s*)?[:：]|the\s+(?:final\s+)?answer\s+is\b)\s*", re.I
)
_SCALE_LINE = re.compile(r"^\s*scale\s*[:：]\s*(.*?)\s*$", re.I | re.M)
_IN_SCALE = re.compile(r"\(?\s*\bin\s+(?:US\$|\$)?\s*(thousand|million|billion)s?\b\s*\)?", re.I)
_SEPARATOR = re.compile(r"\r?\n|;|\s\|\s")
_BULLET = re.compile(r"^(?:[-*•]|\d+[.)])\s+")
_QUOTED_LIST = re.compile(r'^(?:"[^"]*"\s*,\s*)+"[^"]*"$|^(?:\'[^\']*\'\s*,\s*)+\'[^\']*\'$')
_CURRENCY = re.compile(r"^[$€£¥]\s*")
_UNIT = re.compile(r"\s*(%|percent|thousands?|millions?|billions?)$", re.I)
_SIGNED = re.compile(r"(?P<sign>[-+]?)\s*[$€£¥]?\s*(?P<num>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)")


def _negate(number: str) -> str:
    """Flip the sign of a canonical number string."""
    return number[1:] if number.startswith("-") else "-" + number


def _parse_number(text: str) -> tuple[str, str] | None:
    """``(canonical number, scale)`` when the whole item is a number with optional sign/currency/unit."""
    text = _CURRENCY.sub("", text.strip().removesuffix("."), count=1).strip()
    if len(text) > 2 and text[0] == "(" and text[-1] == ")":  # "(123)", "($1.2 million)"
        inner = _parse_number(text[1:-1])
        return None if inner is None else (_negate(inner[0]), inner[1])
    unit = _UNIT.search(text)
    if unit and unit.start() > 0:  # "12.5%", "$3.2 billion", "(71) million"
        inner = _parse_number(text[: unit.start()])
        if inner is None or inner[1]:
            return None
        scale = unit.group(1).lower().rstrip("s")
        return inner[0], "percent" if scale == "%" else scale
    match = _SIGNED.fullmatch(text)
    if match is None:
        return None
    number = match["num"].replace(",", "")
    number = "0" + number if number.startswith(".") else number
    return (_negate(number) if match["sign"] == "-" else number), ""


def _split_items(text: str) -> list[str]:
    """Answer items: a JSON/Python list, else lines / ";" / " | " pieces, each maybe a quoted comma list."""
    if text.startswith("[") and text.endswith("]"):
        for loader in (json.loads, ast.literal_eval):
            try:
                parsed = loader(text)
            except (ValueError, SyntaxError):
                continue
            if isinstance(parsed, list):
                return [str(item) for item in parsed]
    items: list[str] = []
    for piece in _SEPARATOR.split(text):
        piece = _BULLET.sub("", piece.strip())
        items.extend(re.findall(r'"([^"]*)"|\'([^\']*)\'', piece) if _QUOTED_LIST.match(piece) else [piece])
    return [item if isinstance(item, str) else "".join(item) for item in items]


def _clean_item(item: str) -> str:
    """Strip spaces, markdown bold and wrapping quotes (a final period stays: text is kept verbatim)."""
    item = item.strip().strip("*").strip()
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'`":
        item = item[1:-1].strip()
    return item


def _scale_hints(text: str) -> tuple[str | None, str]:
    """Scale from a "Scale: ..." line or an "(in thousands)" phrase (None if neither), and the rest."""
    line = _SCALE_LINE.search(text)
    text = _PREFIX.sub("", _SCALE_LINE.sub("", text).strip()).strip()
    if line:
        word = line.group(1).lower().rstrip("s")
        return ("percent" if word == "%" else word if word in SCALES else ""), text
    phrase = _IN_SCALE.search(text)
    if phrase:
        return phrase.group(1).lower(), (text[: phrase.start()] + text[phrase.end() :]).strip()
    return None, text


def _number_answer(item: str, parsed: tuple[str, str], scale: str, keep_text: bool) -> str:
    """A numeric item as answer text: canonical (or as written), its unit dropped when it is the scale."""
    number, unit = parsed
    body = item.strip().removesuffix(".").strip()
    if keep_text and (not unit or _UNIT.search(body)):
        return _UNIT.sub("", body).strip() if unit == scale else body
    if unit in ("", scale):
        return number
    return f"{number}%" if unit == "percent" else f"{number} {unit}"


def parse_model_output(text: str, keep_number_text: bool = False) -> tuple[str | list[str], str]:
    """Parse free-form model output into an official ``(answer, scale)`` prediction.

    1. A leading "Answer:", "Final answer:" or "The answer is" is dropped. A line "Scale: <word>" sets the
       scale (none/unknown words give ""); otherwise a phrase "(in thousands)" / "in $ millions" does.
       Either is removed from the text.
    2. Items: a JSON/Python list literal gives its elements; otherwise the text is split on newlines, ";"
       and " | ", and a piece made only of quoted, comma-separated strings gives each string. Bullets
       ("- ", "* ", "1. ") go. Plain commas never split (they are thousands separators).
    3. Items lose wrapping quotes and ``**``. An item that is one number (optional trailing period) becomes a
       canonical number string: commas removed, "(123)" or "-123" give "-123", ".5" gives "0.5", a leading
       $ € £ ¥ dropped, and a trailing unit ("%", "percent", "thousand(s)", "million(s)", "billion(s)")
       moved to the scale when no "Scale:"/"in ..." hint was given (the first number with a unit decides);
       a unit that differs from the scale stays on its number. Other items are kept verbatim (including a
       final period), because the official scorer reads raw gold text: e.g. "US$1,234", "£5.1m" and "−7"
       (Unicode minus) are text to it, and so they stay text here.
    4. One item gives a string answer; several give a list; none gives "".

    ``keep_number_text=True`` keeps numbers as written ("$(1,234)", minus the unit moved to the scale): the
    official scorer then reads them exactly as it reads the same gold text, quirks included ("(1,234)" is
    +1234 to it, and multi-span items are sorted as raw strings before comparing).
    """
    hinted, text = _scale_hints(text)
    items = [item for item in (_clean_item(raw) for raw in _split_items(text)) if item]
    parsed = [_parse_number(item) for item in items]
    scale = hinted if hinted is not None else next((p[1] for p in parsed if p and p[1]), "")
    answers = [
        _number_answer(item, p, scale, keep_number_text) if p else item
        for item, p in zip(items, parsed, strict=True)
    ]
    if len(answers) == 1:
        return answers[0], scale
    return (answers if answers else ""), scale
