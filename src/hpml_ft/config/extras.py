"""`train.sft_extra` / `peft.extra`: any other trl.SFTConfig / peft.LoraConfig field, checked by name.

The typed sections map the settings most recipes need; these dicts reach the rest. A name is checked against
the real dataclass fields (trl/peft are imported only when the dict is not empty), and a field the typed config
already sets is refused with the key to use instead: there is one way to set each thing.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

# trl.SFTConfig fields hpml_ft sets (trainer.sft_config) -> the recipe key that sets them. A test checks that
# every argument sft_config passes is listed here.
SFT_MAPPED: dict[str, str] = {
    "output_dir": "train.output_dir / train.run_name",
    "run_name": "train.run_name",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "per_device_eval_batch_size": "train.per_device_batch_size",
    "gradient_accumulation_steps": "train.effective_batch_size",
    "learning_rate": "train.learning_rate",
    "lr_scheduler_type": "train.lr_scheduler",
    "lr_scheduler_kwargs": "train.lr_scheduler_kwargs",
    "warmup_steps": "train.warmup_ratio",
    "weight_decay": "train.weight_decay",
    "max_grad_norm": "train.max_grad_norm",
    "num_train_epochs": "train.num_epochs",
    "max_steps": "train.max_steps",
    "optim": "train.optimizer",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing_kwargs": "train.gradient_checkpointing",
    "activation_checkpointing": "train.gradient_checkpointing",
    "activation_checkpointing_kwargs": "train.gradient_checkpointing",
    "max_length": "train.max_length",
    "packing": "train.packing",
    "logging_steps": "train.logging_steps",
    "logging_first_step": "train.logging_steps (the first step is always logged)",
    "eval_strategy": "train.eval_steps",
    "eval_steps": "train.eval_steps",
    "save_strategy": "train.save_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "deepspeed": "train.deepspeed",
    "report_to": "tracking.report_to",
    "include_num_input_tokens_seen": "nothing (always on: metrics.json reports tokens_seen)",
    "prediction_loss_only": "nothing (always on: eval reports losses, never gathers logits)",
    "dataset_kwargs": "data.* (data.py tokenizes and masks the data itself)",
    "bf16": "train.precision",
    "fp16": "train.precision",
    "use_cpu": "train.precision",
    "neftune_noise_alpha": "train.neftune_noise_alpha",
    "use_liger_kernel": "train.use_liger_kernel",
    "dataloader_num_workers": "train.dataloader_num_workers",
    "resume_from_checkpoint": "train.resume",
}

# peft.LoraConfig fields hpml_ft sets (lora.lora_config) -> the recipe key that sets them.
LORA_MAPPED: dict[str, str] = {
    "r": "peft.r",
    "lora_alpha": "peft.alpha",
    "lora_dropout": "peft.dropout",
    "target_modules": "peft.target_modules",
    "use_dora": "peft.method=dora",
    "use_rslora": "peft.use_rslora",
    "init_lora_weights": "peft.init_lora_weights",
    "modules_to_save": "peft.modules_to_save",
    "task_type": "nothing (always CAUSAL_LM)",
}


def _field_names(section: str) -> set[str]:
    if section == "train.sft_extra":
        from trl import SFTConfig

        return {f.name for f in dataclasses.fields(SFTConfig)}
    from peft import LoraConfig

    return {f.name for f in dataclasses.fields(LoraConfig)}


def check_extra(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Refuse names the dataclass does not have (with a did-you-mean) and names a typed key already sets."""
    if not values:
        return values
    mapped = SFT_MAPPED if section == "train.sft_extra" else LORA_MAPPED
    what = "trl.SFTConfig" if section == "train.sft_extra" else "peft.LoraConfig"
    fields = _field_names(section)
    problems = []
    for name in values:
        if name in mapped:
            problems.append(f"{section}.{name}: set {mapped[name]} instead")
        elif name not in fields:
            guess = difflib.get_close_matches(name, sorted(fields), n=1, cutoff=0.6)
            hint = ""
            if guess:
                g = guess[0]
                hint = f"; did you mean {mapped[g]!r}?" if g in mapped else f"; did you mean '{section}.{g}'?"
            problems.append(f"unknown key '{section}.{name}' (not a {what} field{hint})")
    if problems:
        raise ValueError("; ".join(problems))
    return values
