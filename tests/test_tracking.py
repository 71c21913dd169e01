"""What a user watches while training: tracker files without network or prompt, loss.png, samples.jsonl,
speed/memory in every log, and the `--profile` trace."""

from __future__ import annotations

import importlib.util
import json

import pytest

from hpml_ft.train import main as train_main


def _train(tiny_model_dir, alpaca_file, tmp_path, *extra: str, profile: bool = False):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\n")
    args = [
        str(recipe),
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={alpaca_file}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=6",
        "train.per_device_batch_size=2",
        "train.effective_batch_size=2",
        "train.logging_steps=1",
        "train.eval_steps=3",
        "train.sample_every=3",
        "train.sample_prompts=2",
        "train.eval_generate=0",
        "train.max_new_tokens=4",
        "train.max_length=128",
        "train.merge=false",
        "data.max_samples=12",
        "data.eval_fraction=0.25",
        *extra,
    ]
    assert train_main(args + (["--profile"] if profile else [])) == 0
    return tmp_path / "out" / "t"


def test_run_writes_loss_plot_samples_and_speed(tiny_model_dir, alpaca_file, tmp_path):
    run = _train(tiny_model_dir, alpaca_file, tmp_path)
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 3, 6, 6]  # 2 fixed prompts at steps 3 and 6
    assert {r["prompt"] for r in rows[:2]} == {r["prompt"] for r in rows[2:]}
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 6


def test_speed_and_memory_in_every_training_log(tiny_model_dir, alpaca_file, tmp_path):
    from transformers import TrainerControl, TrainerState

    from hpml_ft.callbacks import SpeedMemoryCallback

    cb, state = SpeedMemoryCallback(), TrainerState()
    cb.on_train_begin(None, state, TrainerControl())
    state.global_step, state.num_input_tokens_seen = 2, 100
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": 2})
    cb.on_log(None, state, TrainerControl(), logs=logs)
    for key in ("step_time_s", "tokens_per_s", "rss_mib"):
        assert key in logs and key in state.log_history[-1], key
    assert logs["rss_mib"] > 10


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="pip install tensorboard")
def test_tensorboard_gets_scalars_and_samples(tiny_model_dir, alpaca_file, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tiny_model_dir, alpaca_file, tmp_path, "tracking.report_to=[tensorboard]")
    events = list((run / "logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"tensors": 0, "scalars": 0})
    acc.Reload()
    assert {"train/loss", "train/tokens_per_s", "train/rss_mib"} <= set(acc.Tags()["scalars"])
    assert "samples/text_summary" in acc.Tags()["tensors"]


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="pip install wandb")
def test_wandb_runs_offline_without_account(tiny_model_dir, alpaca_file, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # conftest disables wandb; the recipe default must do it
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc login
    monkeypatch.setattr("sys.stdin", None)  # a prompt would fail
    run = _train(tiny_model_dir, alpaca_file, tmp_path, "tracking.report_to=[wandb]")
    assert list((run / "wandb").glob("offline-run-*"))
    assert "wandb sync" in capsys.readouterr().out


def test_profile_writes_trace_and_top_ops(tiny_model_dir, alpaca_file, tmp_path):
    run = _train(tiny_model_dir, alpaca_file, tmp_path, "train.sample_every=0", profile=True)
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert "aten::" in (run / "profile" / "top_ops.txt").read_text()
    mem = (run / "profile" / "top_memory_ops.txt").read_text()
    assert "CPU Mem" in mem and "aten::" in mem and "[[" in mem  # sorted by memory, with input shapes
