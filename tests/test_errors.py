"""The bad-input catalogue: every CLI answers bad input with exit code 2, one line naming problem and fix,
no traceback, and no output directory left behind."""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpml_ft.errors import run_cli

GOOD = "name: c\ntrain:\n  max_steps: 1\n"


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.fixture()
def env(tmp_path, tiny_model_dir, alpaca_file, broken_models):
    """Paths for the cases: a recipe pointing at the tiny model, and an output dir that must stay absent."""
    recipe = tmp_path / "good.yaml"
    recipe.write_text(GOOD)
    out = tmp_path / "out"
    base = [
        str(recipe),
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={alpaca_file}",
        f"train.output_dir={out}",
        "train.eval_generate=0",
        "train.max_length=128",
    ]
    afile = tmp_path / "a_file"
    afile.write_text("keep me\n")
    return {
        "tmp": tmp_path,
        "base": base,
        "out": out,
        "tiny": tiny_model_dir,
        "data": alpaca_file,
        "file": afile,
        **broken_models,
    }


def _write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


def _bytes(tmp: Path, name: str, data: bytes) -> str:
    (tmp / name).write_bytes(data)
    return str(tmp / name)


ALPACA_LINE = b'{"instruction": "a", "output": "b"}\n'
TATQA = {
    "table": {"uid": "t", "table": [["a", "1"]]},
    "paragraphs": [{"uid": "p", "order": 1, "text": "x"}],
    "questions": [{"uid": "q", "question": "a?", "answer": "1", "answer_type": "span", "scale": ""}],
}


def _chat(role: str, content: str | None) -> dict:
    return {"messages": [{"role": role, "content": content}, {"role": "assistant", "content": "x"}]}


def _tatqa_answer(answer: object) -> dict:
    return {**TATQA, "questions": [{**TATQA["questions"][0], "answer": answer}]}


@pytest.fixture(scope="module")
def broken_models(tmp_path_factory, tiny_model_dir) -> dict[str, Path]:
    """Copies of the tiny model: one with its weights cut in half, one whose shard index names a missing shard."""
    root = tmp_path_factory.mktemp("broken")
    corrupt, sharded = root / "corrupt", root / "sharded"
    shutil.copytree(tiny_model_dir, corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(tiny_model_dir, sharded)
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"corrupt": corrupt, "sharded": sharded}


