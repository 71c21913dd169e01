"""hpml_ft.infer on the tiny random model: sample display, TAT-QA context, compare, JSON, adapters, flags."""

from __future__ import annotations

import io
import json
import logging as std_logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hpml_ft.errors import run_cli
from hpml_ft.infer import main

FIXTURE = Path(__file__).parent / "fixtures" / "infer_tatqa.json"
FAST = ["--max-new-tokens", "4"]


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """No run under ./outputs unless a test makes one; restore the transformers logging main() quiets."""
    monkeypatch.chdir(tmp_path)
    yield
    from transformers.utils import logging

    logging.set_verbosity_warning()
    logging.enable_progress_bar()
    std_logging.getLogger("bitsandbytes").setLevel(std_logging.NOTSET)


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    return exc.value.code


@pytest.fixture()
def finished_run(tiny_model_dir, tmp_path) -> Path:
    """outputs/run_a as training leaves it: merged model, recipe (TAT-QA fixture, half held out), run.json."""
    from hpml_ft.config import dump_config, load_config

    run = tmp_path / "outputs" / "run_a"
    shutil.copytree(tiny_model_dir, run / "merged")
    cfg = load_config(None, [f"data.path={FIXTURE}", "data.eval_fraction=0.5", "train.max_steps=1"])
    (run / "recipe.yaml").write_text(dump_config(cfg))
    (run / "run.json").write_text(
        json.dumps(
            {
                "status": "finished",
                "artifacts": {"merged": "merged"},
                "format": "tatqa",
                "base_path": str(tiny_model_dir),
            }
        )
    )
    return run


