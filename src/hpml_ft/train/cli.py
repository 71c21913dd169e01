"""`python -m hpml_ft.train RECIPE [section.key=value ...] [--dry-run]`: recipe -> TRL SFTTrainer run (GRPOTrainer
for train.stage=grpo).

Order matters: everything that can be checked without a model (config, files, data, tokenizer, output dir) is
checked first, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from hpml_ft.config import ADAPTER_METHODS, Config, grad_accum_steps, load_config
from hpml_ft.data import build_train_eval, load_splits
from hpml_ft.errors import ArgumentParser, fail
from hpml_ft.lora import lora_config
from hpml_ft.model import attn_implementation, check_bitsandbytes, load_tokenizer, torch_dtype
from hpml_ft.outputs import (
    check_not_input,
    check_output_target,
    lock_run,
    promote_run,
    recover_replaced,
    release_run_locks,
    run_state,
    staging_run_dir,
)
from hpml_ft.runs import base_model_path
from hpml_ft.system.allocator import pin_mmap_threshold
from hpml_ft.system.threads import apply_cpu_threads
from hpml_ft.train.report import print_dry_run
from hpml_ft.train.rewards import reward_functions


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.train", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/lora_alpaca.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.learning_rate=1e-4 peft.r=8")
    p.add_argument(
        "--dry-run", action="store_true", help="print the resolved config and derived numbers; no training"
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="torch.profiler over a few steps: profile/trace.json (Perfetto) + profile/top_ops.txt in the run dir",
    )
    return p.parse_args(argv)


def check_environment(cfg: Config) -> None:
    """Checks that need no model: precision, attention, optional packages, DeepSpeed JSON, tracking backends,
    and the TRL/PEFT settings themselves (SFTConfig / LoraConfig are built once here, without a model)."""
    from hpml_ft.train.trainer import check_hub_push, precision_flags  # imports torch

    precision_flags(cfg)  # fp16/bf16 asked for on a machine that cannot run it
    check_hub_push(cfg)  # push_to_hub offline or without a usable token
    # FlashAttention-2 asked for without flash-attn/CUDA
    attn_implementation(cfg.model, torch_dtype(cfg.model))
    if cfg.quantized_4bit or cfg.model.load_in_8bit or cfg.train.optimizer != "adamw_torch":
        check_bitsandbytes()
    if cfg.train.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
        fail(
            "train.use_liger_kernel=true needs the liger-kernel package (and a CUDA GPU): pip install liger-kernel"
        )
    if cfg.train.deepspeed:
        check_deepspeed(Path(cfg.train.deepspeed))
    for backend in cfg.tracking.report_to:
        if backend != "none" and importlib.util.find_spec(backend) is None:
            fail(f"tracking.report_to lists {backend} but it is not installed: pip install {backend}")
    check_trl_peft_values(cfg)
    if cfg.train.stage == "grpo":
        reward_functions(cfg.grpo.rewards)  # unknown names, user modules that do not import: one line, now


def check_deepspeed(ds: Path) -> None:
    if not ds.is_file():
        fail(f"DeepSpeed config not found: {ds} (use one of deepspeed/*.json)")
    try:
        json.loads(ds.read_text())
    except json.JSONDecodeError as err:
        fail(f"{ds}: invalid JSON at line {err.lineno}: {err.msg}; fix the DeepSpeed config")
    if importlib.util.find_spec("deepspeed") is None:
        fail("train.deepspeed is set but DeepSpeed is not installed: pip install deepspeed")
    single_process_dist_env()


def check_trl_peft_values(cfg: Config) -> None:
    """The names in train.sft_extra / peft.extra were checked at load; their values are checked here, by the
    dataclasses themselves, before any model loads (no-op for recipes that use neither)."""
    from hpml_ft.train.trainer import sft_config  # imports transformers

    p = cfg.peft
    if p.method in ADAPTER_METHODS and (p.extra or p.modules_to_save or p.init_lora_weights is not True):
        lora_config(p)
    if cfg.train.sft_extra and not cfg.train.deepspeed:  # with DeepSpeed it would register its config twice
        sft_config(cfg, 1)


def single_process_dist_env() -> None:
    """Plain `python -m hpml_ft.train` with DeepSpeed: give it the one-process rendezvous a launcher would."""
    if "RANK" in os.environ or "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "1",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def _last_checkpoint(run_dir: Path) -> str | None:
    """The newest complete checkpoint. The Trainer writes trainer_state.json last, so a kill during a save leaves
    a newer checkpoint dir whose state is missing or cut short: skip it (resuming it would crash)."""
    ckpts = run_dir / "checkpoints"
    found = ckpts.glob("checkpoint-*") if ckpts.is_dir() else []
    steps = sorted((int(p.name.rpartition("-")[2]), p) for p in found if p.name.rpartition("-")[2].isdigit())
    for step, path in reversed(steps):
        try:
            json.loads((path / "trainer_state.json").read_text(encoding="utf-8"))
            return str(path)
        except (OSError, ValueError):
            print(f"[hpml_ft] skipping {path}: incomplete (killed while saving step {step})", file=sys.stderr)
    return None


def prepare_run_dir(cfg: Config) -> tuple[Path, str | None]:
    """Lock the run name, check what the run dir holds, and decide where to train and what to resume.

    Returns (dir to train in, checkpoint to resume from). A finished or resumable run is never deleted up
    front: `train.overwrite=true` trains in a staging dir beside it and swaps only when the new run has
    finished (kill -9 at any point leaves the old run loadable). A dir from a start that died before its
    first checkpoint holds nothing worth keeping and does not block a rerun.
    """
    run_dir, resume = cfg.run_dir, cfg.train.resume
    rank0 = int(os.environ.get("RANK", "0")) == 0
    if rank0:  # one writer per run name (other ranks belong to the same launch)
        lock_run(run_dir.parent, run_dir.name)
        recover_replaced(run_dir)
    if resume and resume != "auto":
        if not Path(resume).is_dir():
            fail(
                f"train.resume={resume} is not a checkpoint directory; use train.resume=auto or a checkpoint-N path"
            )
        return run_dir, resume
    state = run_state(run_dir)
    if cfg.train.overwrite and state in ("finished", "unfinished"):
        staged = staging_run_dir(run_dir)
        last = _last_checkpoint(staged) if resume == "auto" else None
        if rank0 and not last and staged.parent.exists():
            shutil.rmtree(staged.parent)  # our own leftover from an earlier, interrupted overwrite
        print(f"[hpml_ft] overwrite: training in {staged}; {run_dir} is kept until the new run finishes")
        return staged, last
    if resume == "auto":
        last = _last_checkpoint(run_dir)
        print(
            f"[hpml_ft] resume=auto: {'resuming from ' + last if last else 'no checkpoint found, starting fresh'}"
        )
        return run_dir, last
    if state == "failed_start" and rank0:
        shutil.rmtree(run_dir)  # only files a start writes before its first checkpoint
    elif state == "other" and rank0:
        fail(f"{run_dir} exists and holds files that are not an hpml_ft run; pick another train.run_name")
    elif state in ("finished", "unfinished") and rank0:
        what = "a finished run" if state == "finished" else "an unfinished run with checkpoints"
        fail(
            f"{run_dir} holds {what}; pass train.overwrite=true to replace it or train.resume=auto to continue"
        )
    return run_dir, None


def check_run_inputs(cfg: Config, model_path: str) -> None:
    """The run dir is written into and, with train.overwrite, replaced: it must not be, hold or lie inside
    what the run reads (its base model or the run that base comes from, its data, another run's checkpoint)."""
    resume = cfg.train.resume
    own = resume in (None, "auto") or Path(resume).resolve().is_relative_to(cfg.run_dir.resolve())
    inputs = [cfg.model.name_or_path, model_path, cfg.data.path, cfg.data.eval_path, cfg.train.deepspeed]
    check_not_input(cfg.run_dir, [*inputs, None if own else resume], "the run directory")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    accum = grad_accum_steps(cfg)
    check_environment(cfg)
    check_output_target(cfg.train.output_dir, "train.output_dir")  # a file or read-only dir: fail now
    splits = load_splits(cfg.data)
    model_path = base_model_path(cfg.model.name_or_path)  # a finished run dir: its merged/ model
    check_run_inputs(cfg, model_path)
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    if cfg.train.stage == "grpo":
        from hpml_ft.train.grpo import prompt_dataset  # the prompts, gold answers as reward columns

        train_ds, eval_ds = prompt_dataset(cfg, tok, splits), None
    else:
        train_ds, eval_ds = build_train_eval(cfg, tok, splits)
    if args.dry_run:
        print_dry_run(cfg, model_path, train_ds, accum)
        return 0
    from hpml_ft.train.runner import run_training  # the run itself: loads torch/transformers/trl

    apply_cpu_threads(cfg.train.cpu_threads)  # every core this process owns, also under accelerate launch
    if cfg.train.release_host_memory:
        pin_mmap_threshold()  # freed tensors go back to the OS: RSS = live memory (system/allocator.py)
    try:
        run_dir, resume = prepare_run_dir(cfg)
        code = run_training(
            cfg, model_path, tok, splits, train_ds, eval_ds, accum, resume, run_dir, profile=args.profile
        )
        if code == 0 and run_dir != cfg.run_dir and int(os.environ.get("RANK", "0")) == 0:
            promote_run(run_dir, cfg.run_dir)  # the new run is complete: only now does it replace the old one
            print(f"[hpml_ft] replaced {cfg.run_dir} with the new run")
        return code
    finally:
        release_run_locks()

