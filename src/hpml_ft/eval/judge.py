"""LLM-as-judge: Prometheus-style 1-5 rubric grading by a local HF model or an OpenAI-compatible endpoint.

The prompt gives the task, the instruction, the response, an optional reference answer and the rubric, and
asks for feedback ending in `[RESULT] N`. Scores are parsed robustly; unparsed replies are counted.

`python -m hpml_ft.eval.judge --predictions FILE.jsonl (--judge PATH | --judge-url URL)` re-judges a predictions
file written by `python -m hpml_ft.eval`; the eval CLI takes the same --judge* options to judge as it goes.

An endpoint is called through the `openai` client (`hpml_ft.eval.judge_http`: concurrency, time-outs, retries).
Its API key comes from --judge-api-key or HPML_FT_JUDGE_API_KEY only (never OPENAI_API_KEY, which is meant for
another server, nor any other OPENAI_* variable), is sent to the --judge-url host only (redirects are not
followed) and never over plain http to a host other than this machine unless --allow-insecure-key is given.
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.parse
from pathlib import Path
from typing import Any

from hpml_ft.config import redact_text
from hpml_ft.config import runtime as rt
from hpml_ft.data import read_text_file
from hpml_ft.errors import ArgumentParser, fail, positive_float, run_cli
from hpml_ft.eval.answers import generate_all
from hpml_ft.eval.judge_http import (
    NotModelList,
    endpoint_outputs,
    is_loopback,
    list_models,
    require_openai,
    why,
)
from hpml_ft.eval.judge_prompt import (
    DEFAULT_RUBRIC,
    JudgeSpec,
    build_judge_prompt,
    parse_score,
    summarize,
)
from hpml_ft.outputs import write_json_atomic, write_text_atomic
from hpml_ft.runs import ModelSpec, load, resolve

KEY_ENV = "HPML_FT_JUDGE_API_KEY"
PROBE_TIMEOUT = rt.JUDGE_PROBE_TIMEOUT_S  # the GET /models pre-check: a server that never answers fails fast


def check_url(url: str) -> urllib.parse.SplitResult:
    """An http(s) URL with a host, parsed; anything else (a malformed IPv6 host, a port that is not a number)
    is one error line, with any password in it shown as ***."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # parsed lazily: raises here on a port that is not a number
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # "Invalid IPv6 URL", "Port out of range 0-65535", ...
        ok = False
    if not ok:
        fail(f"--judge-url must be an http(s) URL like http://127.0.0.1:8000/v1, not '{redact_text(url)}'")
    return parts


def check_key_transport(url: str, key: str | None, allow_insecure: bool) -> None:
    """A key goes over https, or over http to this machine; plain http elsewhere needs --allow-insecure-key."""
    parts = check_url(url)
    if key and parts.scheme == "http" and not is_loopback(url) and not allow_insecure:
        fail(
            f"refusing to send the judge API key over plain http to {parts.hostname} (anyone on the way can "
            "read it); use an https:// --judge-url, or pass --allow-insecure-key if this network is trusted"
        )


def check_endpoint(url: str, model: str | None, timeout: float, key: str | None = None) -> str:
    """Probe GET {url}/models before any generation; return the model name to use (default: first listed).
    The probe waits at most PROBE_TIMEOUT seconds, not the per-request --judge-timeout, and is not retried."""
    check_url(url)
    shown = redact_text(url)  # a password in the URL (user:pass@host) stays out of error lines
    openai = require_openai()
    probe = min(timeout, PROBE_TIMEOUT)
    try:
        listed = list_models(url, key, probe)
    except NotModelList as err:
        fail(
            f"judge endpoint {shown} answered GET /models with {err}; pass the base URL of an OpenAI-compatible "
            "server (it usually ends in /v1)"
        )
    except openai.APITimeoutError:
        fail(
            f"judge endpoint {shown} did not answer GET /models within {probe:g} s; check that it is an "
            "OpenAI-compatible server that has finished loading, or fix --judge-url"
        )
    except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
        fail(
            f"judge endpoint {shown} refused the request ({why(err)}); pass the key it expects with "
            f"--judge-api-key or ${KEY_ENV}"
        )
    except (openai.OpenAIError, ValueError, AttributeError, TypeError) as err:
        fail(f"judge endpoint {shown} is not reachable ({why(err)}); start the server or fix --judge-url")
    if model:
        return model
    if not listed:
        fail(f"judge endpoint {shown} lists no models; pass --judge-model NAME")
    return listed[0]


def _local_outputs(spec: JudgeSpec, prompts: list[str]) -> list[tuple[str | None, str | None]]:
    model, tok = load(ModelSpec("judge", spec.path, spec.adapter))
    chats = [[{"role": "user", "content": p}] for p in prompts]
    texts, _ = generate_all(model, tok, chats, spec.max_new_tokens, spec.batch_size, desc="judge")
    del model
    return [(t, None) for t in texts]


def judge_rows(spec: JudgeSpec, rows: list[dict]) -> dict[str, Any]:
    """Judge rows of {prompt, pred, gold?} in place (adds judge_score/_output/_error); returns the summary."""
    prompts = [build_judge_prompt(r["prompt"], r["pred"], r.get("gold"), spec.rubric) for r in rows]
    outputs = endpoint_outputs(spec, prompts) if spec.url else _local_outputs(spec, prompts)
    for row, (text, error) in zip(rows, outputs, strict=True):
        row.update(judge_score=parse_score(text), judge_output=text, judge_error=error)
    return summarize_rows(rows)


def summarize_rows(rows: list[dict]) -> dict[str, Any]:
    """`summarize` over judged rows (a request error counts as unparsed and as an error)."""
    errors = sum(r.get("judge_error") is not None for r in rows)
    return summarize([r["judge_score"] for r in rows], errors=errors)


