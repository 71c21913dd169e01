"""The one typed config: every default lives here. YAML -> dotted overrides -> validate -> frozen."""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.errors import UserError, fail

Method = Literal["none", "lora", "qlora", "dora", "full"]
# A run name is one path component inside train.output_dir: no separators, no '..', nothing hidden.
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


class _Section(BaseModel):
    # nan/inf pass every gt/ge bound check (all comparisons with nan are False): refuse them everywhere
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelConfig(_Section):
    name_or_path: str = EMBEDDED_MODEL  # "embedded", a local HF directory, or a hub id
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = (
        "auto"  # auto: bf16 on capable GPUs, fp32 on CPU
    )
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    load_in_4bit: bool = False  # implied by peft.method=qlora
    load_in_8bit: bool = False
    bnb_4bit_quant_type: Literal["nf4", "fp4"] = "nf4"
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    trust_remote_code: bool = False

    @model_validator(mode="after")
    def _one_quantization(self) -> ModelConfig:
        if self.load_in_4bit and self.load_in_8bit:
            raise ValueError("model.load_in_4bit and model.load_in_8bit are both true; pick one")
        return self


class DataConfig(_Section):
    # "demo" = the generated offline demo set; else a .json/.jsonl path or a hub dataset id.
    path: str = "demo"
    format: Literal["auto", "alpaca", "chat", "tatqa"] = "auto"
    split: str = "train"  # split to read when `path` is a hub id
    eval_path: str | None = None  # a separate eval file/hub id; else `eval_fraction` of `path` is held out
    eval_split: str | None = (
        None  # a named split (e.g. "test") of eval_path, or of path when eval_path is unset
    )
    eval_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_samples: int | None = Field(None, gt=0)  # cap after loading, for quick runs
    max_eval_samples: int | None = Field(None, gt=0)
    system_prompt: str | None = None
    tatqa_multi_turn: bool = False  # all questions of one context in one conversation (table read once)
    # TAT-QA assistant turns: the plain answer; or, for arithmetic/count, the derivation the executor computes
    # (`(44.1 - 56.7) / 56.7 * 100 | percent`, `count: a | b`); `extract` adds the labelled values first
    tatqa_target: Literal["answer", "derivation", "extract"] = "answer"
    tatqa_table: Literal["pipe", "cells"] = "pipe"  # cells: one `row label, column: value` line per cell
    demo_size: int = Field(800, gt=10)
    seed: int = 0  # split/shuffle seed, separate from the training seed


class PeftConfig(_Section):
    method: Method = "lora"
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class TrainConfig(_Section):
    output_dir: str = "outputs"
    run_name: str | None = None  # default: the recipe's `name`
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0)
    num_epochs: float | None = Field(None, gt=0)
    max_steps: int | None = Field(None, gt=0)
    per_device_batch_size: int = Field(8, gt=0)
    effective_batch_size: int = Field(8, gt=0)  # accumulation = effective / (per-device x processes)
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = "adamw_torch"
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    max_length: int = Field(512, gt=8)
    packing: bool = False
    logging_steps: int = Field(5, gt=0)
    eval_steps: int | None = Field(None, gt=0)  # None: evaluate at the end only
    save_steps: int | None = Field(None, gt=0)  # None: no intermediate checkpoints
    save_total_limit: int = Field(2, gt=0)
    seed: int = 42
    deepspeed: str | None = None  # path to a deepspeed/*.json
    resume: str | None = None  # "auto" (latest checkpoint in the run dir) or a checkpoint path
    overwrite: bool = False  # replace a finished run in the same directory
    merge: bool = True  # write a merged standalone model next to the adapter
    eval_generate: int = Field(64, ge=0)  # held-out samples answered before/after training (0 = skip)
    max_new_tokens: int = Field(64, gt=0)
    cpu_threads: int | None = Field(None, gt=0)  # torch threads per process on CPU; None = cores / local processes
    sample_every: int = Field(25, ge=0)  # every N steps answer a few fixed eval prompts -> samples.jsonl (0 = off)
    sample_prompts: int = Field(3, gt=0)  # how many fixed eval prompts each sampling answers


class DistillConfig(_Section):
    # loss = (1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T); 0 = no teacher loaded
    weight: float = Field(0.0, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0)


class QuantConfig(_Section):
    """Low-bit weights (hpml_ft.quant): bits=null is off; else QAT during training (qat) and the real low-bit
    model written at save (merged/ holds it, merged-fp/ the full-precision weights)."""

    bits: Literal[2, 3, 4, 8] | None = None
    group_size: int = Field(32, gt=0)  # one scale (and zero point) per group of input weights
    symmetric: bool = False  # asymmetric (with zero point) keeps more range at 2 bits (BitDistiller)
    qat: bool = True  # fake-quantized linear weights in the forward pass, straight-through gradients
    quantize_embeddings: bool = False  # also the input embeddings / LM head at save (they stay fp by default)
    distill: DistillConfig = DistillConfig()


class TrackingConfig(_Section):
    report_to: list[Literal["none", "wandb", "tensorboard", "trackio"]] = ["none"]
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"  # offline by default: no network needed
    project: str = "hpml_ft"


