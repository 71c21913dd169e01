"""What a user watches while a run trains: speed and memory at every log, loss.png, samples.jsonl, trackers.

Only the main process writes files. Speed/memory keys are added to the logs every tracker receives
(the callback runs before the tracker callbacks) and to `trainer.state.log_history`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from hpml_ft.generation import generate
from hpml_ft.system.measure import rss_mib

if TYPE_CHECKING:
    from trl import SFTConfig, SFTTrainer

    from hpml_ft.config import Config


class SpeedMemoryCallback(TrainerCallback):
    """Adds step_time_s, tokens_per_s, rss_mib (and cuda_peak_mib) to every training log."""

    def __init__(self) -> None:
        self._t = time.perf_counter()
        self._step = 0
        self._tokens = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._t, self._step, self._tokens = (
            time.perf_counter(),
            state.global_step,
            state.num_input_tokens_seen,
        )

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        if logs is None or "loss" not in logs:  # eval and end-of-train summaries: no step timing
            return
        import torch

        now, steps = time.perf_counter(), state.global_step - self._step
        extra: dict[str, float] = {"rss_mib": round(rss_mib(), 1)}
        if steps > 0:
            secs = now - self._t
            extra["step_time_s"] = round(secs / steps, 3)
            extra["tokens_per_s"] = round((state.num_input_tokens_seen - self._tokens) / max(secs, 1e-9), 1)
        if torch.cuda.is_available():
            extra["cuda_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
        self._t, self._step, self._tokens = now, state.global_step, state.num_input_tokens_seen


def write_loss_plot(log_history: list[dict], path: Path) -> bool:
    """Train and eval loss against the step, as a PNG; False (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[hpml_ft] loss.png skipped: pip install matplotlib", file=sys.stderr)
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-")):
        pts = [(h["step"], h[key]) for h in log_history if key in h and "step" in h]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=key.replace("loss", " loss").strip())
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True


