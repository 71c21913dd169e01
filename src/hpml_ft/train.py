"""`python -m hpml_ft.train RECIPE [section.key=value ...] [--dry-run]`: recipe -> TRL SFTTrainer run.

Order matters: everything that can be checked without a model (config, files, data, tokenizer, output dir) is
checked first, so a typo costs seconds, not a model load.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from hpml_ft.config import Config, grad_accum_steps, load_config
from hpml_ft.errors import ArgumentParser, fail, run_cli

if TYPE_CHECKING:
    from trl import SFTConfig

OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}


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


def precision_flags(cfg: Config) -> dict[str, bool]:
    import torch

    want = cfg.train.precision
    if want == "auto":
        cuda = torch.cuda.is_available()
        want = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp16" if cuda else "fp32"
    if want in ("bf16", "fp16") and not torch.cuda.is_available():
        fail(f"train.precision={want} needs a CUDA GPU; use train.precision=auto (fp32 on CPU)")
    return {"bf16": want == "bf16", "fp16": want == "fp16", "use_cpu": not torch.cuda.is_available()}


def sft_config(cfg: Config, accum: int, run_dir: Path | None = None) -> SFTConfig:
    """TRL SFTConfig from the recipe. Data is pre-tokenized with assistant masks (see data.py)."""
    from trl import SFTConfig

    t = cfg.train
    return SFTConfig(
        output_dir=str((run_dir or cfg.run_dir) / "checkpoints"),
        run_name=cfg.run_name,
        per_device_train_batch_size=t.per_device_batch_size,
        per_device_eval_batch_size=t.per_device_batch_size,
        gradient_accumulation_steps=accum,
        learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio,  # a float < 1 is a ratio of total steps
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        num_train_epochs=t.num_epochs or 1,
        max_steps=t.max_steps or -1,
        optim=OPTIMIZERS[t.optimizer],
        activation_checkpointing=t.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if t.gradient_checkpointing else None,
        max_length=t.max_length,
        packing=t.packing,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no",
        save_steps=t.save_steps or 500,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        deepspeed=t.deepspeed,
        report_to=[r for r in cfg.tracking.report_to if r != "none"] or "none",
        include_num_input_tokens_seen=True,
        dataset_kwargs={"skip_prepare_dataset": False},
        **precision_flags(cfg),
    )


def check_environment(cfg: Config) -> None:
    """Checks that need no model: precision, attention, optional packages, DeepSpeed JSON, tracking backends."""
    import importlib.util
    import json

    from hpml_ft.model import attn_implementation, check_bitsandbytes, torch_dtype

    precision_flags(cfg)  # fp16/bf16 asked for on a machine that cannot run it
    attn_implementation(
        cfg.model, torch_dtype(cfg.model)
    )  # FlashAttention-2 asked for without flash-attn/CUDA
    if cfg.quantized_4bit or cfg.model.load_in_8bit or cfg.train.optimizer != "adamw_torch":
        check_bitsandbytes()
    if cfg.train.deepspeed:
        ds = Path(cfg.train.deepspeed)
        if not ds.is_file():
            fail(f"DeepSpeed config not found: {ds} (use one of deepspeed/*.json)")
        try:
            json.loads(ds.read_text())
        except json.JSONDecodeError as err:
            fail(f"{ds}: invalid JSON at line {err.lineno}: {err.msg}; fix the DeepSpeed config")
        if importlib.util.find_spec("deepspeed") is None:
            fail("train.deepspeed is set but DeepSpeed is not installed: pip install deepspeed")
        single_process_dist_env()
    for backend in cfg.tracking.report_to:
        if backend != "none" and importlib.util.find_spec(backend) is None:
            fail(f"tracking.report_to lists {backend} but it is not installed: pip install {backend}")


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
    from transformers.trainer_utils import get_last_checkpoint

    ckpts = run_dir / "checkpoints"
    return get_last_checkpoint(str(ckpts)) if ckpts.is_dir() else None


def prepare_run_dir(cfg: Config) -> tuple[Path, str | None]:
    """Lock the run name, check what the run dir holds, and decide where to train and what to resume.

    Returns (dir to train in, checkpoint to resume from). A finished or resumable run is never deleted up
    front: `train.overwrite=true` trains in a staging dir beside it and swaps only when the new run has
    finished (kill -9 at any point leaves the old run loadable). A dir from a start that died before its
    first checkpoint holds nothing worth keeping and does not block a rerun.
    """
    from hpml_ft.outputs import lock_run, recover_replaced, run_state, staging_run_dir

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
        fail(f"{run_dir} holds {what}; pass train.overwrite=true to replace it or train.resume=auto to continue")
    return run_dir, None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.recipe, args.overrides)
    accum = grad_accum_steps(cfg)
    check_environment(cfg)
    from hpml_ft.outputs import check_output_target

    check_output_target(cfg.train.output_dir, "train.output_dir")  # a file or read-only dir: fail now
    from hpml_ft.data import build_train_eval, load_splits
    from hpml_ft.model import load_tokenizer, resolve_model_path

    splits = load_splits(cfg.data)
    model_path = resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(model_path, cfg.model.trust_remote_code)
    train_ds, eval_ds = build_train_eval(cfg, tok, splits)
    if args.dry_run:
        from hpml_ft.report import print_dry_run

        print_dry_run(cfg, model_path, train_ds, accum)
        return 0
    from hpml_ft.outputs import promote_run, release_run_locks
    from hpml_ft.runner import run_training
    from hpml_ft.threads import apply_cpu_threads

    apply_cpu_threads(cfg.train.cpu_threads)  # every core this process owns, also under accelerate launch

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


if __name__ == "__main__":
    run_cli(main)
