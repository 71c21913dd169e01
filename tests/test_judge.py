"""LLM-as-judge: prompt, score parsing, the local judge, and a real `transformers serve` on loopback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import free_port, running_server

from hpml_ft.errors import UserError
from hpml_ft.judge import (
    DEFAULT_RUBRIC,
    JudgeSpec,
    build_judge_prompt,
    chat_completion,
    check_endpoint,
    judge_rows,
    parse_score,
    summarize,
)

FIXTURE = Path(__file__).parent / "fixtures" / "eval_tatqa.json"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Feedback: correct and concise. [RESULT] 4", 4),
        ("Feedback: fine.\n[RESULT]: 3", 3),
        ("[RESULT] **5**", 5),
        ("[result](2)", 2),
        ("[RESULT] 2 ... on second thought [RESULT] 5", 5),  # the last verdict counts
        ("Score: 4/5", 4),
        ("The final score is 3.", 3),
        ("Rating: 2.0", 2),
        ("I would give this 4 out of 5.", 4),
        ("[RESULT] 7", None),  # out of range
        ("[RESULT] 4.5", None),  # not a whole number
        ("[RESULT] 10", None),
        ("Score 1: wrong\nScore 5: right", None),  # an echoed rubric is not a verdict
        ("The response is good.", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_prompt_has_every_part_and_an_optional_reference():
    with_ref = build_judge_prompt("What is 2+2?", "4", "4")
    assert "What is 2+2?" in with_ref and "# REFERENCE ANSWER" in with_ref and DEFAULT_RUBRIC in with_ref
    assert "[RESULT] N" in with_ref and with_ref.rstrip().endswith("Feedback:")
    without = build_judge_prompt("What is 2+2?", "", None, rubric="Is it right?\nScore 1: no\nScore 5: yes")
    assert "# REFERENCE ANSWER" not in without and "(empty response)" in without and "Is it right?" in without


def test_summary_counts_unparsed_never_drops_them():
    s = summarize([5, 4, None, 4, None], errors=1)
    assert s == {
        "n": 5,
        "parsed": 3,
        "unparsed": 2,
        "errors": 1,
        "mean": 4.333,
        "distribution": {"1": 0, "2": 0, "3": 0, "4": 2, "5": 1},
    }
    assert summarize([None])["mean"] is None


def _rows(n: int) -> list[dict]:
    return [{"prompt": f"What is {i} + {i}?", "pred": str(2 * i), "gold": str(2 * i)} for i in range(n)]


def test_local_judge_on_tiny_model(tiny_model_dir):
    rows = _rows(3)
    summary = judge_rows(JudgeSpec(path=str(tiny_model_dir), max_new_tokens=6, batch_size=2), rows)
    assert summary["n"] == 3 and summary["errors"] == 0
    assert all(isinstance(r["judge_output"], str) and r["judge_error"] is None for r in rows)
    # random weights write garbage: it must be counted as unparsed, not dropped
    assert summary["unparsed"] == sum(r["judge_score"] is None for r in rows)


def test_unreachable_endpoint_fails_fast_and_request_errors_are_counted():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(UserError, match="not reachable"):
        check_endpoint(url, None, timeout=5)
    with pytest.raises(UserError, match="http"):
        check_endpoint("127.0.0.1:8000/v1", None, timeout=5)
    rows = _rows(2)
    summary = judge_rows(JudgeSpec(url=url, model="m", timeout=5), rows)
    assert summary["errors"] == 2 and summary["unparsed"] == 2 and all(r["judge_error"] for r in rows)


@pytest.fixture(scope="module")
def served(tiny_model_dir, tmp_path_factory):
    """A real `transformers serve` of the tiny model on 127.0.0.1; always stopped afterwards."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs fastapi/uvicorn: pip install 'transformers[serving]'")
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable,
        "-c",
        "from transformers.cli.transformers import main; main()",
        "serve",
        str(tiny_model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--device",
        "cpu",
        "--log-level",
        "info",
    ]
    with running_server(cmd, f"http://127.0.0.1:{port}", log, timeout_s=120):
        yield f"http://127.0.0.1:{port}/v1", log


def _posts(log: Path) -> int:
    lines = log.read_text().splitlines()
    return sum("POST /v1/chat/completions" in line and " 200" in line for line in lines)


def test_endpoint_judge_against_real_server(served):
    url, log = served
    model = check_endpoint(url, None, timeout=10)  # the first listed model: the tiny one
    spec = JudgeSpec(url=url, model=model, max_new_tokens=8, timeout=60)
    before, rows = _posts(log), _rows(3)
    summary = judge_rows(spec, rows)
    assert _posts(log) - before == 3  # every request reached the server and succeeded
    assert summary["n"] == 3 and summary["errors"] == 0
    assert all(isinstance(r["judge_output"], str) and r["judge_output"] for r in rows)
    assert summary["unparsed"] == sum(r["judge_score"] is None for r in rows)
    assert summary["parsed"] + summary["unparsed"] == 3
    # greedy decoding: the same prompt gets the same reply, so the parsed text is the server's own reply
    again = chat_completion(spec, build_judge_prompt(rows[0]["prompt"], rows[0]["pred"], rows[0]["gold"]))
    assert again == rows[0]["judge_output"]


def test_eval_cli_with_endpoint_judge(served, tmp_path, tiny_model_dir, monkeypatch):
    from hpml_ft.eval import main

    monkeypatch.chdir(tmp_path)
    url, log = served
    out = tmp_path / "eval"
    assert (
        main(
            [
                "--models",
                str(tiny_model_dir),
                "--data",
                str(FIXTURE),
                "--limit",
                "2",
                "--max-new-tokens",
                "4",
                "--judge-url",
                url,
                "--judge-max-new-tokens",
                "8",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "results.json").read_text())
    judge = res["models"][0]["metrics"]["judge"]
    assert judge["n"] == 2 and judge["parsed"] + judge["unparsed"] == 2 and res["judge"].startswith(url)
    assert "judge mean (1-5)" in (out / "results.md").read_text()
    rows = [json.loads(line) for line in (out / res["models"][0]["predictions"]).read_text().splitlines()]
    assert all("judge_score" in r and r["judge_output"] for r in rows)


def test_judge_cli_rejudges_a_predictions_file(tmp_path, tiny_model_dir):
    from hpml_ft.judge import main

    preds = tmp_path / "m.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in _rows(2)))
    args = ["--predictions", str(preds), "--judge", str(tiny_model_dir), "--judge-max-new-tokens", "4"]
    assert main(args) == 0
    judged = [json.loads(line) for line in (tmp_path / "m.judged.jsonl").read_text().splitlines()]
    assert len(judged) == 2 and all("judge_score" in r for r in judged)
    assert json.loads((tmp_path / "m.judged.summary.json").read_text())["n"] == 2
    with pytest.raises(UserError, match="not both"):
        main(["--predictions", str(preds), "--judge", "x", "--judge-url", "http://127.0.0.1:1/v1"])
