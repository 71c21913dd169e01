"""Interrupted runs resume exactly; same seed gives the same curve; trained models stop at EOS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hpml_ft.train import main as train_main


def _args(tiny, data, out, steps, extra=()):
    # constant LR and 4 samples at batch 4: every step sees the same data, so runs are comparable step by step
    return [
        "--",
        f"model.name_or_path={tiny}",
        f"data.path={data}",
        f"train.output_dir={out}",
        "name=r",
        f"train.max_steps={steps}",
        "train.per_device_batch_size=4",
        "train.effective_batch_size=4",
        "train.learning_rate=5e-3",
        "train.lr_scheduler=constant",
        "train.warmup_ratio=0",
        "train.logging_steps=1",
        "data.max_samples=4",
        "train.eval_generate=0",
        "train.max_length=96",
        "peft.method=lora",
        *extra,
    ][1:]


def _recipe(tmp_path: Path) -> Path:
    p = tmp_path / "recipe.yaml"
    p.write_text("name: r\n")
    return p


def _spawn(recipe: Path, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "hpml_ft.train", str(recipe), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(tmp_path, out_name, args_extra, tiny, data, steps):
    recipe = _recipe(tmp_path)
    assert train_main([str(recipe), *_args(tiny, data, tmp_path / out_name, steps, args_extra)]) == 0
    run = tmp_path / out_name / "r"
    return json.loads((run / "metrics.json").read_text()), load_file(
        run / "adapter" / "adapter_model.safetensors"
    )


def _assert_same(m_a, w_a, m_b, w_b):
    assert m_b["global_step"] == m_a["global_step"]
    assert m_b["final_loss"] == pytest.approx(m_a["final_loss"], abs=1e-3)
    for k in w_a:
        assert torch.allclose(w_a[k], w_b[k], atol=1e-4), k


def _complete(ckpt: Path) -> bool:
    """trainer_state.json is written last and may be caught half-written: complete when it parses."""
    try:
        return bool(json.loads((ckpt / "trainer_state.json").read_text()))
    except (OSError, ValueError):
        return False


def test_resume_skips_a_checkpoint_killed_while_saving(tmp_path, capsys):
    from hpml_ft.train.cli import _last_checkpoint

    ckpts = tmp_path / "checkpoints"
    for step, state in ((4, '{"global_step": 4}'), (8, '{"global_step": 8}'), (12, ""), (10, None)):
        (ckpts / f"checkpoint-{step}").mkdir(parents=True)
        if state is not None:
            (ckpts / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert _last_checkpoint(tmp_path) == str(ckpts / "checkpoint-8")  # 12: empty state, 10: none
    assert "checkpoint-12: incomplete" in capsys.readouterr().err


@pytest.mark.slow
def test_kill9_then_resume_matches_uninterrupted(tiny_model_dir, alpaca_file, tmp_path):
    steps = 24
    m_ref, w_ref = _finish(tmp_path, "ref", ["train.save_steps=4"], tiny_model_dir, alpaca_file, steps)
    proc = _spawn(
        _recipe(tmp_path), _args(tiny_model_dir, alpaca_file, tmp_path / "cut", steps, ["train.save_steps=4"])
    )
    ckpt = tmp_path / "cut" / "r" / "checkpoints" / "checkpoint-8"
    deadline = time.time() + 120
    while not _complete(ckpt) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "cut" / "r" / "run.json").exists(), "run finished before it could be killed"
    m_cut, w_cut = _finish(
        tmp_path, "cut", ["train.save_steps=4", "train.resume=auto"], tiny_model_dir, alpaca_file, steps
    )
    _assert_same(m_ref, w_ref, m_cut, w_cut)
    # same weights alone would also come from a restart (same seed, same data): prove it resumed
    assert Path(m_cut["resumed_from"]).name == "checkpoint-8"
    assert m_cut["steps_run"] == steps - 8 and m_ref["steps_run"] == steps


@pytest.mark.slow
def test_ctrl_c_saves_checkpoint_and_says_how_to_resume(tiny_model_dir, alpaca_file, tmp_path):
    steps = 40
    proc = _spawn(_recipe(tmp_path), _args(tiny_model_dir, alpaca_file, tmp_path / "out", steps))
    lines = []
    for line in proc.stdout:  # wait until training has logged a few steps
        lines.append(line)
        if line.count("'loss'") and len([x for x in lines if "'loss'" in x]) >= 3:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, rest[-2000:]
    assert "train.resume=auto" in rest
    run = tmp_path / "out" / "r"
    ckpts = list((run / "checkpoints").glob("checkpoint-*"))
    assert len(ckpts) == 1 and not (run / "run.json").exists()
    stopped_at = int(ckpts[0].name.split("-")[1])
    assert 3 <= stopped_at < steps
    m, _ = _finish(tmp_path, "out", ["train.resume=auto"], tiny_model_dir, alpaca_file, steps)
    assert m["global_step"] == steps
    assert Path(m["resumed_from"]).name == f"checkpoint-{stopped_at}"
    assert m["steps_run"] == steps - stopped_at


def test_same_seed_same_loss_curve(tiny_model_dir, alpaca_file, tmp_path):
    m_a, w_a = _finish(
        tmp_path, "a", ["data.max_samples=12", "train.effective_batch_size=4"], tiny_model_dir, alpaca_file, 4
    )
    m_b, w_b = _finish(
        tmp_path, "b", ["data.max_samples=12", "train.effective_batch_size=4"], tiny_model_dir, alpaca_file, 4
    )
    assert m_a["loss_curve"] == m_b["loss_curve"] and len(m_a["loss_curve"]) == 4
    assert all(torch.equal(w_a[k], w_b[k]) for k in w_a)


def test_trained_model_stops_at_eos(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpml_ft.generation import generate

    data = tmp_path / "ok.json"
    data.write_text(
        json.dumps([{"instruction": f"Say ok {i}", "input": "", "output": "ok"} for i in range(8)])
    )
    recipe = _recipe(tmp_path)
    args = _args(
        tiny_model_dir,
        data,
        tmp_path / "out",
        30,
        [
            "train.learning_rate=3e-3",
            "data.max_samples=8",
            "train.effective_batch_size=8",
            "train.per_device_batch_size=8",
            "peft.method=full",
        ],
    )
    assert train_main([str(recipe), *args]) == 0
    merged = tmp_path / "out" / "r" / "merged"
    model, tok = AutoModelForCausalLM.from_pretrained(merged), AutoTokenizer.from_pretrained(merged)
    texts, speed = generate(model, tok, [[{"role": "user", "content": "Say ok 3"}]], max_new_tokens=30)
    assert texts == ["ok"]
    assert speed["new_tokens"] < 30  # stopped by EOS, not by the token budget
