"""The training run itself: model, SFTTrainer, before/after evaluation, atomic artifacts."""

from __future__ import annotations

import math
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from hpml_ft.config import Config, dump_config, world_size
from hpml_ft.outputs import RUN_RECORD, finalize_dir, versions, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTConfig, SFTTrainer

    from hpml_ft.data import Splits


class InterruptCallback(TrainerCallback):
    """First Ctrl-C: finish the current step, save a checkpoint, stop. A second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\n[hpml_ft] Ctrl-C: saving a checkpoint after this step (Ctrl-C again to abort)", file=sys.stderr
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True
        return control


def quick_eval(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, samples: list[dict], cfg: Config, fmt: str
) -> dict[str, Any]:
    """Greedy answers to the first `train.eval_generate` held-out samples, scored by exact match."""
    from hpml_ft.evaluate import score_answers
    from hpml_ft.generation import generate

    samples = samples[: cfg.train.eval_generate]
    if not samples:
        return {}
    preds, speed = generate(
        model,
        tok,
        [s["messages"][:-1] for s in samples],
        cfg.train.max_new_tokens,
        batch_size=cfg.train.per_device_batch_size * 2,
    )
    scores = score_answers(samples, preds, fmt)  # TAT-QA: derivations computed by tatqa_exec first
    if fmt == "tatqa":
        from hpml_ft.tatqa_exec import execute

        runs = [execute(p) for p in preds]
        scores["executor"] = {
            "executed": sum(r.executed for r in runs),
            "parse_failures": sum(r.failed for r in runs),
        }
    return {
        **scores,
        "n": len(samples),
        "tokens_per_s": round(speed["tokens_per_s"], 1),
        "examples": [
            {"prompt": s["meta"].get("question", "")[:200], "gold": s["messages"][-1]["content"], "pred": p}
            for s, p in list(zip(samples, preds, strict=True))[:3]
        ],
    }


def build_trainer(
    cfg: Config,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    train_ds: Dataset,
    eval_ds: Dataset | None,
    accum: int,
    args: SFTConfig | None = None,
) -> SFTTrainer:
    from trl import SFTTrainer

    from hpml_ft.train import sft_config

    args = args or sft_config(cfg, accum)
    return SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[InterruptCallback()],
    )


def peak_memory() -> dict[str, float]:
    import resource

    import torch

    out = {"cpu_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    if torch.cuda.is_available():
        out["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def save_artifacts(
    trainer: SFTTrainer, cfg: Config, tok: PreTrainedTokenizerBase, base_path: str, record: dict[str, Any]
) -> dict[str, str]:
    """Adapter (PEFT methods) and a merged standalone model, each written to a temp dir then renamed."""
    from hpml_ft.merge import merge_adapter, set_generation_eos

    run_dir = Path(trainer.args.output_dir).parent  # the run dir (a staging dir while overwriting)
    main_proc = trainer.accelerator.is_main_process
    peft = cfg.peft.method not in ("full", "none")
    name = "adapter" if peft else "merged"
    staging = run_dir / f".{name}.tmp"
    trainer.save_model(str(staging))  # every rank calls this: DeepSpeed gathers shards here
    if not main_proc:
        return {}
    tok.save_pretrained(staging)
    if not peft:
        set_generation_eos(staging, tok)
    finalize_dir(staging, run_dir / name, record)
    artifacts = {name: name}
    if peft and cfg.train.merge:
        merge_adapter(run_dir / "adapter", run_dir / "merged", base_path=base_path, record=record)
        artifacts["merged"] = "merged"
    return artifacts


def _eval_loss(trainer: SFTTrainer, eval_ds: Dataset | None) -> float | None:
    return round(trainer.evaluate()["eval_loss"], 4) if eval_ds is not None else None


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
    """Train in `run_dir` (default: cfg.run_dir; an overwrite trains in a staging dir, see train.py)."""
    from transformers import set_seed

    from hpml_ft.model import build_model, count_parameters, wrap_peft
    from hpml_ft.quant.qat import attach_distillation, convert_run, prepare_qat, strip_fake_quant
    from hpml_ft.report import model_card
    from hpml_ft.train import sft_config

    set_seed(cfg.train.seed)
    run_dir = run_dir or cfg.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "recipe.yaml", dump_config(cfg))
    # Training arguments first: with ZeRO-3 they register the DeepSpeed config, so the model below is
    # partitioned while it loads instead of materialising in full on every rank.
    args = sft_config(cfg, accum, run_dir)
    model, teacher = prepare_qat(build_model(cfg, base_path), cfg)  # no-op without quant.bits/qat
    model = wrap_peft(model, cfg, cfg.train.gradient_checkpointing)
    trainable, total = count_parameters(model)
    print(f"[hpml_ft] {cfg.peft.method}: {trainable:,} trainable of {total:,} parameters")
    from hpml_ft.callbacks import ProfileCallback, add_callbacks, setup_tracking

    setup_tracking(cfg, args, run_dir)  # tracker files in the run dir; wandb offline, never a prompt
    trainer = build_trainer(cfg, model, tok, train_ds, eval_ds, accum, args)
    single = world_size() == 1 and not cfg.train.deepspeed  # generation (samples, quick eval) on one process
    add_callbacks(trainer, cfg, tok, splits.eval if single else [], run_dir)
    if profile:
        trainer.add_callback(ProfileCallback(run_dir))
    attach_distillation(trainer, teacher, cfg)  # quant.distill: CE + KL to the full-precision teacher
    metrics: dict[str, Any] = {"trainable_params": trainable, "total_params": total}
    # Under DeepSpeed, evaluate() before train() leaves an eval-only engine that breaks backward: skip it there.
    if resume is None and not cfg.train.deepspeed:
        metrics["before"] = {
            "eval_loss": _eval_loss(trainer, eval_ds),
            **(quick_eval(trainer.model, tok, splits.eval, cfg, splits.format) if single else {}),
        }
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume)
    interrupted = any(
        isinstance(c, InterruptCallback) and c.requested for c in trainer.callback_handler.callbacks
    )
    if interrupted:
        print(
            f"[hpml_ft] stopped at step {trainer.state.global_step}; checkpoint saved under {run_dir}/checkpoints. "
            f"Resume with: python -m hpml_ft.train <recipe> ... train.resume=auto",
            file=sys.stderr,
        )
        return 130
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics.update(
        {
            "train_runtime_s": round(time.perf_counter() - start, 1),
            "global_step": trainer.state.global_step,
            "train_loss": round(result.training_loss, 4),
            "first_loss": losses[0] if losses else None,
            "final_loss": losses[-1] if losses else None,
            "loss_curve": losses,
            "tokens_seen": trainer.state.num_input_tokens_seen,
            "effective_batch_size": cfg.train.effective_batch_size,
            "grad_accum": accum,
            "processes": world_size(),
            # what this process did: a resume must start at its checkpoint, not at step 0
            "resumed_from": resume,
            "steps_run": trainer.state.global_step
            - (int(Path(resume).name.rsplit("-", 1)[-1]) if resume else 0),
        }
    )
    if not all(math.isfinite(x) for x in losses):
        print(
            "[hpml_ft] warning: non-finite loss during training; lower train.learning_rate", file=sys.stderr
        )
    metrics["after"] = {
        "eval_loss": _eval_loss(trainer, eval_ds),
        **(quick_eval(trainer.model, tok, splits.eval, cfg, splits.format) if single else {}),
    }
    metrics.update(peak_memory())
    if trainer.accelerator.is_main_process:
        from hpml_ft.callbacks import tracking_notes, write_loss_plot

        write_loss_plot(trainer.state.log_history, run_dir / "loss.png")  # now with the final eval loss
        for note in tracking_notes(cfg, run_dir):
            print(f"[hpml_ft] {note}")
    record = {"recipe": cfg.model_dump(mode="json"), "base_model": cfg.model.name_or_path, "metrics": metrics}
    strip_fake_quant(trainer.model)  # quant: save the trained full-precision weights ...
    artifacts = save_artifacts(trainer, cfg, tok, base_path, record)
    if trainer.accelerator.is_main_process:
        artifacts.update(convert_run(run_dir, cfg, record))  # ... then merged/ as the real low-bit model
        write_json_atomic(run_dir / "metrics.json", metrics)
        write_text_atomic(run_dir / "README.md", model_card(cfg, metrics, artifacts))
        write_json_atomic(
            run_dir / RUN_RECORD,
            {
                "status": "finished",
                "artifacts": artifacts,
                "format": splits.format,
                "base_path": base_path,
                "versions": versions(),
                **record,
            },
        )
        print(f"[hpml_ft] done: {run_dir} (merged model: {run_dir / 'merged'})")
    return 0
