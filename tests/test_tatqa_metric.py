"""Tests of the TAT-QA scorer (official-scorer semantics) on a small invented fixture."""

from __future__ import annotations

import json

import pytest

from hpml_ft.tatqa.metric import (
    TaTQAScorer,
    _numpy_round2,
    is_number,
    normalize_answer,
    parse_model_output,
    score_file,
    score_prediction,
    to_number,
    write_official_predictions,
)


def _q(uid: str, answer, answer_type: str, answer_from: str, scale: str = "") -> dict:
    return {
        "uid": uid,
        "question": f"Invented question {uid}?",
        "answer": answer,
        "answer_type": answer_type,
        "answer_from": answer_from,
        "scale": scale,
    }


# Invented report of a fictional company (figures made up for these tests).
SPAN_K = _q("span-k", ["$1,250"], "span", "table", "thousand")
SEGMENTS = _q("segments", ["Retail", "Wholesale", "Online"], "multi-span", "table-text")
RATIO = _q("ratio", 2.35, "arithmetic", "table")
RATIO_3DP = _q("ratio-3dp", 2.675, "arithmetic", "table")
MARGIN = _q("margin", 23.42, "arithmetic", "table-text", "percent")
COUNT = _q("count", "3", "count", "table")
LOSS = _q("loss", -12.5, "arithmetic", "text", "million")
REASON = _q("reason", ["higher freight costs and lower volumes"], "span", "text")
PAREN = _q("paren", ["(1,234)"], "span", "table", "thousand")
ZERO = _q("zero", 0, "arithmetic", "table")
ALL = [SPAN_K, SEGMENTS, RATIO, RATIO_3DP, MARGIN, COUNT, LOSS, REASON, PAREN, ZERO]
DATASET = [
    {
        "table": {"uid": "t1", "table": [["", "2021", "2020"], ["Revenue", "$1,250", "$1,100"]]},
        "paragraphs": [{"uid": "p1", "order": 1, "text": "Invented paragraph about Northwind Holdings."}],
        "questions": ALL[:5],
    },
    {
        "table": {"uid": "t2", "table": [["Segment", "Units"], ["Retail", "3"]]},
        "paragraphs": [{"uid": "p2", "order": 1, "text": "Another invented paragraph."}],
        "questions": ALL[5:],
    },
]


@pytest.mark.parametrize("gold", [q for q in ALL if q is not ZERO], ids=lambda q: q["uid"])
def test_gold_fed_back_is_exact(gold):
    assert score_prediction(gold, gold["answer"], gold["scale"]) == (1.0, 1.0, True)


def test_numeric_zero_prediction_counts_as_empty():
    # official quirk: `not prediction` is true for 0, so a gold answer of 0 fed back as a number scores 0
    assert score_prediction(ZERO, 0, "") == (0.0, 0.0, False)
    assert score_prediction(ZERO, "0", "") == (1.0, 1.0, True)


@pytest.mark.parametrize("empty", [None, "", []])
def test_empty_prediction_scores_zero_and_no_scale_credit(empty):
    assert score_prediction(SPAN_K, empty, "thousand") == (0.0, 0.0, False)


def test_wrong_scale_fails_em():
    assert score_prediction(SPAN_K, ["$1,250"], "million") == (0.0, 0.0, False)
    assert score_prediction(SPAN_K, "1250000", "") == (1.0, 1.0, False)  # value right, scale wrong
    # a text span gets the scale word appended: 6 of 7 words match
    assert score_prediction(REASON, REASON["answer"], "thousand") == (0.0, 0.92, False)


def test_numbers_are_rounded_to_two_decimals():
    assert score_prediction(RATIO, 2.345, "").em == 1.0
    assert score_prediction(RATIO, "2.3456", "").em == 1.0
    assert score_prediction(RATIO, 2.344, "") == (0.0, 0.0, True)
    assert score_prediction(RATIO, 2.36, "").em == 0.0
    # the gold is rounded too, with binary floats: 2.675 is stored as 2.67499... and rounds to 2.67
    assert score_prediction(RATIO_3DP, 2.67, "").em == 1.0
    assert score_prediction(RATIO_3DP, 2.68, "").em == 0.0


def test_percent_quirk():
    assert score_prediction(MARGIN, 23.42, "percent") == (1.0, 1.0, True)
    assert score_prediction(MARGIN, 0.2342, "") == (1.0, 1.0, False)  # raw value tried when no scale
    assert score_prediction(MARGIN, 0.23418, "").em == 1.0  # that candidate is rounded to 4 places only
    assert score_prediction(MARGIN, "23.42%", "") == (1.0, 1.0, False)
    assert score_prediction(MARGIN, 23.42, "") == (0.0, 0.0, False)


