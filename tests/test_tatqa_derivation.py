"""TAT-QA derivation targets (tatqa_target), the safe executor (eval.tatqa.executor) and eval scoring through it."""

from __future__ import annotations

import json

import pytest

from hpml_ft.config import load_config
from hpml_ft.errors import UserError
from hpml_ft.tatqa.executor import execute, render_derivation
from hpml_ft.tatqa.render import TATQA_SYSTEM, tatqa_samples
from hpml_ft.tatqa.target import DERIVATION_SYSTEM, render_cells

TABLE = [
    ["", "2019", "2018"],
    ["Inventories", "1,571.7", "1,400.2"],
    ["Revenue", "$44.1", "$56.7"],
    ["Margin", "4.1%", "4.6%"],
]


def _q(uid, question, answer, kind, scale="", derivation="", source="table"):
    return {
        "uid": uid,
        "order": int(uid[1:]),
        "question": question,
        "answer": answer,
        "answer_type": kind,
        "answer_from": source,
        "scale": scale,
        "derivation": derivation,
    }


QUESTIONS = [
    _q("q1", "Percent change of revenue?", -22.22, "arithmetic", "percent", "($44.1-$56.7)/$56.7"),
    _q("q2", "Change in inventories?", 171.5, "arithmetic", "million", "[1,571.7 - 1,400.2]"),
    _q("q3", "Average margin?", 4.35, "arithmetic", "percent", "(4.1% + 4.6%)/2 "),
    _q("q4", "How many years?", "2", "count", derivation="2019##2018"),
    _q("q5", "Which item is stock?", ["Inventories"], "span"),
    _q("q6", "Which rows?", ["Inventories", "Revenue"], "multi-span"),
    _q("q7", "No derivation given?", 3, "arithmetic", "", ""),
    _q("q8", "Derivation disagrees with gold?", 99, "arithmetic", "million", "1,571.7 + 1"),
]
CONTEXT = {
    "table": {"uid": "t1", "table": TABLE},
    "paragraphs": [{"uid": "p1", "order": 1, "text": "Revenue fell."}],
    "questions": QUESTIONS,
}


def _answers(target: str, table: str = "pipe") -> dict[str, str]:
    samples = tatqa_samples([json.loads(json.dumps(CONTEXT))], "fixture.json", target=target, table=table)
    return {s["id"]: s["messages"][-1]["content"] for s in samples}


def test_derivation_targets_for_each_answer_type_and_fallbacks_counted(capsys):
    got = _answers("derivation")
    assert got == {
        "q1": "(44.1 - 56.7) / 56.7 * 100 | percent",  # ratio shown as percent: the x100 is explicit
        "q2": "(1,571.7 - 1,400.2) | million",  # [] become (), numbers as in the table
        "q3": "(4.1% + 4.6%) / 2 | percent",  # a mean of percents is already in percent
        "q4": "count: 2019 | 2018",
        "q5": "Inventories",
        "q6": "Inventories | Revenue",
        "q7": "3",  # no derivation: plain answer
        "q8": "99 million",  # derivation does not reproduce the gold answer: plain answer
    }
    err = capsys.readouterr().err
    assert "derivation targets for 4 of 6 arithmetic/count questions; 2 fell back" in err
    # every derivation target is turned back into its gold answer by the executor
    for q in QUESTIONS[:4]:
        run = execute(got[q["uid"]])
        assert run.executed and not run.failed
    assert execute(got["q1"]).answer == "-22.22" and execute(got["q1"]).scale == "percent"


def test_answer_target_is_unchanged_and_uses_its_own_system_prompt(capsys):
    samples = tatqa_samples([CONTEXT], "fixture.json")
    assert samples[0]["messages"][0]["content"] == TATQA_SYSTEM
    assert (
        samples[0]["messages"][-1]["content"] == "-22.22%" and "|---|" in samples[0]["messages"][1]["content"]
    )
    assert "fell back" not in capsys.readouterr().err  # nothing to report for plain answers
    derived = tatqa_samples([CONTEXT], "fixture.json", target="derivation")
    assert derived[0]["messages"][0]["content"] == DERIVATION_SYSTEM


def test_cells_table_names_each_number_and_extract_target_labels_values():
    cells = render_cells(TABLE)
    assert "Inventories, 2019: 1,571.7" in cells.splitlines() and "Margin, 2018: 4.6%" in cells
    samples = tatqa_samples([CONTEXT], "fixture.json", target="derivation", table="cells")
    assert "Revenue, 2018: $56.7" in samples[0]["messages"][1]["content"]
    extract = _answers("extract")["q2"].splitlines()
    assert extract == [
        "Inventories, 2019: 1,571.7",
        "Inventories, 2018: 1,400.2",
        "(1,571.7 - 1,400.2) | million",
    ]
    assert execute("\n".join(extract)).answer == "171.5"


