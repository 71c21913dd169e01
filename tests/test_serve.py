"""hpml_ft.serve: refusals, and the real `transformers serve` process answering one chat completion."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from conftest import free_port, running_server

from hpml_ft.errors import run_cli
from hpml_ft.serve import main

READY_TIMEOUT_S = 180  # a shared 2-core machine can take a while to import torch and load the model


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    return exc.value.code


def test_help_imports_no_torch():
    code = (
        "import runpy, sys\nsys.argv = ['serve', '--help']\ntry:\n    runpy.run_module('hpml_ft.serve', "
        "run_name='__main__')\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--port" in out.stdout


def test_refuses_incomplete_model_and_adapter(tmp_path, capsys):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    assert exit_code([str(tmp_path / "broken")]) == 2
    assert "no weight files" in capsys.readouterr().err
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    assert exit_code([str(tmp_path / "adapter")]) == 2
    assert "python -m hpml_ft.merge --adapter" in capsys.readouterr().err


def test_dry_run_prints_usage_and_busy_port_is_refused(tiny_model_dir, capsys):
    pytest.importorskip("fastapi")
    port = free_port()
    assert main([str(tiny_model_dir), "--port", str(port), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"http://127.0.0.1:{port}/v1" in out and "curl -s" in out and "OpenAI(base_url=" in out
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert exit_code([str(tiny_model_dir), "--port", str(port), "--dry-run"]) == 2
    assert "pick another --port" in capsys.readouterr().err


def test_server_answers_an_openai_chat_completion(tiny_model_dir, tmp_path):
    for module in ("fastapi", "uvicorn", "openai"):
        pytest.importorskip(module)
    from openai.types.chat import ChatCompletion

    port, log = free_port(), tmp_path / "serve.log"
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "hpml_ft.serve", str(tiny_model_dir), "--port", str(port), "--device", "cpu"]
    with running_server(cmd, base, log, READY_TIMEOUT_S):
        messages = [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Hi"}]
        body = {"model": str(tiny_model_dir.resolve()), "max_tokens": 5, "messages": messages}
        req = urllib.request.Request(
            f"{base}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = ChatCompletion.model_validate(json.load(r))
        assert reply.object == "chat.completion" and reply.choices[0].message.role == "assistant"
        assert isinstance(reply.choices[0].message.content, str)
        assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 5
        assert f"base URL: {base}/v1" in log.read_text()
