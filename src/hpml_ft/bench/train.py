"""`bench train`: the real training path (recipe data -> hpml_ft.data -> TRL SFTTrainer as runner.py builds it),
one configuration per process, optimizer steps timed by a callback after warm-up."""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from hpml_ft.bench.report import write_profile
from hpml_ft.config import TRAIN_METHODS, grad_accum_steps, load_config
from hpml_ft.data import build_train_eval, load_splits, token_stats
from hpml_ft.model import build_model, count_parameters, load_tokenizer, wrap_peft
from hpml_ft.runs import base_model_path
from hpml_ft.system.allocator import pin_mmap_threshold
from hpml_ft.system.measure import WorkerError, peak_memory, reset_device_peak, run_json_worker

METHODS = TRAIN_METHODS
COLUMNS = [
    "config",
    "method",
    "checkpointing",
    "packing",
    "liger",
    "step_s",
    "tokens_per_s",
    "padding_frac",
    "peak_mib",
    "trainable_params",
    "final_loss",
    "status",
]


def liger_installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def plan_configs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every method with the other axes at their first value, then each other value varied alone on the
    first method (one factor at a time); --grid crosses all axes."""
    axes = {
        "method": args.methods,
        "checkpointing": args.checkpointing,
        "packing": args.packing,
        "liger": args.liger,
    }
    if args.grid:
        combos = [dict(zip(axes, values, strict=True)) for values in itertools.product(*axes.values())]
    else:
        base = {k: v[0] for k, v in axes.items()}
        combos = [{**base, "method": m} for m in args.methods]
        combos += [{**base, k: v} for k in ("checkpointing", "packing", "liger") for v in axes[k][1:]]
    for c in combos:
        c["config"] = c["method"] + "".join(
            f"+{'free' if c[k] == 'free' else k[:4]}" for k in ("checkpointing", "packing", "liger") if c[k]
        )
    return combos


def overrides_for(args: argparse.Namespace, c: dict[str, Any], run_root: str) -> list[str]:
    return [
        *args.overrides,
        f"peft.method={c['method']}",
        f"train.gradient_checkpointing={c['checkpointing']}",
        f"train.packing={c['packing'] is True}",
        f"train.padding_free={c['packing'] == 'free'}",
        f"train.max_steps={args.warmup + args.steps}",
        "train.num_epochs=null",
        *([f"train.per_device_batch_size={args.batch}"] if args.batch else []),
        "train.logging_steps=1",
        "train.eval_steps=null",
        "train.save_steps=null",
        "train.eval_generate=0",
        "tracking.report_to=[none]",
        f"train.output_dir={run_root}",
        "train.run_name=bench",
    ]


def _batch_counter(collate: Any, stats: list[dict[str, int]]) -> Any:
    """Wrap the trainer's collator: per batch, slots (tensor size), real tokens and loss tokens."""

    def wrapped(features: list[dict]) -> dict:
        batch = collate(features)
        # unpadded samples / packed rows: the real tokens whatever layout the collator makes of them
        real = sum(len(f["input_ids"]) for f in features)
        stats.append(
            {
                "slots": int(batch["input_ids"].numel()),
                "tokens": real,
                "loss_tokens": int((batch["labels"] != -100).sum()),
            }
        )
        return batch

    return wrapped