def _train_cases(e: dict) -> dict[str, tuple[list[str], str]]:
    t, b = e["tmp"], e["base"]
    return {
        "yaml syntax": (
            [_write(t, "s.yaml", "train:\n  max_steps: 1\n   x: [\n")],
            "YAML syntax error at line",
        ),
        "unknown key": ([*b, "train.lerning_rate=1"], "did you mean 'train.learning_rate'"),
        "negative lr": (
            [*b, "train.learning_rate=-1e-4"],
            "train.learning_rate: Input should be greater than 0",
        ),
        "wrong type": (
            [*b, "train.per_device_batch_size=eight"],
            "per_device_batch_size: Input should be a valid",
        ),
        "epochs and steps": (
            [*b, "train.num_epochs=1"],
            "set exactly one of train.num_epochs and train.max_steps",
        ),
        "missing data": ([*b, f"data.path={t}/nope.json"], "data file not found"),
        "missing columns": (
            [*b, "data.path=" + _write(t, "cols.json", '[{"prompt": "x", "answer": "y"}]')],
            "cannot tell the data format",
        ),
        "alpaca columns": (
            [*b, "data.format=alpaca", "data.path=" + _write(t, "c2.json", '[{"instruction": "x"}]')],
            "lacks 'instruction'/'output'",
        ),
        "empty dataset": ([*b, "data.path=" + _write(t, "empty.json", "[]")], "the dataset is empty"),
        "malformed json": (
            [*b, "data.path=" + _write(t, "bad.json", '[{"a": 1,]')],
            "malformed JSON at line 1",
        ),
        "malformed tatqa": (
            [*b, "data.format=tatqa", "data.path=" + _write(t, "tq.json", '[{"table": [1]}]')],
            "is not a TAT-QA context",
        ),
        "max_length too short": ([*b, "train.max_length=10"], "shorter than every training prompt"),
        "model missing": ([*b, f"model.name_or_path={t}/no_model"], "model path not found"),
        "fa2 without flash-attn": (
            [*b, "model.attn_implementation=flash_attention_2", "model.dtype=float32"],  # any device
            "needs the flash-attn package",
        ),
        "qlora + zero3": ([*b, "peft.method=qlora", "train.deepspeed=deepspeed/zero3.json"], "ZeRO-3"),
        "missing deepspeed json": (
            [*b, "peft.method=full", f"train.deepspeed={t}/no_ds.json"],
            "DeepSpeed config not found",
        ),
        "invalid deepspeed json": (
            [*b, "peft.method=full", "train.deepspeed=" + _write(t, "ds.json", "{zero")],
            "invalid JSON at line 1",
        ),
        "unknown recipe": ([str(t / "nope.yaml")], "recipe not found"),
        "batch not divisible": (
            [*b, "train.effective_batch_size=6", "train.per_device_batch_size=4"],
            "not a multiple",
        ),
        "fp16 on cpu": ([*b, "train.precision=fp16"], "needs a CUDA GPU"),
        "bad override": ([*b, "train.max_steps"], "not of the form section.key=value"),
        # data files: bytes, encodings, line numbers, field types, roles (validated once, in data.py)
        "binary data file": ([*b, "data.path=" + _bytes(t, "bin.json", b"\x00\x01PK\x03")], "binary data"),
        "non-utf8 data file": (
            [
                *b,
                "data.path="
                + _bytes(
                    t,
                    "l1.jsonl",
                    ALPACA_LINE + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"),
                ),
            ],
            "l1.jsonl: not UTF-8 text (line 2",
        ),
        "jsonl error line": (
            [
                *b,
                "data.path="
                + _bytes(t, "l3.jsonl", ALPACA_LINE + b"\n" + ALPACA_LINE + b'{"instruction": }\n'),
            ],
            "malformed JSON at line 4",
        ),
        "int instruction": (
            [*b, "data.path=" + _bytes(t, "i.jsonl", ALPACA_LINE + b'{"instruction": 5, "output": "x"}\n')],
            "i.jsonl: line 2: 'instruction' must be a string, got int",
        ),
        "null chat content": (
            [*b, "data.path=" + _write(t, "n.json", json.dumps([_chat("user", None)]))],
            "record 0: 'messages[0].content' must be a string, got null",
        ),
        "unknown chat role": (
            [*b, "data.path=" + _write(t, "r.json", json.dumps([_chat("usr", "hi")]))],
            "unknown role 'usr'; use one of system, user, assistant",
        ),
        "string tatqa paragraphs": (
            [*b, "data.path=" + _write(t, "tq2.json", json.dumps([{**TATQA, "paragraphs": "text"}]))],
            "record 0: 'paragraphs' must be a list",
        ),
        "tatqa answer type": (
            [*b, "data.path=" + _write(t, "tq3.json", json.dumps([_tatqa_answer({"a": 1})]))],
            "questions[0]: 'answer' must be a string, a number or a list",
        ),
        # recipes: duplicate keys, nan/inf, encoding
        "duplicate recipe key": (
            [_write(t, "dup.yaml", "name: c\ntrain:\n  max_steps: 1\n  seed: 1\n  max_steps: 3\n"), *b[1:]],
            "key 'max_steps' appears twice (lines 3 and 5)",
        ),
        "nan learning rate": (
            [*b, "train.learning_rate=nan"],
            "learning_rate: Input should be a finite number",
        ),
        "inf epochs": (
            [*b, "train.max_steps=null", "train.num_epochs=.inf"],
            "num_epochs: Input should be a finite number",
        ),
        "non-utf8 recipe": ([_bytes(t, "l.yaml", b"name: caf\xe9\n"), *b[1:]], "not UTF-8 text"),
        # outputs and weights, checked before any model loads
        "output_dir is a file": ([*b, f"train.output_dir={e['file']}"], "is a file, not a directory"),
        "output_dir under a file": (
            [*b, f"train.output_dir={e['file']}/runs"],
            f"cannot be created: {e['file']} is a file",
        ),
        "truncated weights": (
            [*b, f"model.name_or_path={e['corrupt']}"],
            "model.safetensors: corrupt or truncated weight file",
        ),
        "missing weight shard": (
            [*b, f"model.name_or_path={e['sharded']}"],
            "model-00002-of-00002.safetensors: weight shard named in",
        ),
    }


