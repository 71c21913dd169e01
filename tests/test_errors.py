"""The bad-input catalogue: every CLI answers bad input with exit code 2, one line naming problem and fix,
no traceback, and no output directory left behind."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from hpml_ft.errors import run_cli

GOOD = "name: c\ntrain:\n  max_steps: 1\n"


@pytest.fixture()
def env(tmp_path, tiny_model_dir, alpaca_file):
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
    return {"tmp": tmp_path, "base": base, "out": out, "tiny": tiny_model_dir, "data": alpaca_file}


def _write(tmp: Path, name: str, text: str) -> str:
    (tmp / name).write_text(text)
    return str(tmp / name)


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
            [*b, "model.attn_implementation=flash_attention_2"],
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
    }


def _expect_exit2(capsys, module: str, argv: list[str], message: str) -> str:
    main = importlib.import_module(module).main
    with pytest.raises(SystemExit) as ex:
        run_cli(main, argv)
    err = capsys.readouterr().err.strip()
    assert ex.value.code == 2, err
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
    "fp16 on cpu",
    "bad override",
]


@pytest.mark.parametrize("case", CASES)
def test_train_bad_inputs(env, capsys, case):
    argv, message = _train_cases(env)[case]
    _expect_exit2(capsys, "hpml_ft.train", argv, message)
    assert not env["out"].exists(), "a failed start must not create the output directory"


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
