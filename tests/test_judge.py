"""LLM-as-judge: prompt, score parsing, the local judge, a real `transformers serve` on loopback, and the
`openai` client against a fake endpoint (concurrency, retries, time-outs, headers)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from conftest import build_tiny_model, build_tiny_tokenizer, free_port, running_server

from hpml_ft.errors import UserError, run_cli
from hpml_ft.eval.judge import (
    DEFAULT_RUBRIC,
    JudgeSpec,
    build_judge_prompt,
    check_endpoint,
    judge_rows,
    parse_score,
    summarize,
)
from hpml_ft.eval.judge_http import chat_completion

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
    summary = judge_rows(JudgeSpec(url=url, model="m", timeout=5, retries=0), rows)
    assert summary["errors"] == 2 and summary["unparsed"] == 2 and all(r["judge_error"] for r in rows)


@pytest.fixture(scope="module")
def judge_model_dir(tmp_path_factory) -> Path:
    """The tiny model with room for a judge prompt (~1,100 tokens of this tokenizer): since transformers 5.25,
    `transformers serve` answers 400 to a prompt longer than the model's positions instead of generating."""
    path = tmp_path_factory.mktemp("tiny_judge")
    tok = build_tiny_tokenizer()
    build_tiny_model(tok, max_positions=2048).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def served(judge_model_dir, tmp_path_factory):
    """A real `transformers serve` of the tiny judge model on 127.0.0.1; always stopped afterwards."""
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs fastapi/uvicorn: pip install 'transformers[serving]'")
    port, log = free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [
        sys.executable,
        "-c",
        "from transformers.cli.transformers import main; main()",
        "serve",
        str(judge_model_dir),
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
    from hpml_ft.eval.judge import main

    preds = tmp_path / "m.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in _rows(2)))
    args = ["--predictions", str(preds), "--judge", str(tiny_model_dir), "--judge-max-new-tokens", "4"]
    assert main(args) == 0
    judged = [json.loads(line) for line in (tmp_path / "m.judged.jsonl").read_text().splitlines()]
    assert len(judged) == 2 and all("judge_score" in r for r in judged)
    assert json.loads((tmp_path / "m.judged.summary.json").read_text())["n"] == 2
    with pytest.raises(UserError, match="not both"):
        main(["--predictions", str(preds), "--judge", "x", "--judge-url", "http://127.0.0.1:1/v1"])


# ---------------------------------------------------------------- concurrency and retries (a fake endpoint)


class _FakeEndpoint:
    """A loopback OpenAI-ish /models and /chat/completions: records every request's headers and the requests
    in flight; the first `fail_first` completions answer 503 (with a 1 ms Retry-After-Ms, so the client's
    retries do not wait its default backoff). With `pair=True` every completion waits (up to 20 s) until a
    second one is in flight with it, so requests sent one at a time time out into 503s instead of passing.
    With `key`, a request without `Bearer <key>` gets 401; `delay_s` holds each completion that long."""

    def __init__(
        self, fail_first: int = 0, pair: bool = False, key: str | None = None, delay_s: float = 0.0
    ) -> None:
        import http.server
        import threading

        self.lock, self.in_flight, self.max_in_flight, self.requests = threading.Lock(), 0, 0, 0
        self.fail_first, self.barrier = fail_first, threading.Barrier(2, timeout=20) if pair else None
        self.key, self.delay_s, self.headers = key, delay_s, []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def reply(self, status: int, payload: dict) -> None:
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if status == 503:
                    self.send_header("Retry-After-Ms", "1")
                self.end_headers()
                self.wfile.write(body)

            def authorized(self) -> bool:
                fake.headers.append(dict(self.headers.items()))
                if fake.key is None or self.headers.get("Authorization") == f"Bearer {fake.key}":
                    return True
                self.reply(401, {"error": {"message": "invalid API key"}})
                return False

            def do_GET(self):  # noqa: N802
                if self.authorized():
                    self.reply(200, {"object": "list", "data": [{"id": "judge-model", "object": "model"}]})

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers["Content-Length"]))
                if self.authorized():
                    status = fake.enter()
                    self.reply(status, {"choices": [{"message": {"content": "Good. [RESULT] 4"}}]})

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # a handler still sleeping when its client timed out writes to a closed socket after the test; the
        # server's default handle_error would print that traceback into whichever test runs next
        self.server.handle_error = lambda request, client_address: None
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}/v1"

    def enter(self) -> int:
        import threading

        with self.lock:
            self.requests += 1
            failing = self.requests <= self.fail_first
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.barrier is not None:
                self.barrier.wait()
            time.sleep(self.delay_s)
            return 503 if failing else 200
        except threading.BrokenBarrierError:
            return 503
        finally:
            with self.lock:
                self.in_flight -= 1

    def __enter__(self) -> _FakeEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_endpoint_requests_are_sent_concurrently():
    """concurrency=2: two requests are in flight together (each waits for a partner, so one at a time fails)."""
    with _FakeEndpoint(pair=True) as fake:
        rows = _rows(4)
        summary = judge_rows(JudgeSpec(url=fake.url, model="m", concurrency=2, retries=0, timeout=60), rows)
    assert fake.max_in_flight == 2 and fake.requests == 4
    assert summary["errors"] == 0 and [r["judge_score"] for r in rows] == [4, 4, 4, 4]


