"""Untrusted input must not run code or leak secrets (issue 13): crafted ZeRO checkpoints, a run record that asks
for remote code, judge API keys and endpoints, and a server bound to every interface."""

from __future__ import annotations

import argparse
import contextlib
import http.server
import importlib.util
import json
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from hpml_ft.errors import UserError, run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "eval_tatqa.json"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed not installed: pip install deepspeed"
)


def _cli_error(capsys, main, *argv: str) -> str:
    """Run a CLI entry in-process: it must exit 2 with exactly one `error:` line."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---------------------------------------------------------------- consolidate: crafted pickles


class _RunsCode:
    """Unpickling this calls exec(): what a crafted checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)


def _crafted_checkpoint(root: Path, marker: Path) -> Path:
    import torch

    ckpt = root / "checkpoint-1"
    step = ckpt / "global_step1"
    step.mkdir(parents=True)
    (ckpt / "latest").write_text("global_step1")
    (ckpt / "config.json").write_text("{}")
    payload = {"optimizer_state_dict": {"zero_stage": _RunsCode(marker)}, "module": _RunsCode(marker)}
    torch.save(payload, step / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save(payload, step / "zero_pp_rank_0_mp_rank_00_model_states.pt")
    return ckpt


@needs_deepspeed
def test_consolidate_refuses_a_checkpoint_whose_pickle_runs_code(tmp_path, capsys):
    from hpml_ft.consolidate import main as consolidate

    marker = tmp_path / "marker"
    ckpt, out = _crafted_checkpoint(tmp_path, marker), tmp_path / "out"
    err = _cli_error(capsys, consolidate, str(ckpt), "--out", str(out))
    assert "--trust-checkpoint" in err and "Python object exec " in err
    assert not marker.exists() and not out.exists()
    # the control: the file really is live, and the explicit flag is the one way to load it as before
    with contextlib.suppress(Exception, SystemExit):  # what DeepSpeed makes of the payload does not matter
        run_cli(consolidate, [str(ckpt), "--out", str(out), "--trust-checkpoint"])
    assert marker.read_text() == "pwned"


@needs_deepspeed
def test_consolidate_allow_list_loads_what_deepspeed_writes(tmp_path):
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from hpml_ft.consolidate import weights_only_loading

    state = {
        "optimizer_state_dict": {
            "zero_stage": ZeroStageEnum.weights,
            "loss_scaler": LossScaler(1.0),
            "dynamic": DynamicLossScaler(2.0**16, 1000, 1.0, 2, True),
            "fp32_flat_groups": [torch.ones(3)],
        }
    }
    torch.save(state, tmp_path / "optim.pt")
    with weights_only_loading(trust=False):
        got = torch.load(tmp_path / "optim.pt", weights_only=False)  # forced to weights_only inside
    assert got["optimizer_state_dict"]["zero_stage"] == ZeroStageEnum.weights
    assert torch.equal(got["optimizer_state_dict"]["fp32_flat_groups"][0], torch.ones(3))


def test_consolidate_help_names_the_trust_flag(capsys):
    from hpml_ft.consolidate import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "--trust-checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- trust_remote_code only from the command line


@pytest.fixture()
def remote_code_run(tmp_path, tiny_model_dir) -> Path:
    """outputs/run_rc: a finished run whose recipe says model.trust_remote_code=true."""
    import shutil

    from hpml_ft.config import load_config

    run = tmp_path / "outputs" / "run_rc"
    shutil.copytree(tiny_model_dir, run / "merged")
    cfg = load_config(
        None,
        [
            "train.max_steps=1",
            f"data.path={FIXTURE}",
            "data.eval_fraction=0.5",
            f"model.name_or_path={tiny_model_dir}",
            "model.trust_remote_code=true",
        ],
    )
    record = {
        "status": "finished",
        "base_path": str(tiny_model_dir),
        "recipe": cfg.model_dump(mode="json"),
        "artifacts": {"merged": "merged"},
    }
    (run / "run.json").write_text(json.dumps(record))
    return run


class _Stop(Exception):
    pass


@pytest.mark.parametrize("flag", [False, True])
def test_eval_takes_trust_remote_code_from_the_flag_not_the_run(remote_code_run, tmp_path, monkeypatch, flag):
    import hpml_ft.eval.answers as answers
    import hpml_ft.model as hm
    from hpml_ft.eval.cli import main

    seen: list[tuple[str, bool]] = []
    real_tok = hm.load_tokenizer
    monkeypatch.setattr(
        hm, "load_tokenizer", lambda p, trust=False: seen.append(("tok", trust)) or real_tok(p)
    )

    def fake_load_model(spec, mcfg):
        seen.append(("model", mcfg.trust_remote_code))
        raise _Stop

    monkeypatch.setattr(answers, "load_model", fake_load_model)
    argv = ["--runs-dir", str(remote_code_run.parent), "--models", str(remote_code_run), "--limit", "1"]
    argv += ["--out", str(tmp_path / "ev")] + (["--trust-remote-code"] if flag else [])
    with pytest.raises(_Stop):
        main(argv)
    assert seen == [("tok", flag), ("model", flag)]


@pytest.mark.parametrize("flag", [False, True])
def test_infer_takes_trust_remote_code_from_the_flag_not_the_run(remote_code_run, monkeypatch, flag):
    import hpml_ft.model as hm
    from hpml_ft.infer import main as infer

    seen: list[bool] = []

    def fake_load(path, mcfg=None):
        seen.append(mcfg.trust_remote_code)
        raise _Stop

    monkeypatch.setattr(hm, "load_causal_lm", fake_load)
    with pytest.raises(_Stop):
        infer(["--model", str(remote_code_run), "--prompt", "hi"] + (["--trust-remote-code"] if flag else []))
    assert seen == [flag]


def test_model_code_in_a_run_dir_is_not_executed(remote_code_run, tmp_path):
    """A merged/ that ships code (auto_map) and a record asking for it: loading runs none of it."""
    from hpml_ft.model import load_causal_lm, load_tokenizer

    merged, marker = remote_code_run / "merged", tmp_path / "ran"
    code = f"open({str(marker)!r}, 'w').write('pwned')\nfrom transformers import LlamaForCausalLM as Evil\n"
    (merged / "evil.py").write_text(code)
    config = json.loads((merged / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil.Evil"}
    (merged / "config.json").write_text(json.dumps(config))
    load_tokenizer(str(merged))
    load_causal_lm(str(merged))
    assert not marker.exists()


# ---------------------------------------------------------------- judge: API keys and a silent endpoint


def _judge_args(url: str, **kw) -> argparse.Namespace:
    base = {
        "judge": None,
        "judge_url": url,
        "judge_model": None,
        "judge_timeout": 30.0,
        "judge_max_new_tokens": 8,
        "judge_rubric": None,
        "judge_api_key": None,
        "allow_insecure_key": False,
    }
    return argparse.Namespace(**{**base, **kw})


@contextmanager
def _recording_server() -> Iterator[tuple[str, list[dict]]]:
    """A loopback OpenAI-ish server that records each request's path and headers; /redirect/* answers 302."""
    seen: list[dict] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            seen.append({"path": self.path, "auth": self.headers.get("Authorization")})
            if self.path.startswith("/redirect/"):
                self.send_response(302)
                self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/v1/models")
                self.end_headers()
                return
            body = json.dumps({"data": [{"id": "judge-model"}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_judge_never_sends_openai_api_key_and_sends_its_own_key_to_its_url(monkeypatch):
    from hpml_ft.eval.judge import judge_spec_from_args

    monkeypatch.setenv("OPENAI_API_KEY", "sk-meant-for-openai")
    monkeypatch.delenv("HPML_FT_JUDGE_API_KEY", raising=False)
    with _recording_server() as (base, seen):
        spec = judge_spec_from_args(_judge_args(base + "/v1"))
        assert spec.model == "judge-model" and spec.api_key is None
        assert seen[-1]["auth"] is None
        monkeypatch.setenv("HPML_FT_JUDGE_API_KEY", "judge-key")
        spec = judge_spec_from_args(_judge_args(base + "/v1"))
        assert seen[-1]["auth"] == "Bearer judge-key" and "judge-key" not in repr(spec)
        judge_spec_from_args(_judge_args(base + "/v1", judge_api_key="cli-key"))
        assert seen[-1]["auth"] == "Bearer cli-key"


def test_judge_does_not_follow_a_redirect_with_the_key(monkeypatch):
    from hpml_ft.eval.judge import judge_spec_from_args

    with _recording_server() as (base, seen):
        with pytest.raises(UserError, match="HTTP 302"):
            judge_spec_from_args(_judge_args(base + "/redirect/v1", judge_api_key="k"))
        assert [s["path"] for s in seen] == ["/redirect/v1/models"]


def test_judge_refuses_a_key_over_plain_http_to_a_remote_host(tmp_path, capsys, monkeypatch):
    from hpml_ft.eval.judge import check_key_transport
    from hpml_ft.eval.judge import main as judge

    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"prompt": "q", "pred": "a"}) + "\n")
    monkeypatch.setenv("HPML_FT_JUDGE_API_KEY", "secret")
    err = _cli_error(capsys, judge, "--predictions", str(preds), "--judge-url", "http://judge.example.com/v1")
    assert "--allow-insecure-key" in err and "secret" not in err
    assert not list(tmp_path.glob("p.judged*"))
    check_key_transport("http://judge.example.com/v1", "secret", allow_insecure=True)  # opted in
    check_key_transport("https://judge.example.com/v1", "secret", allow_insecure=False)
    check_key_transport("http://127.0.0.1:8000/v1", "secret", allow_insecure=False)
    check_key_transport("http://judge.example.com/v1", None, allow_insecure=False)  # no key, nothing to leak


@contextmanager
def _silent_server(hold_s: float) -> Iterator[int]:
    """Accepts connections on 127.0.0.1 and never answers; every socket closes after `hold_s` or at exit."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(hold_s)
    stop = threading.Event()

    def accept() -> None:
        conns = []
        try:
            conns.append(listener.accept()[0])
            stop.wait(hold_s)
        except OSError:
            pass
        for c in conns:
            c.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(hold_s + 5)
        listener.close()


def test_judge_precheck_gives_up_on_a_server_that_never_answers(monkeypatch):
    """The probe must time out on its own short limit, not the 120 s request timeout: if it waited for the
    request timeout, the server would close the socket first and the error would not be a time-out."""
    import hpml_ft.eval.judge as judge

    monkeypatch.setattr(judge, "PROBE_TIMEOUT", 0.5)
    with (
        _silent_server(hold_s=20) as port,
        pytest.raises(UserError, match="did not answer GET /models within"),
    ):
        judge.check_endpoint(f"http://127.0.0.1:{port}/v1", None, timeout=120.0)


# ---------------------------------------------------------------- serve on every interface


def test_serve_on_all_interfaces_warns_and_prints_real_addresses(tiny_model_dir, capsys):
    from conftest import free_port

    from hpml_ft.serve import exposure_warning, local_addresses, main

    port = free_port()
    assert main([str(tiny_model_dir), "--host", "0.0.0.0", "--port", str(port), "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "warning:" in err and "every network interface" in err and "no authentication" in err
    first = (local_addresses() or ["127.0.0.1"])[0]
    assert f"base URL: http://{first}:{port}/v1" in out
    assert "0.0.0.0" not in out.split("base URL:")[1].splitlines()[0]
    assert exposure_warning("127.0.0.1", port) == (None, ["127.0.0.1"])
    assert exposure_warning("10.1.2.3", port)[1] == ["10.1.2.3"]
