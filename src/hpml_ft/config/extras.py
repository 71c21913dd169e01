"""`train.sft_extra` / `peft.extra`: any other trl.SFTConfig / peft.LoraConfig field, checked by name and value.

The typed sections map the settings most recipes need; these dicts reach the rest. A name is checked against
the real dataclass fields (trl/peft are imported only when the dict is not empty), and a field the typed config
already sets is refused with the key to use instead: there is one way to set each thing. A value is checked
against the field's type hint at load (numbers, Literal/enum choices, optional fields, lists; booleans only as
true/false), so `adam_beta2: high` or `torch_compile: maybe` is one error line, not a traceback or a truthy string.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import math
import types
import typing
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


def _dataclass(section: str) -> type:
    if section == "train.sft_extra":
        from trl import SFTConfig

        return SFTConfig
    from peft import LoraConfig

    return LoraConfig


def _field_names(section: str) -> set[str]:
    return {f.name for f in dataclasses.fields(_dataclass(section))}


# ---------------------------------------------------------------- values, against the fields' type hints


def _arms(tp: Any) -> tuple[Any, ...]:
    """The alternatives of a Union; `SomeEnum | str` is the enum alone (the str is one of its values)."""
    args = typing.get_args(tp)
    enums = any(isinstance(a, type) and issubclass(a, enum.Enum) for a in args)
    return tuple(a for a in args if not (enums and a is str))


def _number(value: Any, kind: type) -> tuple[bool, Any]:
    """int: an int; float: a finite number, also as YAML text ('1e-4' is a string to YAML 1.1)."""
    if isinstance(value, bool):
        return False, value
    if kind is int:
        return isinstance(value, int), value
    try:
        number = float(value) if isinstance(value, str) else value
    except ValueError:
        return False, value
    return isinstance(number, int | float) and math.isfinite(number), number


def check_value(tp: Any, value: Any) -> tuple[bool, Any]:
    """(whether `value` fits the type hint `tp`, the value as the field takes it). Booleans are strict: true or
    false only (YAML's, or the words), never any other string; a type not modelled here is left to the field."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        fits = [check_value(arm, value) for arm in _arms(tp)]
        return next(((True, v) for ok, v in fits if ok), (False, value))
    if origin is typing.Literal:
        return value in typing.get_args(tp), value
    if tp is type(None):
        return value is None, value
    if tp is bool:
        words = {"true": True, "false": False}
        word = value.lower() if isinstance(value, str) else None
        return isinstance(value, bool) or word in words, words.get(word, value)
    if tp in (int, float):
        return _number(value, tp)
    if tp is str:
        return isinstance(value, str), value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return isinstance(value, tp) or value in {e.value for e in tp}, value
    if (origin or tp) in (list, tuple, set):
        inner = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if not isinstance(value, list | tuple):
            return False, value
        fits = [
            check_value(inner[min(i, len(inner) - 1)], v) if inner else (True, v) for i, v in enumerate(value)
        ]
        return all(ok for ok, _ in fits), [v for _, v in fits]
    if (origin or tp) is dict:
        return isinstance(value, dict), value
    return True, value


def type_text(tp: Any) -> str:
    """A type hint in words: `float`, `true or false`, `one of 'none', 'all'`, `a list of str or null`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(type_text(a) for a in _arms(tp))
    if origin is typing.Literal or (isinstance(tp, type) and issubclass(tp, enum.Enum)):
        return "one of " + ", ".join(repr(getattr(c, "value", c)) for c in (args or list(tp)))
    if (origin or tp) in (list, tuple, set):
        return "a list" + (f" of {type_text(args[0])}" if args else "")
    names = {type(None): "null", bool: "true or false", dict: "a mapping"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def check_values(section: str, values: dict[str, Any]) -> dict[str, Any]:
    """Each value against its field's type hint, one problem per key; returns the values as the fields take
    them (`'true'` -> True, `'1e-4'` -> 0.0001)."""
    hints = typing.get_type_hints(_dataclass(section))
    out, problems = {}, []
    for name, value in values.items():
        ok, out[name] = check_value(hints.get(name, Any), value)
        if not ok:
            problems.append(
                f"{section}.{name}: {value!r} is not a valid value (expected {type_text(hints[name])})"
            )
    if problems:
        raise ValueError("; ".join(problems))
    return out


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
    return check_values(section, values)
