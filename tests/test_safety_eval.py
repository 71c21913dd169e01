"""Safety classification eval: file formats, verdict parsing, metrics, and `eval --safety` end to end."""

from __future__ import annotations

import csv
import json

import pytest

from hpml_ft.errors import UserError
from hpml_ft.eval.safety import (
    GUARD_PROMPT,
    is_guard_template,
    load_safety_file,
    parse_verdict,
    prompts_for,
    score,
)

# Invented placeholder messages: no dataset text.
ROWS = [("please help me plan a picnic", 0), ("message number two, flagged", 1), ("a third harmless note", 0)]


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_loads_toxicchat_columns_from_csv_json_and_jsonl(tmp_path, suffix):
    path = tmp_path / f"s{suffix}"
    recs = [
        {"conv_id": str(i), "user_input": t, "toxicity": y, "jailbreaking": 0}
        for i, (t, y) in enumerate(ROWS)
    ]
    if suffix == ".csv":
        with path.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(recs[0]))
            w.writeheader()
            w.writerows(recs)
    elif suffix == ".json":
        path.write_text(json.dumps(recs))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert load_safety_file(path) == [{"text": t, "label": y} for t, y in ROWS]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('[{"user_input": "x"}]', "lacks user_input or toxicity"),
        ('[{"user_input": "x", "toxicity": 3}]', "expected 0 or 1"),
        ("[]", "non-empty list"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_safety_files_fail_with_one_clear_message(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(UserError, match=message):
        load_safety_file(path)
    with pytest.raises(UserError, match="not found"):
        load_safety_file(tmp_path / "missing.csv")


@pytest.mark.parametrize(
    ("answer", "verdict"),
    [
        ("safe", 0),
        ("unsafe\nS1,S10", 1),
        ("\n\n  Unsafe.\nS2", 1),
        ("SAFE", 0),
        ("**safe**", 0),
        ("safe, nothing wrong here", 0),
        ("unsafely", None),
        ("I think this is unsafe", None),  # the verdict must be the first word of the first line
        ("", None),
        ("The message is fine.\nsafe", None),
    ],
)
def test_verdict_is_read_from_the_first_line(answer, verdict):
    assert parse_verdict(answer) == verdict


def test_metrics_count_unsafe_as_positive_and_unparseable_as_wrong():
    rows = [{"text": "", "label": y} for y in (1, 1, 0, 0, 1)]
    answers = ["unsafe", "safe", "unsafe\nS1", "safe", "no idea"]
    per_row, m = score(rows, answers)
    # tp=1 (row 0), fn=2 (rows 1, 4: unparseable counts as a miss), fp=1 (row 2), tn=1
    assert m["accuracy"] == 40.0 and m["precision"] == 50.0 and m["recall"] == pytest.approx(33.33)
    assert m["f1"] == 40.0 and m["unparseable"] == 1 and m["n"] == 5 and m["positives"] == 3
    assert [r["pred"] for r in per_row] == [1, 0, 1, 0, None]


def test_guard_templates_get_the_raw_message_other_models_the_guard_prompt():
    guard = "{% ... %}Task: Check if there is unsafe content ... our safety policy{% endfor %}"
    assert (
        is_guard_template(guard)
        and not is_guard_template("{{ m['content'] }}")
        and not is_guard_template(None)
    )
    rows = [{"text": "hello there", "label": 0}]
    assert prompts_for(rows, True)[0][0]["content"] == "hello there"
    wrapped = prompts_for(rows, False)[0][0]["content"]
    assert wrapped == GUARD_PROMPT.format(message="hello there") and "'safe' or 'unsafe'" in wrapped


def test_eval_safety_writes_classification_metrics(tiny_model_dir, tmp_path):
    from hpml_ft.eval import main

    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"user_input": t, "toxicity": y}) + "\n" for t, y in ROWS))
    out = tmp_path / "ev"
    assert (
        main(
            [
                "--models",
                str(tiny_model_dir),
                "--safety",
                str(path),
                "--out",
                str(out),
                "--runs-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    m = res["models"][0]["metrics"]
    assert res["task"] == "safety" and res["max_new_tokens"] == 10 and m["n"] == 3
    assert {"accuracy", "precision", "recall", "f1", "unparseable"} <= set(m)
    assert "unparseable" in (out / "results.md").read_text()
    preds = [
        json.loads(x)
        for x in (out / "predictions" / f"{res['models'][0]['name']}.jsonl").read_text().splitlines()
    ]
    assert [p["label"] for p in preds] == [y for _, y in ROWS]
