"""Safety, round two (issue 21): model code never runs behind a prompt, secrets never reach a record, a judge
request has a total deadline, pass-through dict values are typed, and bad input is one `error:` line."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hpml_ft.errors import UserError, run_cli

FIXTURE = Path(__file__).parent / "fixtures" / "eval_tatqa.json"


def _cli_error(capsys, main, *argv: str) -> str:
    """Run a CLI entry in-process: it must exit 2 with exactly one `error:` line (and no traceback)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(main, list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert exc.value.code == 2, err[-5:]
    assert len(err) == 1 and err[0].startswith("error: "), err[-5:]
    return err[0]


# ---------------------------------------------------------------- model code behind an interactive prompt


@pytest.fixture()
def code_model(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """(model dir whose config can only be built by its own evil.py, marker file evil.py writes on import)."""
    model, marker = tmp_path / "code_model", tmp_path / "ran_model_code"
    shutil.copytree(tiny_model_dir, model)
    (model / "evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('pwned')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n"
    )
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil_llama"  # unknown to transformers: only the model's own code can load it
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def _adapter_for(tmp_path: Path, tiny_model_dir: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")
    adapter = tmp_path / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), lora).save_pretrained(adapter)
    return adapter


@pytest.mark.parametrize("stdin", ["closed", "y"])
@pytest.mark.parametrize("command", ["merge", "quantize", "train"])
def test_model_code_is_never_run_or_asked_for(
    code_model, tmp_path, tiny_model_dir, alpaca_file, monkeypatch, capsys, command, stdin
):
    """Without the user's own flag, a model that needs its own code is refused in one line: transformers never
    asks 'run custom code? [y/N]' (a piped `y` would run it) and the code never runs."""
    model, marker = code_model
    if stdin == "closed":
        closed = io.StringIO()
        closed.close()
        monkeypatch.setattr("sys.stdin", closed)
    else:
        monkeypatch.setattr("sys.stdin", io.StringIO("y\n" * 5))
    out = tmp_path / "out"
    if command == "merge":
        from hpml_ft.merge import main

        argv = [
            "--adapter",
            str(_adapter_for(tmp_path, tiny_model_dir)),
            "--base",
            str(model),
            "--out",
            str(out),
        ]
    elif command == "quantize":
        from hpml_ft.quant.cli import main

        argv = [str(model), "--bits", "8", "--group-size", "32", "--out", str(out), "--no-measure"]
    else:
        from hpml_ft.train import main

        recipe = tmp_path / "r.yaml"
        recipe.write_text("train:\n  max_steps: 1\n")
        argv = [str(recipe), f"model.name_or_path={model}", f"data.path={alpaca_file}"]
        argv += [f"train.output_dir={out}", "train.eval_generate=0", "train.max_length=64"]
    capsys.readouterr()  # what building the adapter printed
    err = _cli_error(capsys, main, *argv)
    assert "own Python code" in err and str(model) in err
    assert not marker.exists()


def _never_trusts(call) -> bool:
    """A call that passes trust_remote_code=False as a literal can never run model code nor prompt."""
    import ast

    return any(
        k.arg == "trust_remote_code" and isinstance(k.value, ast.Constant) and k.value.value is False
        for k in call.keywords
    )


def test_every_model_load_goes_through_the_one_trust_rule():
    """No module calls from_pretrained/from_config itself with trust_remote_code left out (the library would
    prompt) or computed (only model.pretrained decides it); GenerationConfig and PeftModel run no model code."""
    import ast

    import hpml_ft

    pkg = Path(hpml_ft.__file__).parent
    calls = []
    for f in pkg.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = ast.unparse(node.func.value)
            exempt = owner in ("GenerationConfig", "PeftModel", "loader") or _never_trusts(
                node
            )  # loader: pretrained
            if node.func.attr in ("from_pretrained", "from_config") and not exempt:
                calls.append(f"{f.relative_to(pkg)}: {owner}.{node.func.attr}")
    assert calls == []


# ---------------------------------------------------------------- secrets written to disk


HUB_TOKEN = "hf_SeCrEtToKeN0123456789"


def _files_holding(root: Path, secret: bytes) -> list[str]:
    return [str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and secret in p.read_bytes()]


def test_hub_token_reaches_no_file_of_the_run(tiny_model_dir, alpaca_file, tmp_path, monkeypatch):
    """recipe.yaml, run.json, adapter|merged/hpml_ft.json, training_args.bin (pickled, shared with the model):
    none holds the token; records keep ***, and the token is where push_to_hub reads it (HF_TOKEN)."""
    from hpml_ft.train import main as train

    monkeypatch.setenv("HF_TOKEN", "before")  # restored after the test, whatever training sets
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"name: s\ntrain:\n  sft_extra:\n    hub_token: {HUB_TOKEN}\n")
    out = tmp_path / "out"
    argv = [str(recipe), f"model.name_or_path={tiny_model_dir}", f"data.path={alpaca_file}"]
    argv += [f"train.output_dir={out}", "train.max_steps=2", "train.save_steps=1", "train.eval_generate=0"]
    argv += ["train.per_device_batch_size=2", "train.effective_batch_size=2", "data.max_samples=4"]
    argv += ["train.max_length=64", "data.eval_fraction=0.1"]
    assert train(argv) == 0
    run = out / "s"
    assert (run / "adapter" / "training_args.bin").is_file() and (run / "merged" / "hpml_ft.json").is_file()
    assert list(run.glob("checkpoints/checkpoint-*/training_args.bin"))
    assert _files_holding(run, HUB_TOKEN.encode()) == []
    assert "hub_token: '***'" in (run / "recipe.yaml").read_text()
    assert json.loads((run / "run.json").read_text())["recipe"]["train"]["sft_extra"]["hub_token"] == "***"
    assert os.environ["HF_TOKEN"] == HUB_TOKEN  # where push_to_hub finds it