def test_recipes_and_config_targets():
    with pytest.raises(UserError, match="data.tatqa_target"):
        load_config("recipes/lora_tatqa.yaml", ["data.tatqa_target=formula"])
    assert load_config("recipes/lora_tatqa.yaml", ["data.tatqa_table=cells"]).data.tatqa_table == "cells"
    assert load_config(None, ["train.num_epochs=1"]).data.tatqa_target == "answer"  # default: as before
    for name in ("lora_tatqa", "fft_tatqa_embedded", "lora_llama3_8b_tatqa", "qlora_llama3_8b_tatqa"):
        assert load_config(f"recipes/{name}.yaml").data.tatqa_target == "derivation", name
    assert load_config("recipes/fft_llama3_8b_tatqa.yaml").data.tatqa_target == "derivation"


@pytest.mark.parametrize(
    ("text", "answer", "scale"),
    [
        ("(44.1 - 56.7) / 56.7 * 100 | percent", "-22.22", "percent"),
        ("1,571.7 - 1,400.2 | million", "171.5", "million"),
        ("$90,831 + $97,948 | thousand", "188779", "thousand"),
        ("[(166 + 178) / 2] - [(57 + 44) / 2] | million", "121.5", "million"),
        ("(-42,056) - (-9,982) | million", "-32074", "million"),
        ("2,664 / 909", "2.93", ""),
        ("(4.1% + 4.6%) / 2 | percent", "4.35", "percent"),
        ("10% * 2,000 | million", "200", "million"),  # x% is x/100 unless the answer is in percent
        ("count: a | b | c", "3", ""),
        ("Net sales, 2019: 10\nNet sales, 2018: 8\n(10 - 8) / 8 * 100 | percent", "25", "percent"),
        ("1 - 1", "0", ""),
    ],
)
def test_executor_computes_derivations(text, answer, scale):
    run = execute(text)
    assert (run.answer, run.scale, run.executed, run.failed) == (answer, scale, True, False)


@pytest.mark.parametrize(
    ("text", "failed"),
    [
        ("__import__('os').system('echo hi')", False),
        ("2**99999", True),
        ("9" * 30 + " * " + "9" * 30, True),  # beyond the magnitude bound
        ("(" * 500 + "1 + 1" + ")" * 500, True),  # beyond length / nesting bounds
        ("((((((((((((((1 + 1))))))))))))))", True),  # 14 levels > 12
        ("- - - - - - - - - - - - - - 1 + 1", True),  # unary chains count as nesting
        ("(44.1 - 56.7) / 0 | percent", True),
        ("(10 - 10) / (5 - 5)", True),
        ("1 +", False),  # one number and no scale: not derivation-shaped, parsed as an answer
        ("1 + | million", True),
        ("(1 + 2", True),
        ("1 + abc | million", True),
        ("1 + 2 ^ 3 | million", True),
        ("count:", True),
        ("", False),
        ("The answer is 42.", False),
    ],
)
def test_executor_falls_back_cleanly_on_hostile_or_malformed_input(text, failed):
    run = execute(text)  # never raises, never evaluates Python
    assert not run.executed and run.failed is failed
    assert isinstance(run.answer, str | list) and isinstance(run.scale, str)


# Model outputs that would write MARKER (in the test's working dir) if any part of the executor handed them to
# Python (eval/exec/compile): bare, inside a derivation with a scale (so they reach the expression parser),
# through attribute access, a lambda, a comprehension, an f-string, exec, on the last line after extracted values.
# Each is valid Python that evaluates to a number once the scale is split off: an eval would run it.
WRITE = "__import__('pathlib').Path('MARKER').write_text('x')"
SIDE_EFFECTS = [
    (WRITE, False),
    (f"{WRITE} | million", False),  # no number before an operator: not derivation-shaped
    (f"1 + {WRITE} | million", True),
    (f"(44.1 - 56.7) / 56.7 * 100 + {WRITE} | percent", True),
    (f"2 * (lambda: {WRITE})() | thousand", True),
    (f"1 + [{WRITE} for _ in '1'][0] | million", True),
    ("3 - open('MARKER', 'w').write('x') | million", True),
    ("3 + (__import__('builtins').exec(\"open('MARKER', 'w').write('x')\") or 1) | million", True),
    ('10 - len(f"{' + WRITE + '}") | percent', True),
    (f"Net sales, 2019: 10\nNet sales, 2018: 8\n(10 - 8) / 8 * 100 + {WRITE} | percent", True),
    ("__import__('os').system('touch MARKER')", False),
    ("1 + __import__('os').system('touch MARKER') | million", True),
]


