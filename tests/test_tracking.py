"""What a user watches while training: tracker files without network or prompt, loss.png, samples.jsonl,
speed/memory in every log, and the `--profile` trace."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import json
import sys
import types

import pytest

from hpml_ft.config import load_config
from hpml_ft.train import main as train_main


def _train(
    tiny_model_dir, alpaca_file, tmp_path, *extra: str, profile: bool = False, recipe_text="name: t\n"
):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(recipe_text)
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
    return tmp_path / "out" / load_config(recipe, args[1:]).run_name  # the recipe's name


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

    from hpml_ft.train.callbacks import SpeedMemoryCallback

    cb, state = SpeedMemoryCallback(), TrainerState()
    cb.on_train_begin(None, state, TrainerControl())
    state.global_step, state.num_input_tokens_seen = 2, 100
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": 2})
    cb.on_log(None, state, TrainerControl(), logs=logs)
    for key in ("step_time_s", "tokens_per_s", "rss_mib"):
        assert key in logs and key in state.log_history[-1], key
    assert logs["rss_mib"] > 10


def test_tokens_per_s_is_the_batches_tokens_over_the_step_time(tiny_model_dir, alpaca_file, tmp_path):
    """Each training log's tokens_per_s is the tokens the model was fed since the previous log (what
    num_input_tokens_seen counts: input ids, padding not counted, docs/performance.md) over the time since then
    (step_time_s x steps), checked against the batches a forward hook saw and a clock of our own."""
    import time

    from transformers import TrainerCallback

    from hpml_ft.data import build_train_eval, load_splits
    from hpml_ft.model import build_model, load_tokenizer, wrap_peft
    from hpml_ft.train.callbacks import add_callbacks
    from hpml_ft.train.trainer import build_trainer

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("name: t\n")
    overrides = [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={alpaca_file}",
        f"train.output_dir={tmp_path / 'out'}",
        "train.max_steps=6",
        "train.per_device_batch_size=2",
        "train.effective_batch_size=4",  # 2 micro-batches per optimizer step
        "train.logging_steps=2",  # logs at steps 1 (logging_first_step), 2, 4, 6: 1 or 2 steps per log
        "train.max_length=128",
        "train.sample_every=0",
        "data.max_samples=16",
        "data.eval_fraction=0.1",
    ]
    cfg = load_config(recipe, overrides)
    tok = load_tokenizer(str(tiny_model_dir))
    train_ds, _ = build_train_eval(cfg, tok, load_splits(cfg.data))
    model = wrap_peft(build_model(cfg, str(tiny_model_dir)), cfg)
    fed: list[tuple[int, int]] = []  # (input ids, non-padding) of each training forward since the last log

    def count(module, args, kwargs):
        if module.training:
            ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
            fed.append((ids.numel(), int(mask.sum()) if mask is not None else ids.numel()))

    model.register_forward_pre_hook(count, with_kwargs=True)
    seen: list[dict] = []  # per training log: the batches fed and our own clock

    class Clock(TrainerCallback):  # runs after SpeedMemoryCallback in the same on_log dispatch
        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            time.sleep(0.1)  # steps of >= 0.1 s: a timing bug is off by that much, far above the jitter

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                now = time.perf_counter()
                seen.append(
                    {"ids": sum(n for n, _ in fed), "real": sum(r for _, r in fed), "secs": now - self.t}
                )
                self.t = now
                fed.clear()

    trainer = build_trainer(cfg, model, tok, train_ds, None, accum=2)
    add_callbacks(trainer, cfg, tok, [], cfg.run_dir)
    trainer.add_callback(Clock())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [1, 2, 4, 6] and len(seen) == 4
    prev_step = prev_tokens = 0
    for h, mine in zip(logs, seen, strict=True):
        steps, tokens = h["step"] - prev_step, h["num_input_tokens_seen"] - prev_tokens
        assert tokens == mine["real"], (h, mine)  # real tokens fed, micro-batches of every step, no padding
        secs = h["step_time_s"] * steps
        # step_time_s is rounded to 1 ms: that bounds the ratio; our clock differs from its by jitter only
        ratio = pytest.approx(tokens / secs, rel=0.6e-3 * steps / secs, abs=0.1)
        assert h["tokens_per_s"] == ratio, (h, mine)
        assert secs == pytest.approx(mine["secs"], rel=0.1, abs=0.02), (h, mine)
        prev_step, prev_tokens = h["step"], h["num_input_tokens_seen"]
    assert sum(m["real"] for m in seen) < sum(m["ids"] for m in seen)  # padded: the count left it out


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


class FakeTrackio(types.ModuleType):
    """Stands in for the `trackio` package (not installed: it pulls in gradio-client, uvicorn, starlette): what
    transformers' TrackioCallback and our send_samples use of it, recording every init/log/finish call."""

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    class Config(dict):
        def update(self, values, allow_val_change=False):
            super().update(values)

    def __init__(self) -> None:
        super().__init__("trackio")
        self.__spec__ = importlib.machinery.ModuleSpec("trackio", None)  # find_spec("trackio") finds it
        self.__version__ = "0.43.0"
        self.calls: list[tuple[str, dict]] = []
        self.config = self.Config()
        nothing = types.SimpleNamespace(get=lambda: None)  # no Space, no hub run
        self.context_vars = types.SimpleNamespace(
            current_space_id=nothing, current_run=nothing, current_project=nothing
        )

    def init(self, **kwargs):
        self.calls.append(("init", kwargs))

    def log(self, metrics, step=None):
        self.calls.append(("log", dict(metrics)))

    def finish(self):
        self.calls.append(("finish", {}))