class StepTimer(TrainerCallback):
    """Wall time of each optimizer step (CUDA synchronised); profiles the timed steps when asked."""

    def __init__(self, warmup: int, profile_dir: Path | None, name: str) -> None:
        self.warmup, self.times, self._t0 = warmup, [], 0.0
        self.profile_dir, self.name, self.prof = profile_dir, name, None

    def _sync(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.warmup and self.profile_dir is not None and self.prof is None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.prof = profile(activities=acts, profile_memory=True)
            self.prof.__enter__()
        self._sync()
        self._t0 = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            write_profile(self.prof, self.profile_dir, self.name)


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this process: the toolkit's data and trainer, a few optimizer steps."""
    from hpml_ft.train.runner import build_trainer
    from hpml_ft.train.trainer import sft_config

    cfg = load_config(job["recipe"], job["overrides"])
    if cfg.train.release_host_memory:
        pin_mmap_threshold()  # as train does: peak RSS is what the configuration keeps live
    accum = grad_accum_steps(cfg)
    path = base_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(path, cfg.model.trust_remote_code)
    train_ds, _ = build_train_eval(cfg, tok, load_splits(cfg.data))
    args = sft_config(cfg, accum)
    args.use_liger_kernel = job["liger"]
    if cfg.train.packing:  # packed rows hold max_length tokens: keep about the padded run's samples per step
        mean = token_stats(train_ds, cfg.train.max_length)["mean_tokens"]
        args.per_device_train_batch_size = max(
            1, round(args.per_device_train_batch_size * mean / cfg.train.max_length)
        )
    model = wrap_peft(build_model(cfg, path), cfg, cfg.train.gradient_checkpointing)
    trainable, _total = count_parameters(model)
    trainer = build_trainer(cfg, model, tok, train_ds, None, accum, args)
    stats: list[dict[str, int]] = []
    trainer.data_collator = _batch_counter(trainer.data_collator, stats)
    profile_dir = Path(job["profile_dir"]) if job.get("profile_dir") else None
    timer = StepTimer(job["warmup"], profile_dir, job["config"])
    trainer.add_callback(timer)
    reset_device_peak()
    trainer.train()
    timed = timer.times[job["warmup"] :]
    per_step = accum  # collator calls per optimizer step
    done = stats[job["warmup"] * per_step : len(timer.times) * per_step]
    tokens, slots = sum(s["tokens"] for s in done), sum(s["slots"] for s in done)
    step_tokens = [
        sum(s["tokens"] for s in done[i * per_step : (i + 1) * per_step]) for i in range(len(timed))
    ]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    mem = peak_memory()
    return {
        "step_s": round(statistics.median(timed), 3),
        # median of each step's rate: one slow step (a new padded shape, a host hiccup) does not decide a row
        "tokens_per_s": round(statistics.median(n / t for n, t in zip(step_tokens, timed, strict=True)), 1),
        "tokens_per_s_overall": round(tokens / sum(timed), 1),
        "padding_frac": round(1 - tokens / max(slots, 1), 3),
        "tokens_per_step": round(tokens / max(len(timed), 1)),
        "loss_tokens_per_step": round(sum(s["loss_tokens"] for s in done) / max(len(timed), 1)),
        "peak_mib": mem.get("gpu_peak_allocated_mib", mem["cpu_peak_rss_mib"]),
        "peak_kind": "gpu allocator" if "gpu_peak_allocated_mib" in mem else "process RSS",
        "rows_per_step": args.per_device_train_batch_size * accum,
        "trainable_params": trainable,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "step_times": [round(t, 3) for t in timed],
    }


def run_one(args: argparse.Namespace, c: dict[str, Any], out: Path) -> dict[str, Any]:
    """A configuration in its own process, so its peak memory is its own."""
    if c["liger"] and not liger_installed():
        return {**c, "status": "skipped: liger-kernel not installed (pip install liger-kernel)"}
    with tempfile.TemporaryDirectory(prefix="hpml_bench_") as tmp:
        job = {
            **c,
            "recipe": args.recipe,
            "overrides": overrides_for(args, c, tmp),
            "warmup": args.warmup,
            "profile_dir": str(out) if args.profile else None,
        }
        try:
            result = run_json_worker(["hpml_ft.bench", "_train_worker"], job, f"bench train {c}")
        except WorkerError as err:
            print(err.stderr[-4000:], file=sys.stderr)
            return {**c, "status": f"error: {err.last_line}"}
    return {**c, **result, "status": "ok"}


def run(args: argparse.Namespace, out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    rows = []
    for c in plan_configs(args):
        print(f"[bench] train {c['config']} ...", file=sys.stderr)
        rows.append(run_one(args, c, out))
        shown = {k: rows[-1].get(k) for k in ("step_s", "tokens_per_s", "peak_mib", "final_loss", "status")}
        print(f"[bench] train {c['config']}: {shown}", file=sys.stderr)
    notes = [
        f"{args.steps} timed optimizer steps (median step time) after {args.warmup} warm-up step(s); "
        "tokens/s = median over the timed steps of the step's non-padding tokens / its time (results.json also "
        "has tokens_per_s_overall: all tokens / all time); peak memory is the GPU allocator peak, else the "
        "process peak RSS.",
        "packing True = TRL bfd packing (position ids restart per sample; no attention across samples): one "
        "flattened row for FlashAttention's varlen kernel, else one row per pack (hpml_ft.train.packing) with causal "
        "attention per sample on CPU; a packed run uses batch x mean sample length / max_length rows per step, "
        "about the padded run's samples. free = train.padding_free: each batch's own samples packed into rows "
        "the same way (same samples per step as the padded run).",
    ]
    return rows, notes