def _expect_exit2(capsys, module: str, argv: list[str], message: str, one_line: bool = True) -> str:
    """Exit 2, an `error:` line naming the problem, no traceback; and (one_line) nothing else on stderr."""
    main = importlib.import_module(module).main
    capsys.readouterr()  # drop what the test's own setup printed
    with pytest.raises(SystemExit) as ex:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2, err
    assert not one_line or len(err.splitlines()) == 1, f"expected one stderr line, got:\n{err}"
    last = err.splitlines()[-1]
    assert last.startswith("error: ") and message in last, err
    assert "Traceback" not in err
    return last


CASES = [
    "yaml syntax",
    "unknown key",
    "negative lr",
    "wrong type",
    "epochs and steps",
    "missing data",
    "missing columns",
    "alpaca columns",
    "empty dataset",
    "malformed json",
    "malformed tatqa",
    "max_length too short",
    "model missing",
    "fa2 without flash-attn",
    "qlora + zero3",
    "missing deepspeed json",
    "invalid deepspeed json",
    "unknown recipe",
    "batch not divisible",
    pytest.param(
        "fp16 on cpu",
        marks=pytest.mark.skipif(_cuda(), reason="fp16 is a valid precision on a CUDA machine"),
    ),
    "bad override",
    "binary data file",
    "non-utf8 data file",
    "jsonl error line",
    "int instruction",
    "null chat content",
    "unknown chat role",
    "string tatqa paragraphs",
    "tatqa answer type",
    "duplicate recipe key",
    "nan learning rate",
    "inf epochs",
    "non-utf8 recipe",
    "output_dir is a file",
    "output_dir under a file",
    "truncated weights",
    "missing weight shard",
]


@pytest.mark.parametrize("case", CASES)
def test_train_bad_inputs(env, capsys, case):
    argv, message = _train_cases(env)[case]
    _expect_exit2(capsys, "hpml_ft.train", argv, message)
    assert not env["out"].exists(), "a failed start must not create the output directory"
    assert env["file"].read_text() == "keep me\n", "a failed start must not touch existing files"


