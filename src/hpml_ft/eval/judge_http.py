"""The judge's HTTP side: an OpenAI-compatible endpoint called through the `openai` client.

The client does the requests, time-outs and retries (connection errors, time-outs, HTTP 408/409/429/5xx, with
exponential backoff or the server's Retry-After); a thread pool keeps `--judge-concurrency` requests in flight.
`openai` comes with the serve extra and is imported only when an endpoint is used.

What reaches the server is ours only: the key given to `client()` (or none), never OPENAI_API_KEY,
OPENAI_ORG_ID, OPENAI_PROJECT_ID, OPENAI_CUSTOM_HEADERS or anything else the client would read from the
environment; redirects are not followed, so the key goes to the --judge-url host only; a loopback host is
reached directly even when an http proxy is configured.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from hpml_ft.errors import fail
from hpml_ft.eval.judge_prompt import JudgeSpec

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEADLINE = "hpml_ft.deadline"  # request extension: when this try of the request must have its whole reply
NO_KEY = "EMPTY"  # the client insists on a key; without one, each request omits the Authorization header
# Every header a judge request may carry; anything else (OpenAI-Organization, OpenAI-Project, headers from
# OPENAI_CUSTOM_HEADERS, ...) is dropped before it is sent. x-stainless-*: the client's version/retry telemetry.
SENT_HEADERS = {
    "host",
    "accept",
    "accept-encoding",
    "connection",
    "content-type",
    "content-length",
    "user-agent",
}


def is_loopback(url: str) -> bool:
    return (urllib.parse.urlsplit(url).hostname or "") in LOOPBACK


def require_openai() -> Any:
    try:
        import openai
    except ImportError:
        fail(
            '--judge-url needs the openai client, which comes with the serve extra: pip install -e ".[serve]"'
        )
    return openai


def _only_ours(key: str | None) -> Any:
    """An httpx request hook: the headers of the request on the wire are SENT_HEADERS, x-stainless-* and our
    own Authorization (whatever the client picked up from the environment)."""

    def hook(request: Any) -> None:
        for name in {n.lower() for n in request.headers}:
            if name not in SENT_HEADERS and not name.startswith("x-stainless-"):
                del request.headers[name]
        if key:
            request.headers["Authorization"] = f"Bearer {key}"

    return hook


@functools.cache
def _bounded_stream(httpx_name: str) -> type:
    """A response body that raises ReadTimeout once a read ends past its deadline, for the httpx package the
    client uses (`httpx`, or `httpx2` for openai >= 3)."""
    httpx = importlib.import_module(httpx_name)

    class Bounded(httpx.SyncByteStream):
        def __init__(self, body: Any, request: Any, until: float) -> None:
            self.body, self.request, self.until = body, request, until

        def __iter__(self) -> Any:
            for chunk in self.body:
                if time.monotonic() > self.until:
                    raise httpx.ReadTimeout("no complete reply before the deadline", request=self.request)
                yield chunk

        def close(self) -> None:
            self.body.close()

    return Bounded


def _deadline(total: float) -> tuple[Any, Any]:
    """httpx (request, response) hooks that bound each try of a request to `total` seconds, body included.

    The client's own timeout is per read: a server that keeps sending (a body that never ends, a byte now and
    then) would hold a request forever. The request hook starts the clock of each try (a retry gets its own);
    the response hook, run before the body is read, wraps the body so that a read past the deadline raises
    ReadTimeout, which the client retries and then reports as a time-out. A read that waits for bytes is cut
    by the per-read timeout, so a try ends within about twice `total` at worst."""

    def start(request: Any) -> None:
        request.extensions[DEADLINE] = time.monotonic() + total

    def bound(response: Any) -> None:
        until = response.request.extensions.get(DEADLINE, time.monotonic() + total)
        bounded = _bounded_stream(type(response).__module__.partition(".")[0])
        response.stream = bounded(response.stream, response.request, until)

    return start, bound


def client(url: str, key: str | None, timeout: float, retries: int) -> Any:
    """An `openai.OpenAI` for `url` with every setting explicit, so that nothing comes from OPENAI_* variables.
    `timeout` bounds each try of a request as a whole (`_deadline`), not only each read."""
    openai = require_openai()
    start, bound = _deadline(timeout)
    http = openai.DefaultHttpxClient(
        follow_redirects=False,  # a redirect would carry the key to another host: it is reported instead
        trust_env=not is_loopback(url),  # HTTP(S)_PROXY would send loopback traffic to the proxy
        event_hooks={"request": [_only_ours(key), start], "response": [bound]},
    )
    # Newer clients also read OPENAI_ADMIN_KEY and OPENAI_WEBHOOK_SECRET; openai 1.x (which the serve extra
    # allows) has no such arguments.
    accepted = inspect.signature(openai.OpenAI).parameters
    newer = {name: "" for name in ("admin_api_key", "webhook_secret") if name in accepted}
    return openai.OpenAI(
        api_key=key or NO_KEY,
        organization="",
        project="",
        **newer,
        base_url=url,
        timeout=timeout,
        max_retries=retries,
        default_headers={"OpenAI-Organization": openai.Omit(), "OpenAI-Project": openai.Omit()},
        http_client=http,
    )


def _auth(key: str | None) -> dict[str, Any]:
    """Per-request headers: our key as the Bearer token, or no Authorization header at all."""
    return {"Authorization": f"Bearer {key}" if key else require_openai().Omit()}


def why(err: Exception) -> str:
    """One line on a failed request: `HTTP 503: <first line of the body>`, `timed out`, or the socket error."""
    openai = require_openai()
    if isinstance(err, openai.APIStatusError):
        resp = err.response
        if resp.is_redirect:
            location = resp.headers.get("location", "?")
            return (
                f"HTTP {err.status_code}: redirect to {location} not followed, so the key stays with its host"
            )
        lines = resp.text.strip().splitlines()
        return f"HTTP {err.status_code}: {lines[0][:200] if lines else resp.reason_phrase}"
    if isinstance(err, openai.APITimeoutError):
        return "timed out"
    cause = err.__cause__ or err.__context__
    return str(cause or err) or type(cause or err).__name__


class NotModelList(ValueError):
    """GET /models answered 2xx with something that is not an OpenAI model list (an HTML page, ...)."""


def list_models(url: str, key: str | None, timeout: float) -> list[str]:
    """GET {url}/models once (no retry): the ids the endpoint serves. Raises the client's errors, and
    NotModelList when the answer is not `{"data": [{"id": ...}, ...]}`."""
    with client(url, key, timeout, retries=0) as probe:
        answer = probe.models.with_raw_response.list(extra_headers=_auth(key)).http_response
        try:
            return [str(m["id"]) for m in json.loads(answer.text)["data"]]
        except (ValueError, KeyError, TypeError) as err:
            kind = answer.headers.get("content-type", "no content type").split(";")[0]
            first = (answer.text.strip().splitlines() or [""])[0][:80]
            raise NotModelList(f"{kind}, not an OpenAI model list: {first!r}") from err


def chat_completion(spec: JudgeSpec, prompt: str, judge: Any = None) -> str:
    """One greedy chat completion of `prompt` (with `judge`, a `client()`; else a client of its own)."""
    if judge is None:
        with client(str(spec.url), spec.api_key, spec.timeout, spec.retries) as own:
            return chat_completion(spec, prompt, own)
    out = judge.chat.completions.create(
        model=str(spec.model),
        messages=[{"role": "user", "content": prompt}],
        max_tokens=spec.max_new_tokens,
        temperature=0.0,
        extra_headers=_auth(spec.api_key),
    )
    return out.choices[0].message.content or ""


def ask(judge: Any, spec: JudgeSpec, prompt: str) -> tuple[str | None, str | None]:
    """(reply, None), or (None, why) once the client has spent its retries or the reply is malformed."""
    try:
        return chat_completion(spec, prompt, judge), None
    except (require_openai().OpenAIError, KeyError, IndexError, TypeError, AttributeError, ValueError) as err:
        return None, why(err)  # counted as unparsed and reported, never dropped


def endpoint_outputs(spec: JudgeSpec, prompts: list[str]) -> list[tuple[str | None, str | None]]:
    """`spec.concurrency` requests in flight at once (the server batches them); replies in prompt order."""
    from tqdm.auto import tqdm

    with (
        client(str(spec.url), spec.api_key, spec.timeout, spec.retries) as judge,
        ThreadPoolExecutor(max_workers=spec.concurrency, thread_name_prefix="judge") as pool,
    ):
        replies = pool.map(lambda p: ask(judge, spec, p), prompts)
        return list(tqdm(replies, total=len(prompts), desc="judge", unit="sample", dynamic_ncols=True))