class LossPlotCallback(TrainerCallback):
    """Rewrites loss.png after every evaluation and at the end of training (main process only)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / "loss.png"

    def on_evaluate(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.is_world_process_zero:
            write_loss_plot(state.log_history, self.path)

    on_train_end = on_evaluate


class SampleCallback(TrainerCallback):
    """Every `train.sample_every` steps: greedy answers to a few fixed eval prompts -> samples.jsonl + trackers."""

    def __init__(self, cfg: Config, tok: Any, samples: list[dict], run_dir: Path) -> None:
        self.every, self.cfg, self.tok = cfg.train.sample_every, cfg, tok
        self.samples = samples[: cfg.train.sample_prompts]
        self.path = run_dir / "samples.jsonl"
        self.trainer: SFTTrainer | None = None

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if not self.every or state.global_step % self.every or not state.is_world_process_zero:
            return
        prompts = [s["messages"][:-1] for s in self.samples]
        preds, _ = generate(model, self.tok, prompts, self.cfg.train.max_new_tokens, batch_size=len(prompts))
        rows = [
            {
                "step": state.global_step,
                "prompt": s["messages"][-2]["content"][-300:],
                "gold": s["messages"][-1]["content"],
                "answer": p,
            }
            for s, p in zip(self.samples, preds, strict=True)
        ]
        with self.path.open("a") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        send_samples(self.trainer, rows, state.global_step)


def send_samples(trainer: SFTTrainer | None, rows: list[dict], step: int) -> None:
    """Samples to whichever trackers are running: a wandb table, TensorBoard text, trackio table."""
    if trainer is None:
        return
    text = "\n\n".join(f"**{r['prompt']}**\n\ngold: {r['gold']}\n\nanswer: {r['answer']}" for r in rows)
    for cb in trainer.callback_handler.callbacks:
        name = type(cb).__name__
        if name == "TensorBoardCallback" and getattr(cb, "tb_writer", None) is not None:
            cb.tb_writer.add_text("samples", text, step)
            cb.tb_writer.flush()
        elif name == "WandbCallback" and getattr(cb, "_wandb", None) is not None and cb._wandb.run:
            cols = ["step", "prompt", "gold", "answer"]
            table = cb._wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])
            cb._wandb.log({"samples": table}, commit=False)
        elif name == "TrackioCallback":
            import trackio

            cols = ["step", "prompt", "gold", "answer"]
            trackio.log({"samples": trackio.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})


def setup_tracking(cfg: Config, args: SFTConfig, run_dir: Path) -> None:
    """Tracker files inside the run dir; wandb offline unless asked otherwise (never a login prompt)."""
    backends = set(cfg.tracking.report_to) - {"none"}
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(run_dir / "logs")  # TensorBoard event files, in this run
    if "wandb" in backends:
        os.environ.setdefault("WANDB_MODE", cfg.tracking.wandb_mode)  # an exported WANDB_MODE wins
        os.environ.setdefault("WANDB_PROJECT", cfg.tracking.project)
        os.environ["WANDB_DIR"] = str(run_dir)  # offline-run-* inside this run
        os.environ.setdefault("WANDB_SILENT", "true")
    if "trackio" in backends:
        os.environ.setdefault("TRACKIO_PROJECT", cfg.tracking.project)
        args.project = cfg.tracking.project  # transformers' TrackioCallback reads args.project


def tracking_notes(cfg: Config, run_dir: Path) -> list[str]:
    """What to run after training to look at the tracked run."""
    notes = []
    backends = set(cfg.tracking.report_to)
    if "wandb" in backends and os.environ.get("WANDB_MODE") == "offline":
        notes.append(f"wandb (offline): upload with  wandb sync {run_dir / 'wandb'}/offline-run-*")
    if "tensorboard" in backends:
        notes.append(f"tensorboard: tensorboard --logdir {run_dir / 'logs'}")
    if "trackio" in backends:
        notes.append(f"trackio: trackio show --project {cfg.tracking.project}")
    return notes


def add_callbacks(trainer: SFTTrainer, cfg: Config, tok: Any, samples: list[dict], run_dir: Path) -> None:
    """Speed/memory first (trackers must see its keys), then loss.png and samples."""
    trainer.callback_handler.callbacks.insert(0, SpeedMemoryCallback())
    trainer.add_callback(LossPlotCallback(run_dir))
    if cfg.train.sample_every and samples:
        sampler = SampleCallback(cfg, tok, samples, run_dir)
        sampler.trainer = trainer
        trainer.add_callback(sampler)


class ProfileCallback(TrainerCallback):
    """`train --profile`: torch.profiler over steps 2-4 (1 wait, 1 warm-up, 3 recorded), CPU+CUDA, memory.

    Writes profile/trace.json (Chrome trace: open in https://ui.perfetto.dev), profile/top_ops.txt (the 15
    operators with the most self time) and profile/top_memory_ops.txt (the 15 operators and input shapes that
    allocate the most).
    """

    def __init__(self, run_dir: Path, wait: int = 1, warmup: int = 1, active: int = 3) -> None:
        self.dir = run_dir / "profile"
        self.sched = (wait, warmup, active)
        self.prof: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import torch
        from torch.profiler import ProfilerActivity, profile, schedule

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        wait, warmup, active = self.sched
        self.prof = profile(
            activities=acts,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=self._export,
            profile_memory=True,
            record_shapes=True,
        )
        self.prof.__enter__()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.prof is not None:
            self.prof.step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)  # fewer steps than the schedule: exports what it has
            self.prof = None

    def _export(self, prof: Any) -> None:
        if int(os.environ.get("RANK", "0")) != 0:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.dir / "trace.json"))
        sort = (
            "self_cuda_time_total"
            if any(e.device_type.name == "CUDA" for e in prof.key_averages())
            else "self_cpu_time_total"
        )
        ops = prof.key_averages(group_by_input_shape=True)
        table = prof.key_averages().table(sort_by=sort, row_limit=15)
        (self.dir / "top_ops.txt").write_text(table + "\n")
        mem = "self_cuda_memory_usage" if sort.startswith("self_cuda") else "self_cpu_memory_usage"
        # the memory view: which operators (and input shapes) allocate the most, to find where a peak comes from
        (self.dir / "top_memory_ops.txt").write_text(ops.table(sort_by=mem, row_limit=15) + "\n")
        print(
            f"[hpml_ft] profile: {self.dir / 'trace.json'} (open in https://ui.perfetto.dev), {self.dir / 'top_ops.txt'}"
        )