def test_world_size_not_dividing_effective_batch(env, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    _expect_exit2(
        capsys,
        "hpml_ft.train",
        [*env["base"], "train.per_device_batch_size=2", "train.effective_batch_size=8"],
        "2 x 3",
    )


def test_bitsandbytes_unusable(env, capsys, monkeypatch):
    monkeypatch.setitem(
        sys.modules, "bitsandbytes", None
    )  # import now raises ImportError, as on unsupported hosts
    _expect_exit2(capsys, "hpml_ft.train", [*env["base"], "peft.method=qlora"], "need a working bitsandbytes")


def test_finished_run_is_refused(env, capsys, tmp_path):
    run = env["out"] / "c"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    _expect_exit2(capsys, "hpml_ft.train", env["base"], "holds a finished run; pass train.overwrite=true")
    assert json.loads((run / "run.json").read_text()) == {}


def test_merge_adapter_for_other_base(env, capsys, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["tiny"])
    get_peft_model(model, LoraConfig(r=4, target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    other = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=400,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    other.save_pretrained(tmp_path / "other")
    _expect_exit2(
        capsys,
        "hpml_ft.merge",
        [
            "--adapter",
            str(tmp_path / "adapter"),
            "--out",
            str(tmp_path / "m"),
            "--base",
            str(tmp_path / "other"),
        ],
        "tensor shapes differ",
        one_line=False,  # only loading the base can tell; its progress bar comes first
    )
    assert not (tmp_path / "m").exists()


def test_merge_incomplete_adapter(capsys, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text("{}")
    _expect_exit2(
        capsys,
        "hpml_ft.merge",
        ["--adapter", str(tmp_path / "a"), "--out", str(tmp_path / "m")],
        "no weight files; it is incomplete",
    )
    _expect_exit2(
        capsys,
        "hpml_ft.merge",
        ["--adapter", str(tmp_path / "none"), "--out", str(tmp_path / "m")],
        "adapter directory not found",
    )


def test_bench_bad_inputs(capsys):
    _expect_exit2(capsys, "hpml_ft.bench", ["train", "--methods", "lora,qqlora"], "unknown ['qqlora']")
    _expect_exit2(capsys, "hpml_ft.bench", ["train", "--steps", "0"], "--steps must be positive")


def test_process_level_exit_code_and_no_traceback(tmp_path):
    """The same path end to end in a real process: exit code 2, a single stderr line."""
    res = subprocess.run(
        [sys.executable, "-m", "hpml_ft.train", str(tmp_path / "missing.yaml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: recipe not found: {tmp_path / 'missing.yaml'} (pass a path like recipes/lora_alpaca.yaml)"
    ]


def test_infer_sid_out_of_range(capsys, tiny_model_dir):
    data = Path(__file__).parent / "fixtures" / "infer_tatqa.json"
    last = _expect_exit2(
        capsys,
        "hpml_ft.infer",
        ["--model_name_or_path", str(tiny_model_dir), "--data", str(data), "--sid", "99"],
        "out of range",
    )
    assert "valid: 0-" in last


def test_infer_unfinished_run(capsys, tmp_path):
    (tmp_path / "run" / "merged").mkdir(parents=True)
    (tmp_path / "run" / "merged" / "config.json").write_text("{}")
    _expect_exit2(
        capsys,
        "hpml_ft.infer",
        ["--model_name_or_path", str(tmp_path / "run" / "merged"), "--prompt", "hi"],
        "no weight files",
    )


# ---------------------------------------------------------------- every CLI: argparse, nan/inf, outputs, weights

CLIS = [
    "train",
    "merge",
    "consolidate",
    "infer",
    "eval",
    "eval.judge",
    "eval.ifeval",
    "serve",
    "plan",
    "bench",
]


@pytest.mark.parametrize("cli", CLIS)
def test_argparse_errors_are_one_line(capsys, cli):
    """Bad options (here: unknown, and required ones missing) are one `error:` line, not a usage dump."""
    last = _expect_exit2(capsys, f"hpml_ft.{cli}", ["--no-such-option"], f"python -m hpml_ft.{cli}")
    assert last.endswith(f"; see python -m hpml_ft.{cli} --help") and "usage:" not in last


@pytest.mark.parametrize(
    "cli, argv, message",
    [
        ("infer", ["--prompt", "hi", "--temperature", "nan"], "--temperature: 'nan' is not a finite number"),
        ("infer", ["--prompt", "hi", "--top-p", "inf"], "--top-p: 'inf' is not a finite number"),
        (
            "eval.judge",
            ["--predictions", "p.jsonl", "--judge-timeout", "nan"],
            "'nan' is not a finite number",
        ),
        ("plan", ["recipes/lora_alpaca.yaml", "--gpu-mem-gib", "inf"], "'inf' is not a finite number"),
        ("merge", ["--adapter", "a"], "the following arguments are required: --out"),
        ("infer", ["--sid", "x"], "argument --sid: invalid int value: 'x'"),
    ],
)
def test_nan_inf_and_types_refused_on_the_command_line(capsys, cli, argv, message):
    _expect_exit2(capsys, f"hpml_ft.{cli}", argv, message)


@pytest.mark.parametrize("under", [False, True])
@pytest.mark.parametrize("cli", ["merge", "consolidate", "eval"])
def test_output_that_is_a_file_is_refused_first(capsys, tmp_path, alpaca_file, cli, under):
    """--out naming a file (or a path below one) fails before any input is read; the file is untouched."""
    afile = tmp_path / "a_file"
    afile.write_text("keep me\n")
    out = str(afile / "x" if under else afile)
    argv = {
        "merge": ["--adapter", str(tmp_path / "no_adapter"), "--out", out],
        "consolidate": [str(tmp_path / "no_ckpt"), "--out", out],
        "eval": ["--models", "embedded", "--data", str(alpaca_file), "--out", out],
    }[cli]
    message = f"cannot be created: {afile} is a file" if under else "is a file, not a directory"
    _expect_exit2(capsys, f"hpml_ft.{cli}", argv, message)
    assert afile.read_text() == "keep me\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "alpaca.json"]


@pytest.mark.parametrize("cli", ["infer", "merge", "eval"])
def test_truncated_weights_refused_before_loading(capsys, tmp_path, broken_models, alpaca_file, cli):
    corrupt = str(broken_models["corrupt"])
    argv = {
        "infer": ["--model", corrupt, "--prompt", "hi"],
        "merge": ["--adapter", str(tmp_path / "a"), "--base", corrupt, "--out", str(tmp_path / "m")],
        "eval": ["--models", corrupt, "--data", str(alpaca_file), "--out", str(tmp_path / "ev")],
    }[cli]
    if cli == "merge":  # a complete adapter whose base is the truncated model
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": corrupt}))
        (tmp_path / "a" / "adapter_model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    last = _expect_exit2(capsys, f"hpml_ft.{cli}", argv, "corrupt or truncated weight file")
    assert f"{corrupt}/model.safetensors" in last and "re-download" in last
    assert not (tmp_path / "m").exists() and not (tmp_path / "ev").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ("num_processes: [\n", "not a valid accelerate config (YAML error at line 2, column"),
        ("num_processes: four\n", "num_processes must be a positive integer, got 'four'"),
        ("- a\n- b\n", "an accelerate config is a YAML mapping, not list"),
        (None, "not found; fix the recipe's accelerate_config or pass --gpus N"),
    ],
)
def test_plan_malformed_accelerate_config(capsys, tmp_path, tiny_model_dir, text, message):
    acc = tmp_path / "acc.yaml"
    if text is not None:
        acc.write_text(text)
    recipe = _write(
        tmp_path, "p.yaml", f"name: p\naccelerate_config: {acc}\nmodel:\n  name_or_path: {tiny_model_dir}\n"
    )
    _expect_exit2(capsys, "hpml_ft.plan", [recipe, "train.max_steps=1"], message)


def test_plan_deepspeed_config_with_wrong_types(capsys, tmp_path):
    ds = _write(tmp_path, "ds.json", json.dumps({"zero_optimization": {"stage": "three"}}))
    _expect_exit2(
        capsys,
        "hpml_ft.plan",
        ["recipes/fft_embedded.yaml", f"train.deepspeed={ds}", "--gpus", "1"],
        "zero_optimization has wrong types",
    )


def test_ifeval_non_utf8_file(capsys, tmp_path):
    bad = _bytes(tmp_path, "d.jsonl", b'{"key": 1, "prompt": "caf\xe9"}\n')
    _expect_exit2(
        capsys, "hpml_ft.eval.ifeval", ["--responses", bad, "--data", bad], "d.jsonl: not UTF-8 text (line 1"
    )


def _one_stderr_line(argv: list[str]) -> str:
    res = subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_process_usage_error_is_one_line():
    """A real process: argparse's usage dump is replaced by one line."""
    line = _one_stderr_line(["hpml_ft.infer", "--temperature", "nan"])
    assert "'nan' is not a finite number; see python -m hpml_ft.infer --help" in line


def test_process_no_library_noise_before_the_error(tmp_path, tiny_model_dir):
    """merge imports torch/peft (torchao, bitsandbytes and torch print notices at import) before it fails:
    the error line must still be the only stderr line."""
    line = _one_stderr_line(["hpml_ft.merge", "--adapter", str(tiny_model_dir), "--out", str(tmp_path / "m")])
    assert "is not a PEFT adapter" in line
    assert not (tmp_path / "m").exists()