@contextlib.contextmanager
def _judge_server(chat: str = "json", models: str = "json", limit_s: float = 60) -> Iterator[str]:
    """A loopback OpenAI-ish endpoint (127.0.0.1 only): GET /v1/models lists `judge-model` (or answers an HTML
    page), POST chat completions answers `[RESULT] 4` (or streams bytes forever). It stops itself after
    `limit_s` and on exit; an endless body ends when the server stops."""
    stop = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _send(self, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):  # noqa: N802
            if models == "html":
                return self._send(b"<html><body>Welcome to nginx!</body></html>", "text/html")
            self._send(
                json.dumps({"object": "list", "data": [{"id": "judge-model", "object": "model"}]}).encode()
            )

        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            if chat == "endless":  # 200, then a body that never ends
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                with contextlib.suppress(OSError):
                    while not stop.wait(0.05):
                        self.wfile.write(b"1\r\n \r\n")
                        self.wfile.flush()
                self.close_connection = True  # stopped: the client sees a cut body, not a wait for more
                return
            reply = {
                "id": "c",
                "object": "chat.completion",
                "created": 0,
                "model": "judge-model",
                "choices": [
                    {
                        "index": 0,
                        "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "Ok. [RESULT] 4"},
                    }
                ],
            }
            self._send(json.dumps(reply).encode())

        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    timer = threading.Timer(limit_s, stop.set)
    timer.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/v1"
    finally:
        stop.set()
        timer.cancel()
        server.shutdown()
        server.server_close()