# ---------------------------------------------------------------- CLI


def add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LLM-as-judge (1-5 rubric, Prometheus-style)")
    g.add_argument("--judge", metavar="PATH", help="local judge: model dir, run dir, 'embedded' or hub id")
    g.add_argument("--judge-url", metavar="URL", help="OpenAI-compatible endpoint: http://127.0.0.1:8000/v1")
    g.add_argument("--judge-model", metavar="NAME", help="model name for --judge-url (default: first listed)")
    g.add_argument(
        "--judge-timeout",
        type=positive_float,
        default=rt.JUDGE_TIMEOUT_S,
        help=f"seconds per request (default {rt.JUDGE_TIMEOUT_S:g})",
    )
    g.add_argument(
        "--judge-concurrency",
        type=int,
        default=rt.JUDGE_CONCURRENCY,
        help=f"--judge-url requests in flight at once (default {rt.JUDGE_CONCURRENCY})",
    )
    g.add_argument(
        "--judge-retries",
        type=int,
        default=rt.JUDGE_RETRIES,
        help=f"extra tries of a failed --judge-url request: connection error, time-out, 408/409/429/5xx "
        f"(default {rt.JUDGE_RETRIES})",
    )
    g.add_argument(
        "--judge-max-new-tokens",
        type=int,
        default=rt.JUDGE_MAX_NEW_TOKENS,
        help=f"judge reply length (default {rt.JUDGE_MAX_NEW_TOKENS})",
    )
    g.add_argument("--judge-rubric", metavar="FILE", help="your own rubric: criterion + 'Score 1..5' lines")
    g.add_argument(
        "--judge-api-key",
        metavar="KEY",
        help=f"API key for --judge-url, sent to that host only (default: ${KEY_ENV}; OPENAI_API_KEY is not used)",
    )
    g.add_argument(
        "--allow-insecure-key",
        action="store_true",
        help="allow sending the API key over plain http to a host other than this machine",
    )


def judge_spec_from_args(args: argparse.Namespace, batch_size: int = rt.JUDGE_BATCH_SIZE) -> JudgeSpec | None:
    """Validate the --judge* options (probing the endpoint) before any model is loaded; None when no judge."""
    if args.judge and args.judge_url:
        fail("pass either --judge PATH (local model) or --judge-url URL (endpoint), not both")
    if not (args.judge or args.judge_url):
        if args.judge_model or args.judge_rubric or args.judge_api_key:
            fail("--judge-model/--judge-rubric/--judge-api-key need --judge PATH or --judge-url URL")
        return None
    concurrency = getattr(args, "judge_concurrency", rt.JUDGE_CONCURRENCY)
    retries = getattr(args, "judge_retries", rt.JUDGE_RETRIES)
    if args.judge_timeout <= 0 or args.judge_max_new_tokens <= 0 or concurrency <= 0 or retries < 0:
        fail(
            "--judge-timeout, --judge-max-new-tokens and --judge-concurrency must be positive, "
            "--judge-retries 0 or more"
        )
    rubric = DEFAULT_RUBRIC
    if args.judge_rubric:
        if not Path(args.judge_rubric).is_file():
            fail(f"rubric file not found: {args.judge_rubric}")
        rubric = read_text_file(Path(args.judge_rubric), "a rubric; write the rubric as a UTF-8 text file")
    common = {
        "timeout": args.judge_timeout,
        "max_new_tokens": args.judge_max_new_tokens,
        "rubric": rubric,
        "batch_size": batch_size,
        "concurrency": concurrency,
        "retries": retries,
    }
    if args.judge_url:
        key = args.judge_api_key or os.environ.get(KEY_ENV) or None
        check_key_transport(args.judge_url, key, args.allow_insecure_key)
        model = check_endpoint(args.judge_url, args.judge_model, args.judge_timeout, key)
        return JudgeSpec(url=args.judge_url, model=model, api_key=key, **common)
    if args.judge_api_key:
        fail("--judge-api-key is for --judge-url endpoints; a local --judge model needs no key")
    local = resolve(args.judge)
    return JudgeSpec(path=local.path, adapter=local.adapter, **common)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.eval.judge", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="predictions JSONL of hpml_ft.eval (prompt, pred)")
    p.add_argument("--out", help="judged JSONL to write (default: <predictions>.judged.jsonl)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=rt.JUDGE_BATCH_SIZE,
        help=f"local judge batch size (default {rt.JUDGE_BATCH_SIZE})",
    )
    add_judge_args(p)
    return p.parse_args(argv)


def read_predictions(path: str) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        fail(f"predictions file not found: {path}")
    try:
        rows = [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as err:
        fail(f"{path}: not JSONL (line {err.lineno}: {err.msg})")
    if not rows or not all(isinstance(r, dict) and {"prompt", "pred"} <= r.keys() for r in rows):
        fail(f"{path}: every line needs 'prompt' and 'pred' (a predictions file written by hpml_ft.eval)")
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = read_predictions(args.predictions)
    if args.batch_size <= 0:
        fail("--batch-size must be positive")
    spec = judge_spec_from_args(args, args.batch_size)
    if spec is None:
        fail("pass --judge PATH (local model) or --judge-url URL (OpenAI-compatible endpoint)")
    summary = judge_rows(spec, rows)
    out = Path(args.out or str(Path(args.predictions).with_suffix("")) + ".judged.jsonl")
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(out.with_suffix(".summary.json"), {"judge": spec.name, **summary})
    print(json.dumps({"judge": spec.name, **summary}))
    print(f"[hpml_ft] judged {len(rows)} rows: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