def test_trackio_gets_the_recipe_project_run_name_losses_and_samples(
    tiny_model_dir, alpaca_file, tmp_path, monkeypatch
):
    """tracking.report_to=[trackio]: transformers' TrackioCallback opens the run under the recipe's project and
    run name and receives every logged loss (with our speed keys); send_samples adds the samples table."""
    fake = FakeTrackio()
    monkeypatch.setitem(sys.modules, "trackio", fake)
    monkeypatch.setenv("TRACKIO_PROJECT", "")
    monkeypatch.delenv("TRACKIO_PROJECT")  # setup_tracking sets it; monkeypatch removes it again afterwards
    recipe = "name: trk-run\ntracking:\n  project: recipe-project\n  report_to: [trackio]\n"
    run = _train(tiny_model_dir, alpaca_file, tmp_path, recipe_text=recipe)
    metrics = json.loads((run / "metrics.json").read_text())
    inits = [kw for kind, kw in fake.calls if kind == "init"]
    assert fake.calls and fake.calls[0][0] == "init", fake.calls  # opened before anything is logged
    assert all(kw["project"] == "recipe-project" and kw["name"] == "trk-run" for kw in inits), inits
    logs = [(i, kw) for i, (kind, kw) in enumerate(fake.calls) if kind == "log"]
    train_logs = [m for _, m in logs if "train/loss" in m]
    assert [m["train/loss"] for m in train_logs] == metrics["loss_curve"]  # every logged loss, in order
    assert [m["train/global_step"] for m in train_logs] == list(range(1, 7))
    assert all(m["train/tokens_per_s"] > 0 and m["train/rss_mib"] > 0 for m in train_logs)  # our speed keys
    finished = [i for i, (kind, _) in enumerate(fake.calls) if kind == "finish"]
    assert finished and finished[0] > max(i for i, m in logs if "train/loss" in m)  # closed after training
    eval_losses = [m["eval/loss"] for _, m in logs if "eval/loss" in m]  # before, steps 3 and 6, after
    assert eval_losses[0] == pytest.approx(metrics["before"]["eval_loss"], abs=1e-4)
    assert eval_losses[-1] == pytest.approx(metrics["after"]["eval_loss"], abs=1e-4)
    tables = [m["samples"] for _, m in logs if "samples" in m]  # send_samples: a trackio.Table per sampling
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(tables) == 2 and all(t.columns == ["step", "prompt", "gold", "answer"] for t in tables)
    assert [row for t in tables for row in t.data] == [[r[c] for c in tables[0].columns] for r in rows]


def test_profile_writes_trace_and_top_ops(tiny_model_dir, alpaca_file, tmp_path):
    run = _train(tiny_model_dir, alpaca_file, tmp_path, "train.sample_every=0", profile=True)
    trace = json.loads((run / "profile" / "trace.json").read_text())
    assert trace["traceEvents"]
    assert "aten::" in (run / "profile" / "top_ops.txt").read_text()
    mem = (run / "profile" / "top_memory_ops.txt").read_text()
    assert "CPU Mem" in mem and "aten::" in mem and "[[" in mem  # sorted by memory, with input shapes