def test_judge_url_password_reaches_no_result_file(tiny_model_dir, tmp_path):
    from hpml_ft.eval.cli import main as evaluate

    out = tmp_path / "ev"
    with _judge_server() as url:
        shown = url.replace("http://", "http://alice:pA55w0rd@")
        argv = [
            "--models",
            str(tiny_model_dir),
            "--data",
            str(FIXTURE),
            "--limit",
            "1",
            "--max-new-tokens",
            "2",
        ]
        assert evaluate([*argv, "--out", str(out), "--judge-url", shown, "--judge-retries", "0"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["judge"].startswith("http://alice:***@127.0.0.1")
    assert results["models"][0]["metrics"]["judge"]["n"] == 1
    assert _files_holding(out, b"pA55w0rd") == []


# ---------------------------------------------------------------- hangs


def test_judge_timeout_bounds_a_body_that_never_ends():
    """--judge-timeout bounds the whole request: a 200 whose body streams forever is cut at the deadline and
    the row is counted as a `timed out` error (the client's own timeout is per read, and bytes keep coming)."""
    from hpml_ft.eval.judge import judge_rows
    from hpml_ft.eval.judge_prompt import JudgeSpec

    rows = [{"prompt": "q", "pred": "a", "gold": "a"}]
    with _judge_server(chat="endless", limit_s=20) as url:
        spec = JudgeSpec(url=url, model="judge-model", timeout=2.0, retries=0, concurrency=1)
        start = time.monotonic()
        summary = judge_rows(spec, rows)
        took = time.monotonic() - start
    assert rows[0]["judge_error"] == "timed out", rows[0]["judge_error"]
    assert summary["errors"] == 1 and took < 2 * spec.timeout + 1, took


# ---------------------------------------------------------------- typed values in the pass-through dicts


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "train.sft_extra={adam_beta2: high}",
            "train.sft_extra.adam_beta2: 'high' is not a valid value (expected float)",
        ),
        (
            "peft.extra={bias: sometimes}",
            "peft.extra.bias: 'sometimes' is not a valid value (expected one of 'none'",
        ),
        (
            "train.sft_extra={torch_compile: maybe}",
            "train.sft_extra.torch_compile: 'maybe' is not a valid value (expected true or false)",
        ),
        ("train.sft_extra={dataloader_prefetch_factor: two}", "expected int or null"),
        ("train.sft_extra={hub_strategy: sometimes}", "expected one of 'end', 'every_save'"),
        ("peft.extra={layers_to_transform: [a]}", "expected a list of int or int or null"),
    ],
)
def test_pass_through_values_are_checked_against_the_field_types(override, expected):
    from hpml_ft.config import load_config

    with pytest.raises(UserError) as err:
        load_config(None, [override, "train.max_steps=1", "train.num_epochs=null"])
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_pass_through_values_the_fields_take_are_kept_or_normalised():
    from hpml_ft.config import load_config

    cfg = load_config(
        None,
        [
            "train.sft_extra={torch_compile: 'false', adam_beta2: '1e-3', dataloader_prefetch_factor: null}",
            "peft.extra={bias: lora_only, layers_to_transform: [0, 1], rank_pattern: {q_proj: 2}}",
            "train.max_steps=1",
            "train.num_epochs=null",
        ],
    )
    assert cfg.train.sft_extra == {
        "torch_compile": False,
        "adam_beta2": 1e-3,
        "dataloader_prefetch_factor": None,
    }
    assert cfg.peft.extra["layers_to_transform"] == [0, 1] and cfg.peft.extra["bias"] == "lora_only"


# ---------------------------------------------------------------- tracebacks instead of an error line


def _not_json_run(tmp_path: Path, tiny_model_dir: Path) -> Path:
    run = tmp_path / "runs" / "broken"
    shutil.copytree(tiny_model_dir, run / "merged")
    (run / "run.json").write_text("{not json")
    return run