class Config(_Section):
    name: str = "run"
    accelerate_config: str | None = None  # documentation/launch hint: accelerate_configs/*.yaml
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    peft: PeftConfig = PeftConfig()
    train: TrainConfig = TrainConfig()
    tracking: TrackingConfig = TrackingConfig()
    quant: QuantConfig = QuantConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        t, p = self.train, self.peft
        if not _SAFE_NAME.fullmatch(self.run_name):
            key = "train.run_name" if t.run_name is not None else "name"
            raise ValueError(
                f"{key}={self.run_name!r} must be one plain directory name (letters, digits, '.', '_', '-', "
                "starting with a letter or digit), not a path: runs always live inside train.output_dir"
            )
        if (t.num_epochs is None) == (t.max_steps is None):
            raise ValueError(
                "set exactly one of train.num_epochs and train.max_steps "
                "(override the other with =null, e.g. train.num_epochs=null train.max_steps=50)"
            )
        if t.effective_batch_size % t.per_device_batch_size:
            raise ValueError(
                f"train.effective_batch_size={t.effective_batch_size} is not a multiple of "
                f"train.per_device_batch_size={t.per_device_batch_size}; make it one"
            )
        if p.method == "qlora" and self.model.load_in_8bit:
            raise ValueError("peft.method=qlora loads the base in 4-bit; drop model.load_in_8bit")
        if p.method == "full" and (self.model.load_in_4bit or self.model.load_in_8bit):
            raise ValueError(
                "full fine-tuning cannot train quantized weights; use peft.method=qlora or unset load_in_*"
            )
        if p.method == "dora" and self.model.load_in_8bit:
            raise ValueError("DoRA with 8-bit weights is not supported by PEFT; use 4-bit (qlora) or none")
        if (p.method == "qlora" or self.model.load_in_4bit) and t.deepspeed and "3" in Path(t.deepspeed).stem:
            raise ValueError(
                "QLoRA (4-bit) with DeepSpeed ZeRO-3 is not supported here; use deepspeed/zero2.json or no DeepSpeed"
            )
        if self.quant.bits is not None and (self.quantized_4bit or self.model.load_in_8bit):
            raise ValueError(
                "quant (QAT / low-bit save) needs full-precision base weights: it cannot train on a bitsandbytes "
                "4/8-bit base; use peft.method=lora (or full) and unset model.load_in_*"
            )
        if self.quant.bits is not None and p.method not in ("full", "none") and not t.merge:
            raise ValueError("quant writes the low-bit model from merged/; set train.merge=true")
        if self.quant.bits is not None and self.quant.distill.weight > 0 and t.deepspeed:
            raise ValueError("quant.distill with DeepSpeed is not supported; set quant.distill.weight=0")
        return self

    @property
    def quantized_4bit(self) -> bool:
        return self.peft.method == "qlora" or self.model.load_in_4bit

    @property
    def run_name(self) -> str:
        return self.train.run_name if self.train.run_name is not None else self.name

    @property
    def run_dir(self) -> Path:
        return Path(self.train.output_dir) / self.run_name


# ---------------------------------------------------------------- loading


class _DuplicateKeyError(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML silently keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if isinstance(key, str | int | float | bool) and key in seen:
                raise _DuplicateKeyError(f"key '{key}' appears twice (lines {seen[key]} and {line})")
            if isinstance(key, str | int | float | bool):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        fail(f"recipe not found: {p} (pass a path like recipes/lora_alpaca.yaml)")
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader) or {}
    except UnicodeDecodeError as err:
        fail(f"{p}: not UTF-8 text (byte {err.start}); a recipe is a YAML text file")
    except _DuplicateKeyError as err:
        fail(f"{p}: {err}; keep one of them")
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        fail(f"{p}: YAML syntax error{where}: {getattr(err, 'problem', err)}; fix the recipe file")
    if not isinstance(data, dict):
        fail(
            f"{p}: a recipe must be a YAML mapping of sections (model:, data:, peft:, train:), not {type(data).__name__}"
        )
    return data


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 1e-4, null, [a, b] work)."""
    if "=" not in override:
        fail(f"override '{override}' is not of the form section.key=value (e.g. train.learning_rate=1e-4)")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            fail(f"override '{override}': '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys.extend(_known_keys(ann, f"{prefix}{name}."))
    return keys


def format_validation_error(err: ValidationError) -> str:
    """One line per problem, with a 'did you mean' for unknown keys."""
    known = _known_keys(Config)
    lines = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"] if not str(x).startswith("function-after"))
        if e["type"] == "extra_forbidden":
            guess = difflib.get_close_matches(loc, known, n=1, cutoff=0.6)
            hint = (
                f" (did you mean '{guess[0]}'?)"
                if guess
                else f"; known keys: {', '.join(k for k in known if '.' not in k)}"
            )
            lines.append(f"unknown key '{loc}'{hint}")
        elif e["type"] == "value_error":
            lines.append(str(e["msg"]).removeprefix("Value error, "))
        else:
            got = e.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            lines.append(f"{loc or 'recipe'}: {e['msg']} (got {shown})")
    return "; ".join(lines)


def build_config(tree: dict[str, Any]) -> Config:
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise UserError(f"invalid recipe: {format_validation_error(err)}") from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a recipe (or defaults when `path` is None), apply dotted overrides, validate, freeze."""
    tree = _read_yaml(path) if path else {}
    for ov in overrides:
        apply_override(tree, ov)
    return build_config(tree)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- derived numbers


def world_size() -> int:
    """Processes in this launch (accelerate/torchrun set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def grad_accum_steps(cfg: Config, processes: int | None = None) -> int:
    procs = processes or world_size()
    per_step = cfg.train.per_device_batch_size * procs
    if cfg.train.effective_batch_size % per_step:
        fail(
            f"train.effective_batch_size={cfg.train.effective_batch_size} is not divisible by "
            f"per_device_batch_size x processes = {cfg.train.per_device_batch_size} x {procs}; "
            "change the batch sizes or the number of processes"
        )
    return cfg.train.effective_batch_size // per_step
