"""The TRL trainer from the recipe: every SFTConfig argument (typed keys + `train.sft_extra`), precision,
Ctrl-C handling, the LoRA+ optimizer, and the SFTTrainer itself. Data arrives pre-tokenized with assistant
masks (data.py)."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback

from hpml_ft.config import Config
from hpml_ft.config.load import REDACTED, is_secret_key
from hpml_ft.errors import fail
from hpml_ft.lora import loraplus_optimizer
from hpml_ft.train.packing import (
    needs_row_layout,
    packed_rows_collator,
    padding_free_collator,
    use_packed_attention,
)

if TYPE_CHECKING:
    from datasets import Dataset
    from transformers import PreTrainedModel, PreTrainedTokenizerBase
    from trl import SFTConfig, SFTTrainer

OPTIMIZERS = {  # train.optimizer -> transformers' optim name
    "adamw_torch": "adamw_torch",
    "adamw_8bit": "adamw_bnb_8bit",
    "paged_adamw_8bit": "paged_adamw_8bit",
}


def precision_flags(cfg: Config) -> dict[str, bool]:
    """train.precision -> SFTConfig bf16/fp16/use_cpu; auto = bf16 on capable GPUs, fp16 on others, fp32 on CPU."""
    import torch

    want = cfg.train.precision
    if want == "auto":
        cuda = torch.cuda.is_available()
        want = "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp16" if cuda else "fp32"
    if want in ("bf16", "fp16") and not torch.cuda.is_available():
        fail(f"train.precision={want} needs a CUDA GPU; use train.precision=auto (fp32 on CPU)")
    return {"bf16": want == "bf16", "fp16": want == "fp16", "use_cpu": not torch.cuda.is_available()}


def sft_arguments(cfg: Config, accum: int, run_dir: Path | None = None) -> dict[str, Any]:
    """The SFTConfig arguments the typed recipe sets (config/extras.py SFT_MAPPED names the key of each)."""
    t = cfg.train
    args: dict[str, Any] = {
        "output_dir": str((run_dir or cfg.run_dir) / "checkpoints"),
        "run_name": cfg.run_name,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": accum,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "lr_scheduler_kwargs": dict(t.lr_scheduler_kwargs),
        "warmup_steps": t.warmup_ratio,  # a float < 1 is a ratio of total steps
        "weight_decay": t.weight_decay,
        "max_grad_norm": t.max_grad_norm,
        "num_train_epochs": t.num_epochs or 1,
        "max_steps": t.max_steps or -1,
        "optim": OPTIMIZERS[t.optimizer],
        "activation_checkpointing": t.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False} if t.gradient_checkpointing else None,
        "max_length": t.max_length,
        "packing": t.packing,
        "logging_steps": t.logging_steps,
        "logging_first_step": True,
        "eval_strategy": "steps" if t.eval_steps else "no",
        "eval_steps": t.eval_steps,
        "save_strategy": "steps" if t.save_steps else "no",  # no save_steps: TRL's own default is never used
        **({"save_steps": t.save_steps} if t.save_steps else {}),
        "save_total_limit": t.save_total_limit,
        "seed": t.seed,
        "data_seed": t.seed,
        "deepspeed": t.deepspeed,
        "report_to": [r for r in cfg.tracking.report_to if r != "none"] or "none",
        "include_num_input_tokens_seen": "non_padding",  # tokens_seen, tokens_per_s: real tokens, not pads
        # eval reports the loss (TRL adds entropy/accuracy itself); without this the Trainer also gathers every
        # eval batch's full logits: +0.9 GB peak on the TAT-QA recipe (4.2 vs 5.1 GB), same eval loss
        "prediction_loss_only": True,
        "dataset_kwargs": {"skip_prepare_dataset": False},
        "neftune_noise_alpha": t.neftune_noise_alpha,
        "use_liger_kernel": t.use_liger_kernel,
        "dataloader_num_workers": t.dataloader_num_workers,
        **precision_flags(cfg),
    }
    return args


def sft_config(cfg: Config, accum: int, run_dir: Path | None = None) -> SFTConfig:
    """TRL SFTConfig from the recipe: the typed keys, then `train.sft_extra` (names checked at load)."""
    from trl import SFTConfig

    try:
        return SFTConfig(**sft_arguments(cfg, accum, run_dir), **without_secrets(cfg.train.sft_extra))
    except (ValueError, TypeError) as err:
        why = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        fail(f"trl.SFTConfig refused the training arguments ({why}); fix train.sft_extra or the train: keys")


def check_hub_push(cfg: Config) -> None:
    """train.sft_extra.push_to_hub needs the Hub: refused before any model loads when offline or when the Hub
    does not accept the token in play, instead of a traceback when the trainer creates the repo."""
    extra = cfg.train.sft_extra
    if not extra.get("push_to_hub"):
        return
    from huggingface_hub import constants, whoami

    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline or constants.HF_HUB_OFFLINE:
        fail(
            "train.sft_extra.push_to_hub=true needs the Hugging Face Hub, but offline mode is on "
            "(HF_HUB_OFFLINE); unset it, or drop push_to_hub and upload the run's merged/ later"
        )
    token = extra.get("hub_token")
    try:
        whoami(token=token if token and token != REDACTED else None)
    except Exception as err:  # noqa: BLE001 - no network, no token, a revoked one: the push would fail
        why = (str(err).strip().splitlines() or [type(err).__name__])[0][:120]
        fail(
            f"train.sft_extra.push_to_hub=true, but the Hugging Face Hub cannot be used ({why}); check the "
            "network and log in (HF_TOKEN or `hf auth login`), or drop push_to_hub"
        )


def without_secrets(extra: dict[str, Any]) -> dict[str, Any]:
    """`train.sft_extra` minus its secrets, which would otherwise be pickled into every training_args.bin (shared
    with the model): a hub_token goes to the environment (HF_TOKEN), where push_to_hub finds it; a recorded
    `***` is dropped (set HF_TOKEN instead)."""
    token = extra.get("hub_token")
    if isinstance(token, str) and token and token != REDACTED:
        os.environ["HF_TOKEN"] = token
    return {k: v for k, v in extra.items() if not is_secret_key(k)}


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


def build_trainer(
    cfg: Config,
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    train_ds: Dataset,
    eval_ds: Dataset | None,
    accum: int,
    args: SFTConfig | None = None,
) -> SFTTrainer:
    """SFTTrainer over the wrapped model; LoRA+ (peft.loraplus_lr_ratio) replaces the stock optimizer; packed
    rows keep their own rows where attention has no varlen kernel (train/packing.py)."""
    from trl import SFTTrainer

    args = args or sft_config(cfg, accum)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tok,
        callbacks=[InterruptCallback()],
        optimizer_cls_and_kwargs=loraplus_optimizer(cfg, args),
    )
    set_packed_layout(cfg, trainer)
    return trainer


def set_packed_layout(cfg: Config, trainer: SFTTrainer) -> None:
    """Packed rows stay rows where attention has no varlen kernel (TRL would flatten them), with per-sample
    attention on CPU; train.padding_free packs each micro-batch's samples the same way (TRL's flattened
    collator under FlashAttention)."""
    bfd = getattr(trainer.data_collator, "padding_free", False)  # TRL set it for train.packing (bfd)
    free = cfg.train.padding_free and not cfg.train.packing
    if not (bfd or free):
        return
    pad_id, rows = trainer.data_collator.pad_token_id, needs_row_layout(trainer.model)
    if rows:
        trainer.data_collator = (
            packed_rows_collator(pad_id) if bfd else padding_free_collator(pad_id, cfg.train.max_length)
        )
    elif free:
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        trainer.data_collator = DataCollatorForLanguageModeling(pad_token_id=pad_id, padding_free=True)
    per_sample = rows and use_packed_attention(trainer.model)
    what = "bfd packing" if bfd else "padding-free: each micro-batch's samples packed"
    print(
        f"[hpml_ft] {what} into rows of <= {cfg.train.max_length} tokens; "
        + ("a batch row per row" if rows else "one flattened sequence per micro-batch (varlen attention)")
        + (", causal attention per sample on CPU (packed_sdpa)" if per_sample else "")
    )