@pytest.mark.parametrize(("text", "failed"), SIDE_EFFECTS)
def test_executor_never_runs_python_in_model_output(text, failed, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = execute(text)
    assert not (tmp_path / "MARKER").exists()  # nothing was evaluated
    assert not run.executed and run.failed is failed, run  # derivation-shaped ones fail to parse, and say so


def test_count_items_are_counted_not_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run = execute(f"count: {WRITE} | {WRITE}")
    assert (run.answer, run.executed) == ("2", True) and not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize(
    ("text", "answer", "scale"),
    [
        ("12.5%", "12.5", "percent"),
        ("3,452 million", "3,452", "million"),
        ("2019 | 2018", ["2019", "2018"], ""),
        ("5,687 | thousand", "5,687", "thousand"),  # a number and its scale in the derivation spelling
        ("$22,446 | million", "$22,446", "million"),
        ("12.5 | percent", "12.5", "percent"),
        ("2019 | million", "2019", "million"),
        ("Inventories | million", ["Inventories", "million"], ""),  # a span stays a span
    ],
)
def test_plain_answers_bypass_the_executor(text, answer, scale):
    run = execute(text)
    assert (run.answer, run.scale, run.executed, run.failed) == (answer, scale, False, False)


def test_render_derivation_is_canonical():
    assert render_derivation("($44.1-$56.7)/$56.7") == "(44.1 - 56.7) / 56.7"
    assert render_derivation("-114 - (-71)") == "-114 - (-71)"
    assert render_derivation("[2 * -3]") == "(2 * -3)"


def test_eval_scores_derivation_predictions_through_the_executor(tmp_path, tiny_model_dir, monkeypatch):
    import hpml_ft.eval.answers as answers
    from hpml_ft.eval.cli import main

    data = tmp_path / "tatqa.json"
    data.write_text(json.dumps([CONTEXT]))
    fixed = {
        "Percent change of revenue?": "(44.1 - 56.7) / 56.7 * 100 | percent",  # right
        "Change in inventories?": "1,571.7 - 1,400.2 | thousand",  # right number, wrong scale
        "Average margin?": "(4.1 + 4.6) / 0 | percent",  # division by zero: fallback
        "How many years?": "count: 2019 | 2018",  # right
    }

    def fake_generate(model, tok, prompts, *args):
        texts = [fixed.get(p[-1]["content"].rsplit("Question: ", 1)[-1], "Inventories") for p in prompts]
        return texts, {"new_tokens": 1, "seconds": 1.0, "tokens_per_s": 1.0}

    monkeypatch.setattr(answers, "load_model", lambda *a: object())
    monkeypatch.setattr(answers, "generate_all", fake_generate)
    out = tmp_path / "eval"
    argv = ["--models", str(tiny_model_dir), "--data", str(data), "--tatqa-target", "derivation"]
    assert main([*argv, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    metrics = res["models"][0]["metrics"]
    assert metrics["executor"] == {"executed": 3, "parse_failures": 1}
    assert metrics["exact_match"] == pytest.approx(100 * 3 / 8)  # q1, q4, q5 (q5 answered "Inventories")
    rows = {json.loads(x)["id"]: json.loads(x) for x in (out / res["models"][0]["predictions"]).open()}
    assert rows["q1"]["pred"] == fixed["Percent change of revenue?"] and rows["q1"]["pred_answer"] == "-22.22"
    assert rows["q1"]["executed"] and rows["q1"]["em"] == 1.0
    assert rows["q2"]["pred_answer"] == "171.5" and rows["q2"]["em"] == 0.0  # scale decides
    assert rows["q3"]["exec_failed"] and not rows["q3"]["executed"]
    official = json.loads((out / res["models"][0]["official_predictions"]).read_text())
    assert official["q1"] == ["-22.22", "percent"] and official["q4"] == ["2", ""]
    assert "executed" in (out / "results.md").read_text()


def test_infer_shows_derivation_and_computed_answer_side_by_side():
    from hpml_ft.infer import answer_rows, record_text, sample_record
    from hpml_ft.runs import ModelSpec

    sample = tatqa_samples([CONTEXT], "fixture.json", target="derivation")[0]
    specs = [ModelSpec("base", "b"), ModelSpec("tuned", "t")]
    speed = {"tokens_per_s": 1.0}
    results = [(["-22.22%"], speed), (["(44.1 - 56.7) / 56.7 * 100 | percent"], speed)]
    rows = answer_rows(specs, results, 0, sample, "tatqa")
    assert "computed" not in rows[0] and rows[1]["computed"] == "-22.22%"
    assert rows[0]["correct"] and rows[1]["correct"]
    text = record_text(sample_record(0, sample, "tatqa", rows), 0)
    assert "(44.1 - 56.7) / 56.7 * 100 | percent   => -22.22%" in text