@pytest.mark.parametrize("retries, fail_first, ok", [(2, 2, True), (1, 2, False), (0, 1, False)])
def test_failed_requests_are_retried_the_configured_number_of_times(retries, fail_first, ok):
    with _FakeEndpoint(fail_first=fail_first) as fake:
        rows = _rows(1)
        summary = judge_rows(JudgeSpec(url=fake.url, model="m", concurrency=1, retries=retries), rows)
    assert fake.requests == min(retries + 1, fail_first + 1)  # stops at the first success
    assert summary["errors"] == (0 if ok else 1)
    assert (rows[0]["judge_score"] == 4) if ok else ("HTTP 503" in rows[0]["judge_error"])


def test_judge_concurrency_and_retries_flags_are_checked(tmp_path):
    from hpml_ft.eval.judge import main

    preds = tmp_path / "m.jsonl"
    preds.write_text(json.dumps({"prompt": "q", "pred": "a"}) + "\n")
    for flag, value in (("--judge-concurrency", "0"), ("--judge-retries", "-1")):
        with pytest.raises(
            UserError, match="--judge-concurrency must be positive, --judge-retries 0 or more"
        ):
            main(["--predictions", str(preds), "--judge-url", "http://127.0.0.1:1/v1", flag, value])


# ---------------------------------------------------------------- the openai client: environment, key, time-outs


def _judge_cli(tmp_path, url: str, *extra: str) -> int:
    from hpml_ft.eval.judge import main

    preds = tmp_path / "p.jsonl"
    preds.write_text("".join(json.dumps(r) + "\n" for r in _rows(2)))
    return main(["--predictions", str(preds), "--judge-url", url, "--judge-retries", "0", *extra])


def test_nothing_from_the_openai_environment_reaches_the_endpoint(tmp_path, monkeypatch):
    """The client reads OPENAI_* variables (key, organization, project, base URL, extra headers): none of them
    may reach the judge server, with or without a judge key; http proxies are bypassed for loopback."""
    for name in (
        "OPENAI_API_KEY",
        "OPENAI_ADMIN_KEY",
        "OPENAI_ORG_ID",
        "OPENAI_PROJECT_ID",
        "OPENAI_WEBHOOK_SECRET",
    ):
        monkeypatch.setenv(name, f"sentinel-{name}")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:1/sentinel-base")
    monkeypatch.setenv(
        "OPENAI_CUSTOM_HEADERS", "X-Leak: sentinel-custom\nAuthorization: Bearer sentinel-auth"
    )
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:1")  # a dead proxy: using it would fail every request
    monkeypatch.delenv("HPML_FT_JUDGE_API_KEY", raising=False)
    with _FakeEndpoint() as fake:
        assert _judge_cli(tmp_path, fake.url) == 0  # probe + 2 completions, no key
        without_key = len(fake.headers)
        assert _judge_cli(tmp_path, fake.url, "--judge-api-key", "judge-key") == 0
    assert without_key == 3 and len(fake.headers) == 6
    for i, headers in enumerate(fake.headers):
        lowered = {k.lower(): v for k, v in headers.items()}
        assert not any("sentinel" in v for v in lowered.values()), headers
        assert not {"openai-organization", "openai-project", "x-leak"} & lowered.keys(), headers
        assert lowered.get("authorization") == (None if i < without_key else "Bearer judge-key"), headers
    assert json.loads((tmp_path / "p.judged.summary.json").read_text())["errors"] == 0


def _cli_error(capsys, main, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_a_refused_key_is_one_error_line_before_any_request(tmp_path, capsys):
    with _FakeEndpoint(key="right") as fake:
        err = _cli_error(
            capsys, lambda argv: _judge_cli(tmp_path, *argv), fake.url, "--judge-api-key", "wrong"
        )
        assert "HTTP 401" in err and "--judge-api-key" in err and "wrong" not in err
        assert len(fake.headers) == 1 and fake.requests == 0  # the probe only, not retried; no completion
        assert check_endpoint(fake.url, None, timeout=5, key="right") == "judge-model"
    assert not list(tmp_path.glob("p.judged*"))


def test_judge_timeout_reaches_the_client_and_a_timed_out_request_is_retried():
    with _FakeEndpoint(delay_s=1.0) as fake:
        rows = _rows(1)
        summary = judge_rows(JudgeSpec(url=fake.url, model="m", concurrency=1, retries=1, timeout=0.2), rows)
    assert fake.requests == 2 and summary["errors"] == 1 and rows[0]["judge_error"] == "timed out"


def test_openai_is_imported_only_for_an_endpoint_and_its_absence_is_one_error_line(
    tmp_path, capsys, monkeypatch
):
    import subprocess

    code = "import sys, hpml_ft.eval.judge; assert 'openai' not in sys.modules, 'openai imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True)
    monkeypatch.setitem(sys.modules, "openai", None)  # `import openai` now raises ImportError
    err = _cli_error(capsys, lambda argv: _judge_cli(tmp_path, *argv), "http://127.0.0.1:1/v1")
    assert 'pip install -e ".[serve]"' in err
