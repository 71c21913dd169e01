"""One training run, top to bottom: setup -> before-eval -> train -> after-eval -> save.

train.py has checked everything that needs no model and picked the run dir (a staging dir while overwriting);
this module loads the model, builds the trainer (trainer.py), trains, and writes the artifacts and records
atomically (outputs.py): run.json, written last, is what marks the run finished.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import ADAPTER_METHODS, Config, dump_config, world_size
from hpml_ft.generation import generate
from hpml_ft.lora import convert_saved_adapter, save_initial_adapter
from hpml_ft.merge import merge_adapter, set_generation_eos
from hpml_ft.model import build_model, count_parameters, wrap_peft
from hpml_ft.outputs import RUN_RECORD, finalize_dir, staged, versions, write_json_atomic, write_text_atomic
from hpml_ft.quant.qat import attach_distillation, convert_run, prepare_qat, rounded_once, strip_fake_quant
from hpml_ft.scoring import score_samples
from hpml_ft.system.measure import peak_memory
from hpml_ft.train.callbacks import (
    ProfileCallback,
    add_callbacks,
    setup_tracking,
    tracking_notes,
    write_loss_plot,
)
from hpml_ft.train.grpo import build_grpo_trainer, drop_reference_adapter, grpo_config, reward_metrics
from hpml_ft.train.report import model_card
from hpml_ft.train.trainer import InterruptCallback, build_trainer, sft_config

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import GRPOTrainer, SFTTrainer

    from hpml_ft.data import Splits


@dataclass
class Run:
    """What setup builds and the later stages read."""

    cfg: Config
    base_path: str
    tok: PreTrainedTokenizerBase
    splits: Splits
    trainer: SFTTrainer | GRPOTrainer
    run_dir: Path
    accum: int
    resume: str | None
    single: bool  # one process: generation (samples, quick eval) runs
    init_adapter: Path | None = None  # PiSSA/OLoRA start, to convert the saved adapter
    metrics: dict[str, Any] = field(default_factory=dict)


def run_training(
    cfg: Config,
    base_path: str,
    tok: PreTrainedTokenizerBase,
    splits: Splits,
    train_ds: Dataset,
    eval_ds: Dataset | None,
    accum: int,
    resume: str | None,
    run_dir: Path | None = None,
    profile: bool = False,
) -> int:
    """Train in `run_dir` (default: cfg.run_dir). 0 when finished, 130 when Ctrl-C stopped it at a checkpoint."""
    run = setup(
        cfg, base_path, tok, splits, train_ds, eval_ds, accum, resume, run_dir or cfg.run_dir, profile
    )
    # Under DeepSpeed, evaluate() before train() leaves an eval-only engine that breaks backward: skip it there.
    if resume is None and not cfg.train.deepspeed:
        run.metrics["before"] = evaluate_run(run)
    if not train(run):
        return 130
    run.metrics["after"] = evaluate_run(run)
    save(run)
    return 0


def setup(
    cfg: Config,
    base_path: str,
    tok: PreTrainedTokenizerBase,
    splits: Splits,
    train_ds: Dataset,
    eval_ds: Dataset | None,
    accum: int,
    resume: str | None,
    run_dir: Path,
    profile: bool,
) -> Run:
    """Model (+ QAT, + adapter), SFTTrainer (GRPOTrainer for train.stage=grpo), callbacks; the recipe is saved
    in the run dir first."""
    from transformers import set_seed

    set_seed(cfg.train.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", dump_config(cfg))
    # Training arguments first: with ZeRO-3 they register the DeepSpeed config, so the model below is
    # partitioned while it loads instead of materialising in full on every rank.
    grpo = cfg.train.stage == "grpo"
    args = grpo_config(cfg, accum, run_dir) if grpo else sft_config(cfg, accum, run_dir)
    model, teacher = prepare_qat(build_model(cfg, base_path), cfg)  # no-op without quant.bits/qat
    model = wrap_peft(model, cfg, cfg.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    print(f"[hpml_ft] {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters")
    setup_tracking(cfg, args, run_dir)  # tracker files in the run dir; wandb offline, never a prompt
    if grpo:  # prompts with their gold columns; no eval loss (the quick eval scores held-out answers)
        trainer = build_grpo_trainer(cfg, model, tok, train_ds, args)
    else:
        trainer = build_trainer(cfg, model, tok, train_ds, eval_ds, accum, args)
    single = world_size() == 1 and not cfg.train.deepspeed
    add_callbacks(trainer, cfg, tok, splits.eval if single else [], run_dir)
    if profile:
        trainer.add_callback(ProfileCallback(run_dir))
    attach_distillation(trainer, teacher, cfg)  # quant.distill: CE + KL to the full-precision teacher
    init = save_initial_adapter(trainer.model, cfg, run_dir, trainer.accelerator.is_main_process)
    run = Run(cfg, base_path, tok, splits, trainer, run_dir, accum, resume, single, init)
    run.metrics.update({"trainable_params": trainable, "total_params": total})
    return run


def evaluate_run(run: Run) -> dict[str, Any]:
    """Held-out loss, and (one process) greedy answers scored as eval would."""
    eval_loss = (
        round(run.trainer.evaluate()["eval_loss"], 4) if run.trainer.eval_dataset is not None else None
    )
    if not run.single:
        return {"eval_loss": eval_loss}
    return {
        "eval_loss": eval_loss,
        **quick_eval(run.trainer.model, run.tok, run.splits.eval, run.cfg, run.splits.format),
    }


def quick_eval(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, samples: list[dict], cfg: Config, fmt: str
) -> dict[str, Any]:
    """Greedy answers to the first `train.eval_generate` held-out samples, scored by exact match."""
    samples = samples[: cfg.train.eval_generate]
    if not samples:
        return {}
    t = cfg.train
    prompts = [s["messages"][:-1] for s in samples]
    batch = t.generate_batch_size or 2 * t.per_device_batch_size
    with rounded_once(model):  # QAT: round the weights once, not at every generated token
        preds, speed = generate(model, tok, prompts, t.max_new_tokens, batch_size=batch)
    _, metrics = score_samples(samples, preds, fmt)  # TAT-QA: derivations computed by the executor first
    scores = {k: metrics[k] for k in ("exact_match", "f1", "executor") if k in metrics}
    examples = [
        {"prompt": s["meta"].get("question", "")[:200], "gold": s["messages"][-1]["content"], "pred": p}
        for s, p in list(zip(samples, preds, strict=True))[:3]
    ]
    return {
        **scores,
        "n": len(samples),
        "tokens_per_s": round(speed["tokens_per_s"], 1),
        "examples": examples,
    }


def train(run: Run) -> bool:
    """trainer.train (from the checkpoint when resuming); False when Ctrl-C stopped it at a saved checkpoint."""
    start = time.perf_counter()
    result = run.trainer.train(resume_from_checkpoint=run.resume)
    callbacks = run.trainer.callback_handler.callbacks
    if any(isinstance(c, InterruptCallback) and c.requested for c in callbacks):
        print(
            f"[hpml_ft] stopped at step {run.trainer.state.global_step}; checkpoint saved under "
            f"{run.run_dir}/checkpoints. Resume with: python -m hpml_ft.train <recipe> ... train.resume=auto",
            file=sys.stderr,
        )
        return False
    run.metrics.update(train_metrics(run, result.training_loss, time.perf_counter() - start))
    return True


def train_metrics(run: Run, train_loss: float, seconds: float) -> dict[str, Any]:
    state, resume = run.trainer.state, run.resume
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    if not all(math.isfinite(x) for x in losses):
        print(
            "[hpml_ft] warning: non-finite loss during training; lower train.learning_rate", file=sys.stderr
        )
    return {
        "train_runtime_s": round(seconds, 1),
        "global_step": state.global_step,
        "train_loss": round(train_loss, 4),
        "first_loss": losses[0] if losses else None,
        "final_loss": losses[-1] if losses else None,
        "loss_curve": losses,
        "tokens_seen": state.num_input_tokens_seen,
        "effective_batch_size": run.cfg.train.effective_batch_size,
        "grad_accum": run.accum,
        "processes": world_size(),
        # what this process did: a resume must start at its checkpoint, not at step 0
        "resumed_from": resume,
        "steps_run": state.global_step - (int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0),
        **reward_metrics(state.log_history),  # GRPO: mean reward per log step, per reward function
    }


def save(run: Run) -> None:
    """Adapter / merged / low-bit model, then metrics.json, README.md and run.json (main process writes)."""
    trainer, cfg, run_dir = run.trainer, run.cfg, run.run_dir
    run.metrics.update(peak_memory())
    main = trainer.accelerator.is_main_process
    if main:
        write_loss_plot(trainer.state.log_history, run_dir / "loss.png")  # now with the final eval loss
        for note in tracking_notes(cfg, run_dir):
            print(f"[hpml_ft] {note}")
    record = {
        "recipe": cfg.model_dump(mode="json"),
        "base_model": cfg.model.name_or_path,
        "metrics": run.metrics,
    }
    strip_fake_quant(trainer.model)  # quant: save the trained full-precision weights ...
    drop_reference_adapter(trainer.model)  # GRPO with beta > 0: TRL's copy of the starting LoRA
    artifacts = save_artifacts(trainer, cfg, run.tok, run.base_path, record, run.init_adapter)
    if not main:
        return
    artifacts.update(convert_run(run_dir, cfg, record))  # ... then merged/ as the real low-bit model
    write_json_atomic(run_dir / "metrics.json", run.metrics)
    write_text_atomic(run_dir / "README.md", model_card(cfg, run.metrics, artifacts))
    finished = {"status": "finished", "artifacts": artifacts, "format": run.splits.format}
    extra = {"base_path": run.base_path, "versions": versions(), **record}
    write_json_atomic(run_dir / RUN_RECORD, {**finished, **extra})
    print(f"[hpml_ft] done: {run_dir} (merged model: {run_dir / 'merged'})")


def save_artifacts(
    trainer: SFTTrainer | GRPOTrainer,
    cfg: Config,
    tok: PreTrainedTokenizerBase,
    base_path: str,
    record: dict[str, Any],
    init_adapter: Path | None = None,
) -> dict[str, str]:
    """Adapter (PEFT methods) and a merged standalone model, each written to a temp dir then renamed."""
    run_dir = Path(trainer.args.output_dir).parent  # the run dir (a staging dir while overwriting)
    peft = cfg.peft.method in ADAPTER_METHODS
    name = "adapter" if peft else "merged"
    staging, main = run_dir / f".{name}.tmp", trainer.accelerator.is_main_process
    if main:  # the run dir is locked by this process: a staging dir found here is a dead process's
        shutil.rmtree(staging, ignore_errors=True)
    with staged(staging, run_dir / name):  # an error, SIGTERM or full disk leaves no half-written model
        trainer.save_model(str(staging))  # every rank calls this: DeepSpeed gathers shards here
        if not main:
            return {}
        convert_saved_adapter(trainer.model, staging, init_adapter)  # PiSSA/OLoRA -> plain LoRA on the base
        tok.save_pretrained(staging)
        if not peft:
            set_generation_eos(staging, tok)
        finalize_dir(staging, run_dir / name, record)
    artifacts = {name: name}
    if peft and cfg.train.merge:
        merge_adapter(
            run_dir / "adapter",
            run_dir / "merged",
            base_path=base_path,
            dtype=cfg.model.dtype,
            record=record,
            trust_remote_code=cfg.model.trust_remote_code,  # the recipe's own setting, as train loaded the base
        )
        artifacts["merged"] = "merged"
    return artifacts