def test_multi_span_order_and_case():
    assert score_prediction(SEGMENTS, ["Online", "Retail", "Wholesale"], "") == (1.0, 1.0, True)
    assert score_prediction(SEGMENTS, ["wholesale", "online", "retail"], "").em == 1.0
    # items are sorted as raw strings before normalising: "Wholesale" < "retail" changes the order
    assert score_prediction(SEGMENTS, ["Wholesale", "retail", "Online"], "") == (0.0, 1.0, True)
    assert score_prediction(SEGMENTS, ["Retail", "Online"], "") == (0.0, 0.8, True)


def test_negative_numbers():
    assert score_prediction(LOSS, "-12.5", "million").em == 1.0
    assert score_prediction(LOSS, "(12.5)", "million").em == 1.0
    assert score_prediction(LOSS, "12.5", "million").em == 0.0
    # official quirk: "(1,234)" is read as +1234 (the comma blocks the negative rule)
    assert score_prediction(PAREN, "1234", "thousand").em == 1.0
    assert score_prediction(PAREN, "-1234", "thousand").em == 0.0


def test_arithmetic_and_count_f1_equals_em():
    assert score_prediction(MARGIN, "about 0.2342", "") == (0.0, 0.0, False)
    assert score_prediction(COUNT, "3", "") == (1.0, 1.0, True)
    assert score_prediction(COUNT, "three", "") == (0.0, 0.0, True)


def test_span_partial_f1():
    assert score_prediction(REASON, "higher freight costs", "") == (0.0, 0.67, True)
    assert score_prediction(REASON, "The higher freight costs and lower volumes.", "") == (1.0, 1.0, True)


def test_f1_is_rounded_like_numpy():
    assert _numpy_round2(0.025) == 0.02 and round(0.025, 2) == 0.03
    assert _numpy_round2(0.075) == 0.08 and round(0.075, 2) == 0.07
    gold = _q("long", [" ".join(f"item{i}" for i in range(79))], "span", "text")
    assert score_prediction(gold, "item5", "") == (0.0, 0.02, True)  # F1 = 2/80


@pytest.mark.parametrize(
    ("text", "number", "value"),
    [
        ("$1,234", True, 1234),
        ("3 million", True, 3_000_000),
        ("3 segments", False, 3),
        ("nan", False, None),
        ("(12)", True, -12),
        ("(1,234)", True, 1234),
        ("12%", True, 0.12),
        ("$3.2 billion", True, 3_200_000_000),
        ("1,234 million", True, 1_234_000_000),
        (".5", True, None),
        ("revenue", False, None),
    ],
)
def test_number_reading(text, number, value):
    assert is_number(text) is number
    assert to_number(text) == value


def test_number_followed_by_a_non_scale_word_is_text():
    assert score_prediction(COUNT, "3 segments", "") == (0.0, 0.0, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The $1,234 Million", "1234 million"),
        ("(12)", "-12"),
        ("12%", "0.12"),
        ("3 million", "3 million"),
        ("$3.2", "3.2"),
        ("2.3500", "2.35"),
        ("Net sales, net.", "net sales net"),
        (".5", "None"),
        ("an apple", "apple"),
    ],
)
def test_normalize_answer(text, expected):
    assert normalize_answer(text) == expected


def test_scorer_totals_and_breakdown():
    scorer = TaTQAScorer()
    scorer.add(SPAN_K, ["$1,250"], "thousand")
    scorer.add(REASON, "higher freight costs", "")
    scorer.add(LOSS, "-12.5", "billion")
    scorer.add(COUNT, None, None)
    summary = scorer.summary()
    assert summary["count"] == 4
    assert summary["em"] == pytest.approx(0.25)
    assert summary["f1"] == pytest.approx((1 + 0.67) / 4)
    assert summary["scale"] == pytest.approx(0.5)
    breakdown = summary["breakdown"]
    assert list(breakdown) == ["arithmetic", "count", "span"]
    assert all(list(row) == ["table", "text"] for row in breakdown.values())
    assert breakdown["span"]["text"] == {"count": 1, "em": 0.0, "f1": 0.67}
    assert breakdown["span"]["table"] == {"count": 1, "em": 1.0, "f1": 1.0}
    assert breakdown["arithmetic"]["table"] == {"count": 0, "em": 0.0, "f1": 0.0}


