"""`python -m hpml_ft.serve [RUN_DIR_OR_MODEL] [--host 127.0.0.1] [--port 8000]`: OpenAI-compatible API.

Runs `transformers serve` (the `transformers[serving]` extra: fastapi, uvicorn, openai) pinned to one local
model: a run's merged model (default: the latest finished run under outputs/), a model dir or 'embedded'.
The server loads the model before it listens, so `GET /health` answering means it is ready.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shlex
import socket
import sys
from pathlib import Path

from hpml_ft.config import DTYPE_CHOICES
from hpml_ft.config import runtime as rt
from hpml_ft.errors import ArgumentParser, fail, run_cli
from hpml_ft.model import needs_model_code, refuse_remote_code
from hpml_ft.outputs import latest_finished_run
from hpml_ft.runs import standalone_dir

SERVING_MODULES = ("fastapi", "uvicorn", "openai")  # what is_serve_available() of transformers checks


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.serve", description=__doc__.splitlines()[0])
    p.add_argument(
        "model",
        nargs="?",
        help="run dir (serves its merged/), model dir or 'embedded' "
        "(default: the latest finished run under outputs/)",
    )
    p.add_argument(
        "--host",
        default=rt.SERVE_HOST,
        help="listen address (default: this machine only); 0.0.0.0 exposes the model, without "
        "authentication, to everyone who can reach this machine",
    )
    p.add_argument("--port", type=int, default=rt.SERVE_PORT)
    p.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda:0', ...")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--dry-run", action="store_true", help="check model and port, print usage, exit")
    a = p.parse_args(argv)
    if not 0 < a.port < 65536:
        fail(f"--port {a.port} is not a TCP port (1-65535)")
    check_device(a.device)
    return a


def check_device(device: str) -> None:
    """--device names a device this machine has ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'), checked here: the
    server would fail on it with a traceback after loading the model."""
    if device == "auto":
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        dev = None
    count = {"cpu": 1, "cuda": torch.cuda.device_count()}
    count["mps"] = int(torch.backends.mps.is_available())
    if dev is None or (dev.index or 0) >= count.get(dev.type, 0):
        have = ", ".join(
            ["auto", "cpu"] + [f"cuda:{i}" for i in range(count["cuda"])] + ["mps"] * count["mps"]
        )
        fail(f"--device {device} is not a device of this machine; use one of: {have}")


def model_dir(target: str | None) -> Path:
    """The complete local model directory to serve, resolved by `hpml_ft.runs` as every CLI resolves a model.
    `transformers serve` loads one standalone model: an unmerged adapter (a run trained with
    train.merge=false, or an adapter dir) is refused with the merge command that makes one."""
    if target is None:
        run = latest_finished_run(rt.RUNS_DIR)
        if run is None:
            fail("no finished run under outputs/; pass a run dir, a model dir or 'embedded'")
        target = str(run)
    p = Path(standalone_dir(target, "transformers serve"))
    if not p.is_dir():
        fail(f"{target} is not a local model directory; pass a run dir, a saved model dir or 'embedded'")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        fail(f"{p} has no tokenizer files; save the tokenizer next to the model (tok.save_pretrained)")
    if needs_model_code(p):  # `transformers serve` runs without --trust-remote-code: say so before it starts
        refuse_remote_code(p)
    return p.resolve()


def check_serving_deps() -> None:
    missing = [m for m in SERVING_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        fail(
            f"serving needs {', '.join(missing)}: pip install 'transformers[serving]' "
            "(or: pip install -e '.[serve]')"
        )


def check_port(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: TIME_WAIT is no conflict
        try:
            s.bind((host, port))
        except OSError as err:
            fail(f"cannot listen on {host}:{port} ({err.strerror}); pick another --port or stop what uses it")


WILDCARD = ("0.0.0.0", "::", "")
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def local_addresses() -> list[str]:
    """This machine's non-loopback IPv4 addresses (the outgoing route's first), best effort and offline."""
    found: list[str] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # UDP connect sends nothing; it only picks the outgoing interface
            found.append(s.getsockname()[0])
        except OSError:
            pass
    with contextlib.suppress(OSError):  # a host name that does not resolve: the route's address is enough
        found += socket.gethostbyname_ex(socket.gethostname())[2]
    return list(dict.fromkeys(a for a in found if not a.startswith("127.") and a != "0.0.0.0"))


def exposure_warning(host: str, port: int) -> tuple[str | None, list[str]]:
    """(warning or None, the host names to show in URLs): a non-loopback bind is reachable from the network."""
    if host in LOOPBACK or host.startswith("127."):
        return None, [host]
    shown = (local_addresses() if host in WILDCARD else [host]) or []
    where = "on every network interface" if host in WILDCARD else f"on {host}"
    warning = (
        f"warning: --host {host or repr(host)} listens {where}: anyone who can reach this machine on port "
        f"{port} can use the model (no authentication, no TLS). Use --host 127.0.0.1 to keep it local."
    )
    return warning, shown + (["127.0.0.1"] if host in WILDCARD else [])


def usage(model: Path, host: str, port: int) -> str:
    """Base URL plus ready-to-paste curl and openai-client examples."""
    _, hosts = exposure_warning(host, port)
    urls = [f"http://{f'[{h}]' if ':' in h else h}:{port}" for h in hosts]
    base = urls[0]
    hello = [{"role": "user", "content": "Hello! Who are you?"}]
    body = {"model": str(model), "messages": hello, "max_tokens": 64}
    return "\n".join(
        [
            f"[hpml_ft] serving {model} with `transformers serve` (OpenAI-compatible API)",
            f"  base URL: {base}/v1   (ready when {base}/health answers; Ctrl-C stops it)",
            *([f"  also at:  {', '.join(u + '/v1' for u in urls[1:])}"] if urls[1:] else []),
            f"  model:    {model}   (the only model this server answers for; the field may be omitted)",
            "",
            "  curl example:",
            f"    curl -s {base}/v1/chat/completions -H 'Content-Type: application/json' \\",
            f"      -d {shlex.quote(json.dumps(body))}",
            "",
            "  openai client example (pip install openai):",
            "    from openai import OpenAI",
            f"    client = OpenAI(base_url={base + '/v1'!r}, api_key='unused')",
            f"    reply = client.chat.completions.create(model={str(model)!r}, max_tokens=64,",
            f"                                           messages={hello!r})",
            "    print(reply.choices[0].message.content)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    model = model_dir(a.model)
    check_serving_deps()
    check_port(a.host, a.port)
    warning = exposure_warning(a.host, a.port)[0]
    if warning:
        print(warning, file=sys.stderr, flush=True)
    print(usage(model, a.host, a.port), flush=True)
    if a.dry_run:
        return 0
    # A local model needs no hub; the update check of the transformers CLI would query PyPI on every start.
    env = {**os.environ, "HF_HUB_DISABLE_UPDATE_CHECK": "1"}
    env.setdefault("HF_HUB_OFFLINE", "1")
    cmd = [
        sys.executable,
        "-m",
        "transformers.cli.transformers",
        "serve",
        str(model),
        "--host",
        a.host,
        "--port",
        str(a.port),
        "--device",
        a.device,
        "--dtype",
        a.dtype,
    ]
    os.execve(sys.executable, cmd, env)  # the server replaces this process: signals and exit code are its own
    return 0


if __name__ == "__main__":
    run_cli(main)