def _traceback_case(case: str, tmp_path: Path, tiny, alpaca) -> tuple[object, list[str], str]:
    """(CLI main, argv, a piece of the one error line) of each case that used to end in a traceback."""
    from hpml_ft.eval.cli import main as evaluate
    from hpml_ft.eval.judge import main as judge
    from hpml_ft.infer import main as infer
    from hpml_ft.quant.cli import main as quantize
    from hpml_ft.serve import main as serve
    from hpml_ft.train import main as train

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: c\ntrain:\n  max_steps: 1\n")
    train_argv = [str(recipe), f"model.name_or_path={tiny}", f"data.path={alpaca}", "train.eval_generate=0"]
    train_argv += [f"train.output_dir={tmp_path / 'out'}", "train.max_length=64"]
    preds = tmp_path / "p.jsonl"
    preds.write_text(json.dumps({"prompt": "q", "pred": "a"}) + "\n")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 64)  # not UTF-8, NUL bytes
    if case == "push_to_hub offline":
        return train, [*train_argv, "train.sft_extra={push_to_hub: true, hub_model_id: me/m}"], "offline mode"
    if case == "quantize a quantized model":
        q = tmp_path / "q8"
        assert (
            quantize([str(tiny), "--bits", "8", "--group-size", "32", "--out", str(q), "--no-measure"]) == 0
        )
        return (
            quantize,
            [str(q), "--bits", "4", "--group-size", "32", "--out", str(tmp_path / "q4")],
            "already quantized",
        )
    if case.startswith("run.json not JSON"):
        run, out = _not_json_run(tmp_path, tiny), str(tmp_path / "o")
        argv = {
            "infer": (infer, ["--model", str(run), "--prompt", "hi"]),
            "eval": (evaluate, ["--models", str(run), "--data", str(FIXTURE), "--limit", "1", "--out", out]),
            "quantize": (quantize, [str(run), "--bits", "8", "--out", out, "--no-measure"]),
        }[case.split()[-1]]
        return *argv, "run.json is not a valid run record"
    if case == "malformed IPv6 judge URL":
        return judge, ["--predictions", str(preds), "--judge-url", "http://[::1/v1"], "must be an http(s) URL"
    if case == "target_modules naming no module":
        return train, [*train_argv, "peft.target_modules=[nope_proj]"], "names no module of the model"
    if case == "binary rubric":
        argv = [
            "--predictions",
            str(preds),
            "--judge-url",
            "http://127.0.0.1:9/v1",
            "--judge-rubric",
            str(binary),
        ]
        return judge, argv, "binary data, not a rubric"
    if case == "binary safety file":
        return (
            evaluate,
            ["--models", str(tiny), "--safety", str(binary), "--out", str(tmp_path / "o")],
            "binary data",
        )
    if case == "IFEval prompt not a string":
        bad = tmp_path / "if.jsonl"
        row = {
            "key": 1,
            "prompt": {"text": "hi"},
            "instruction_id_list": ["punctuation:no_comma"],
            "kwargs": [{}],
        }
        bad.write_text(json.dumps(row) + "\n")
        argv = ["--models", str(tiny), "--ifeval", str(bad), "--out", str(tmp_path / "o")]
        return evaluate, argv, "prompt and each instruction id must be strings"
    if case == "serve --device that does not exist":
        return serve, [str(tiny), "--device", "cuda:99", "--dry-run"], "--device cuda:99 is not a device"
    raise AssertionError(case)


TRACEBACK_CASES = [
    "push_to_hub offline",
    "quantize a quantized model",
    "run.json not JSON: infer",
    "run.json not JSON: eval",
    "run.json not JSON: quantize",
    "malformed IPv6 judge URL",
    "target_modules naming no module",
    "binary rubric",
    "binary safety file",
    "IFEval prompt not a string",
    "serve --device that does not exist",
]


@pytest.mark.parametrize("case", TRACEBACK_CASES)
def test_bad_input_is_one_error_line_not_a_traceback(case, tmp_path, tiny_model_dir, alpaca_file, capsys):
    main, argv, message = _traceback_case(case, tmp_path, tiny_model_dir, alpaca_file)
    capsys.readouterr()
    assert message in _cli_error(capsys, main, *argv)


# ---------------------------------------------------------------- accepted silently


def test_safety_record_with_null_text_is_refused(tmp_path):
    from hpml_ft.eval.safety import load_safety_file

    path = tmp_path / "s.jsonl"
    path.write_text(json.dumps({"user_input": "hello", "toxicity": 0}) + "\n")
    path.write_text(path.read_text() + json.dumps({"user_input": None, "toxicity": 1}) + "\n")
    with pytest.raises(UserError, match="record 1 has user_input=None"):
        load_safety_file(path)


def test_dataset_whose_every_answer_is_empty_is_refused_before_training(tmp_path, tiny_model_dir, capsys):
    from hpml_ft.train import main as train

    data = tmp_path / "empty_answers.json"
    data.write_text(json.dumps([{"instruction": f"say {i}", "input": "", "output": ""} for i in range(8)]))
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: e\ntrain:\n  max_steps: 1\n")
    out = tmp_path / "out"
    argv = [
        str(recipe),
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"train.output_dir={out}",
    ]
    err = _cli_error(capsys, train, *argv, "train.eval_generate=0", "train.max_length=64")
    assert str(data) in err and "every answer" in err
    assert not (out / "e").exists()


def test_judge_whose_models_answer_is_html_is_named_as_such():
    from hpml_ft.eval.judge import check_endpoint

    with _judge_server(models="html") as url, pytest.raises(UserError) as err:
        check_endpoint(url, None, timeout=5.0)
    assert "text/html, not an OpenAI model list" in str(err.value) and "not reachable" not in str(err.value)