def test_writer_round_trip_and_score_file(tmp_path):
    gold_path = tmp_path / "gold.json"
    gold_path.write_text(json.dumps(DATASET), encoding="utf-8")
    preds = {q["uid"]: (q["answer"], q["scale"]) for q in ALL if q is not ZERO}
    preds["reason"] = (parse_model_output("Answer: higher freight costs.")[0], "")
    pred_path = write_official_predictions(preds, tmp_path / "out" / "pred.json")
    assert sorted(p.name for p in pred_path.parent.iterdir()) == ["pred.json"]  # no temporary file left
    loaded = json.loads(pred_path.read_text(encoding="utf-8"))
    assert loaded["span-k"] == ["$1,250", "thousand"] or loaded["span-k"] == [["$1,250"], "thousand"]
    assert loaded["margin"] == [23.42, "percent"]
    summary = score_file(gold_path, pred_path)
    assert summary["count"] == 10
    assert summary["em"] == pytest.approx(8 / 10)  # "zero" is missing, "reason" is partial
    assert summary["f1"] == pytest.approx((8 + 0.67) / 10)
    assert summary["scale"] == pytest.approx(9 / 10)
    assert summary["breakdown"]["span"]["text"]["f1"] == 0.67


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Answer: 1,234.5", ("1234.5", "")),
        ("(123)", ("-123", "")),
        ("($1,234)", ("-1234", "")),
        ("12.5%", ("12.5", "percent")),
        ("12 percent", ("12", "percent")),
        ("$3.2 billion", ("3.2", "billion")),
        ("The answer is -3.5 million.", ("-3.5", "million")),
        ("Answer: 42.", ("42", "")),
        (".5", ("0.5", "")),
        ("1,234; 5,678 (in thousands)", (["1234", "5678"], "thousand")),
        ("Retail\nWholesale", (["Retail", "Wholesale"], "")),
        ("- Retail\n- Online", (["Retail", "Online"], "")),
        ("Retail | Online | Wholesale", (["Retail", "Online", "Wholesale"], "")),
        ('"Retail", "Online"', (["Retail", "Online"], "")),
        ('["Retail", "Online"]', (["Retail", "Online"], "")),
        ("[1, 2.5]", (["1", "2.5"], "")),
        ("Answer: 0.5\nScale: percent", ("0.5", "percent")),
        ("12.5%\nScale: none", ("12.5%", "")),
        ("5 million; 3%", (["5", "3%"], "million")),
        ("65 | (114) | (71) million", (["65", "-114", "-71"], "million")),
        ("($12.5 million)", ("-12.5", "million")),
        ("**$1,234**", ("1234", "")),
        ("Revenue rose 3.3%.", ("Revenue rose 3.3%.", "")),
        ("US$261,518", ("US$261,518", "")),
        ("2019 and 2018", ("2019 and 2018", "")),
        ("Answer:", ("", "")),
        ("", ("", "")),
    ],
)
def test_parse_model_output(text, expected):
    assert parse_model_output(text) == expected


def test_parsed_output_scores_against_gold():
    assert score_prediction(MARGIN, *parse_model_output("Answer: 23.42%")) == (1.0, 1.0, True)
    assert score_prediction(LOSS, *parse_model_output("($12.5 million)")) == (1.0, 1.0, True)
    assert score_prediction(SPAN_K, *parse_model_output("$1,250 (in thousands)")) == (1.0, 1.0, True)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(5,062) | (6,533) thousand", (["(5,062)", "(6,533)"], "thousand")),
        ("$14,740 | $1,910 thousand", (["$14,740", "$1,910"], "thousand")),
        ("$3.2 billion.", ("$3.2", "billion")),
        ("12.5%", ("12.5", "percent")),
        ("5 million; 3%", (["5", "3%"], "million")),
    ],
)
def test_parse_model_output_keep_number_text(text, expected):
    assert parse_model_output(text, keep_number_text=True) == expected


def test_keep_number_text_follows_official_reading_of_gold_text():
    gold = _q("cells", ["$14,740", "$1,910"], "multi-span", "table", "thousand")
    # canonical numbers sort differently from the raw gold strings, so only F1 survives
    assert score_prediction(gold, *parse_model_output("$14,740 | $1,910 thousand")) == (0.0, 1.0, True)
    kept = parse_model_output("$14,740 | $1,910 thousand", keep_number_text=True)
    assert score_prediction(gold, *kept) == (1.0, 1.0, True)
    assert score_prediction(PAREN, *parse_model_output("(1,234) thousand", keep_number_text=True)).em == 1.0