def test_help_is_fast_and_imports_no_torch():
    code = (
        "import runpy, sys\nsys.argv = ['infer', '--help']\ntry:\n    runpy.run_module('hpml_ft.infer', "
        "run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "--compare" in out.stdout and "--prompt-lookup" in out.stdout


def test_sid_prints_question_gold_model_and_speed(tiny_model_dir, capsys):
    assert main(["--sid", "0", "2", "--model_name_or_path", str(tiny_model_dir), *FAST]) == 0
    out = capsys.readouterr().out
    for part in ("=== sample 0", "=== sample 2", "Question:", "Gold answer:", "Model answer:", "tokens/s"):
        assert part in out
    # each answer line carries a verdict column; "correct" alone would also match "incorrect"
    verdicts = re.findall(rf"{re.escape(str(tiny_model_dir))}\s+(incorrect|correct)\s", out)
    assert len(verdicts) == 2, out


def test_tatqa_sample_shows_table_and_paragraphs(tiny_model_dir, capsys):
    argv = ["--sid", "1", "--data", str(FIXTURE), "--model_name_or_path", str(tiny_model_dir), *FAST]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "What was the change in total revenue from 2030 to 2031?" in out
    assert "Context:" in out and "| Bread sales | 1,240 | 1,105 |" in out
    assert "| Pastry sales | 860 |  |" in out  # an empty cell keeps its column
    assert "Paragraphs:" in out and "[2] The pastry line was launched" in out
    assert "Gold answer:\n  310 thousand" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sid", "3"], "valid: 0-2"),
        (["--sid", "0", "-1"], "--sid -1 is out of range"),
        (["--sid", "0", "--prompt", "hi"], "pick one of --sid, --prompt and --chat"),
    ],
)
def test_bad_requests_exit_2_with_one_line(tiny_model_dir, capsys, extra, message):
    assert exit_code(["--data", str(FIXTURE), "--model_name_or_path", str(tiny_model_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_unfinished_run_is_refused(tmp_path, capsys):
    (tmp_path / "outputs" / "crashed" / "checkpoints").mkdir(parents=True)
    (tmp_path / "outputs" / "crashed" / "recipe.yaml").write_text("name: crashed\n")
    assert exit_code(["--model_name_or_path", "outputs/crashed"]) == 2
    assert "did not finish" in capsys.readouterr().err


def test_latest_run_is_the_default_and_compare_lists_every_model(finished_run, tiny_model_dir, capsys):
    assert main(["--sid", "0", *FAST]) == 0
    out = capsys.readouterr().out
    assert "eval split of outputs/run_a" in out and "outputs/run_a  " in out and "Context:" in out
    assert main(["--sid", "0", "--compare", f"base,outputs/run_a,{tiny_model_dir}", *FAST]) == 0
    out = capsys.readouterr().out
    assert "Model answers:" in out
    for label in ("base", "outputs/run_a", str(tiny_model_dir)):
        assert f"\n  {label} " in out and f"  {label}: " in out  # an answer row and a speed row each


def test_json_output_parses(finished_run, tiny_model_dir, capsys):
    assert main(["--sid", "0", "1", "--compare", "base,outputs/run_a", "--json", *FAST]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    recs = [json.loads(line) for line in lines]
    assert [r["sid"] for r in recs] == [0, 1]
    assert recs[0]["format"] == "tatqa" and recs[0]["context"]["table"][0] == ["", "2031", "2030"]
    assert [a["model"] for a in recs[0]["answers"]] == ["base", "outputs/run_a"]
    assert all(isinstance(a["correct"], bool) and a["tokens_per_s"] >= 0 for a in recs[0]["answers"])


def test_adapter_is_applied_without_merging(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    lora = get_peft_model(
        base,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj"],
            init_lora_weights=False,
            task_type="CAUSAL_LM",
        ),
    )
    lora.save_pretrained(tmp_path / "adapter")
    assert main(["--adapter", str(tmp_path / "adapter"), "--prompt", "hello", "--json", *FAST]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["answers"][0]["adapter"] == str(tmp_path / "adapter")
    assert rec["answers"][0]["path"] == str(tiny_model_dir)  # the base recorded in adapter_config.json
    base_copy = shutil.copytree(tiny_model_dir, tmp_path / "base_copy")
    argv = ["--model_name_or_path", str(base_copy), "--adapter", str(tmp_path / "adapter"), "--prompt", "hi"]
    assert main([*argv, "--json", *FAST]) == 0
    assert json.loads(capsys.readouterr().out)["answers"][0]["path"] == str(base_copy)  # explicit base wins


def test_recipe_picks_the_eval_split_answered(tiny_model_dir, tmp_path, capsys):
    """--recipe: --sid indexes that recipe's eval split (its data file, fraction and seed), not the default data;
    with --data the recipe's split settings are applied to that file instead."""
    from hpml_ft.config import dump_config, load_config
    from hpml_ft.data import load_splits

    cfg = load_config(
        None, [f"data.path={FIXTURE}", "data.eval_fraction=0.5", "data.seed=5", "train.max_steps=1"]
    )
    recipe = tmp_path / "r.yaml"
    recipe.write_text(dump_config(cfg))
    want = load_splits(cfg.data).eval
    argv = ["--model", str(tiny_model_dir), "--recipe", str(recipe), "--json", *FAST]
    assert main([*argv, "--sid", "0", str(len(want) - 1)]) == 0
    recs = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [r["id"] for r in recs] == [want[0]["id"], want[-1]["id"]] and recs[0]["format"] == "tatqa"
    assert exit_code([*argv, "--sid", str(len(want))]) == 2  # the split, not the whole file, is indexed
    assert f"has {len(want)} samples" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags",
    [
        ["--no-cache"],
        ["--prompt-lookup", "2", "--batch-size", "4"],
        ["--temperature", "0.8", "--top-p", "0.9", "--system-prompt", "You are a pirate. Answer like one."],
    ],
)
def test_generation_flags_run(tiny_model_dir, capsys, flags):
    argv = ["--model_name_or_path", str(tiny_model_dir), "--prompt", "Say hi", "--prompt", "Count", *flags]
    assert main([*argv, *FAST]) == 0
    out = capsys.readouterr().out
    assert "=== prompt 0 ===" in out and "=== prompt 1 ===" in out and "tokens/s" in out


def test_chat_streams_and_quits(tiny_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello\n/reset\nagain\n/exit\n"))
    assert main(["--chat", "--model_name_or_path", str(tiny_model_dir), *FAST]) == 0
    out = capsys.readouterr().out
    assert out.count("bot> ") == 2 and "/reset clears" in out
