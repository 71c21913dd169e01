"""LLM-as-judge: Prometheus-style 1-5 rubric grading by a local HF model or an OpenAI-compatible endpoint.

The prompt gives the task, the instruction, the response, an optional reference answer and the rubric, and
asks for feedback ending in `[RESULT] N`. Scores are parsed robustly; unparsed replies are counted.

`python -m hpml_ft.judge --predictions FILE.jsonl (--judge PATH | --judge-url URL)` re-judges a predictions
file written by `python -m hpml_ft.eval`; the eval CLI takes the same --judge* options to judge as it goes.

An endpoint's API key comes from --judge-api-key or HPML_FT_JUDGE_API_KEY only (never OPENAI_API_KEY, which is
meant for another server), is sent to the --judge-url host only (redirects are not followed) and never over
plain http to a host other than this machine unless --allow-insecure-key is given.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpml_ft.errors import ArgumentParser, fail, positive_float, run_cli

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


# ---------------------------------------------------------------- backends


@dataclass(frozen=True)
class JudgeSpec:
    path: str | None = None  # a resolved local model directory
    url: str | None = None  # OpenAI-compatible base URL ending in /v1
    model: str | None = None  # model name sent to the endpoint
    timeout: float = 120.0
    max_new_tokens: int = 256
    batch_size: int = 4
    rubric: str = DEFAULT_RUBRIC
    api_key: str | None = field(default=None, repr=False)  # sent as a Bearer token to `url` only

    @property
    def name(self) -> str:
        return f"{self.url} ({self.model})" if self.url else str(self.path)


KEY_ENV = "HPML_FT_JUDGE_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROBE_TIMEOUT = (
    10.0  # seconds for the GET /models pre-check: a server that accepts but never answers fails fast
)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the Authorization header to another host: report it as an HTTP error instead."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _open(req: urllib.request.Request, timeout: float) -> Any:
    """urlopen without redirects, and straight to loopback hosts even when an http proxy is configured."""
    host = urllib.parse.urlsplit(req.full_url).hostname or ""
    handlers: list[Any] = [_NoRedirect()]
    handlers += [urllib.request.ProxyHandler({})] if host in LOOPBACK else []
    return urllib.request.build_opener(*handlers).open(req, timeout=timeout)


def check_key_transport(url: str, key: str | None, allow_insecure: bool) -> None:
    """A key goes over https, or over http to this machine; plain http elsewhere needs --allow-insecure-key."""
    parts = urllib.parse.urlsplit(url)
    if key and parts.scheme == "http" and (parts.hostname or "") not in LOOPBACK and not allow_insecure:
        fail(
            f"refusing to send the judge API key over plain http to {parts.hostname} (anyone on the way can "
            "read it); use an https:// --judge-url, or pass --allow-insecure-key if this network is trusted"
        )


def _request(url: str, payload: dict | None, timeout: float, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    data = json.dumps(payload).encode() if payload is not None else None
    with _open(urllib.request.Request(url, data=data, headers=headers), timeout) as resp:
        return json.loads(resp.read().decode("utf-8"))


def _why(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        body = err.read().decode("utf-8", "replace").strip().splitlines()
        return f"HTTP {err.code}: {body[0][:200] if body else err.reason}"
    return str(getattr(err, "reason", None) or err) or type(err).__name__


def check_endpoint(url: str, model: str | None, timeout: float, key: str | None = None) -> str:
    """Probe GET {url}/models before any generation; return the model name to use (default: first listed).
    The probe waits at most PROBE_TIMEOUT seconds, not the per-request --judge-timeout."""
    if not url.startswith(("http://", "https://")) or not urllib.parse.urlsplit(url).hostname:
        fail(f"--judge-url must be an http(s) URL like http://127.0.0.1:8000/v1, not '{url}'")
    probe = min(timeout, PROBE_TIMEOUT)
    try:
        reply = _request(url.rstrip("/") + "/models", None, probe, key)
        listed = [m.get("id") for m in reply.get("data", [])]
    except (urllib.error.URLError, OSError, ValueError, AttributeError, TypeError) as err:
        if isinstance(err, TimeoutError) or isinstance(getattr(err, "reason", None), TimeoutError):
            fail(
                f"judge endpoint {url} did not answer GET /models within {probe:g} s; check that it is an "
                "OpenAI-compatible server that has finished loading, or fix --judge-url"
            )
        fail(f"judge endpoint {url} is not reachable ({_why(err)}); start the server or fix --judge-url")
    if model:
        return model
    if not listed:
        fail(f"judge endpoint {url} lists no models; pass --judge-model NAME")
    return str(listed[0])


def chat_completion(spec: JudgeSpec, prompt: str) -> str:
    payload = {
        "model": spec.model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": spec.max_new_tokens,
        "temperature": 0.0,
    }
    out = _request(spec.url.rstrip("/") + "/chat/completions", payload, spec.timeout, spec.api_key)
    return out["choices"][0]["message"]["content"] or ""


def _endpoint_outputs(spec: JudgeSpec, prompts: list[str]) -> list[tuple[str | None, str | None]]:
    from tqdm.auto import tqdm

    results: list[tuple[str | None, str | None]] = []
    for prompt in tqdm(prompts, desc="judge", unit="sample", dynamic_ncols=True):
        try:
            results.append((chat_completion(spec, prompt), None))
        except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as err:
            results.append((None, _why(err)))  # counted as unparsed and reported, never dropped
    return results


def _local_outputs(spec: JudgeSpec, prompts: list[str]) -> list[tuple[str | None, str | None]]:
    from hpml_ft.evaluate import generate_all, load_model
    from hpml_ft.model import load_tokenizer

    tok = load_tokenizer(spec.path)
    model = load_model(spec.path)
    chats = [[{"role": "user", "content": p}] for p in prompts]
    texts, _ = generate_all(model, tok, chats, spec.max_new_tokens, spec.batch_size, desc="judge")
    del model
    return [(t, None) for t in texts]


def judge_rows(spec: JudgeSpec, rows: list[dict]) -> dict[str, Any]:
    """Judge rows of {prompt, pred, gold?} in place (adds judge_score/_output/_error); returns the summary."""
    prompts = [build_judge_prompt(r["prompt"], r["pred"], r.get("gold"), spec.rubric) for r in rows]
    outputs = _endpoint_outputs(spec, prompts) if spec.url else _local_outputs(spec, prompts)
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
        "--judge-timeout", type=positive_float, default=120.0, help="seconds per request (default 120)"
    )
    g.add_argument("--judge-max-new-tokens", type=int, default=256, help="judge reply length (default 256)")
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


def judge_spec_from_args(args: argparse.Namespace, batch_size: int = 4) -> JudgeSpec | None:
    """Validate the --judge* options (probing the endpoint) before any model is loaded; None when no judge."""
    if args.judge and args.judge_url:
        fail("pass either --judge PATH (local model) or --judge-url URL (endpoint), not both")
    if not (args.judge or args.judge_url):
        if args.judge_model or args.judge_rubric or args.judge_api_key:
            fail("--judge-model/--judge-rubric/--judge-api-key need --judge PATH or --judge-url URL")
        return None
    if args.judge_timeout <= 0 or args.judge_max_new_tokens <= 0:
        fail("--judge-timeout and --judge-max-new-tokens must be positive")
    rubric = DEFAULT_RUBRIC
    if args.judge_rubric:
        if not Path(args.judge_rubric).is_file():
            fail(f"rubric file not found: {args.judge_rubric}")
        rubric = Path(args.judge_rubric).read_text()
    common = {
        "timeout": args.judge_timeout,
        "max_new_tokens": args.judge_max_new_tokens,
        "rubric": rubric,
        "batch_size": batch_size,
    }
    if args.judge_url:
        key = args.judge_api_key or os.environ.get(KEY_ENV) or None
        check_key_transport(args.judge_url, key, args.allow_insecure_key)
        model = check_endpoint(args.judge_url, args.judge_model, args.judge_timeout, key)
        return JudgeSpec(url=args.judge_url, model=model, api_key=key, **common)
    if args.judge_api_key:
        fail("--judge-api-key is for --judge-url endpoints; a local --judge model needs no key")
    from hpml_ft.evaluate import resolve_model

    return JudgeSpec(path=resolve_model(args.judge), **common)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.judge", description=__doc__.splitlines()[0])
    p.add_argument("--predictions", required=True, help="predictions JSONL of hpml_ft.eval (prompt, pred)")
    p.add_argument("--out", help="judged JSONL to write (default: <predictions>.judged.jsonl)")
    p.add_argument("--batch-size", type=int, default=4, help="local judge batch size (default 4)")
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
    from hpml_ft.outputs import write_json_atomic, write_text_atomic

    summary = judge_rows(spec, rows)
    out = Path(args.out or str(Path(args.predictions).with_suffix("")) + ".judged.jsonl")
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(out.with_suffix(".summary.json"), {"judge": spec.name, **summary})
    print(json.dumps({"judge": spec.name, **summary}))
    print(f"[hpml_ft] judged {len(rows)} rows: {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
