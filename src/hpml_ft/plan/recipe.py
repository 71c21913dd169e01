"""A recipe (and its DeepSpeed / accelerate configs) as a planner Setup and Shape."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hpml_ft.config import Config
from hpml_ft.config.load import yaml_error_where
from hpml_ft.config.runtime import (
    PLAN_LM_HEAD_TILES_CPU,
    PLAN_LM_HEAD_TILES_GPU,
    PLAN_OVERHEAD_GIB_CPU,
    PLAN_OVERHEAD_GIB_GPU,
)
from hpml_ft.errors import fail
from hpml_ft.plan.memory import Setup
from hpml_ft.plan.shape import Shape, load_model_config, model_shape


def deepspeed_settings(path: str | None) -> dict[str, Any]:
    """ZeRO stage, offload, sub_group_size, stage3_max_live_parameters of a DeepSpeed JSON ({} without one)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        fail(f"DeepSpeed config not found: {p} (use one of deepspeed/*.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        zero = data.get("zero_optimization", {})
        offload = any(
            zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")
        )
        return {
            "zero": int(zero.get("stage", 0)),
            "offload": offload,
            "sub_group": int(zero.get("sub_group_size", 10**9)),
            "max_live": int(zero.get("stage3_max_live_parameters", 10**9)),
        }
    except json.JSONDecodeError as err:
        fail(f"{p}: invalid JSON at line {err.lineno}: {err.msg}; fix the DeepSpeed config")
    except (AttributeError, TypeError, ValueError, UnicodeDecodeError):
        fail(f"{p}: zero_optimization has wrong types (stage, sizes: integers; offload_*: mappings); fix it")


def setup_for(
    cfg: Config, gpus: int, gpu: bool, zero: int | None = None, offload: bool | None = None
) -> Setup:
    """Training setup of a recipe on `gpus` devices; `gpu` False plans the CPU run (fp32, no CUDA)."""
    t, m = cfg.train, cfg.model
    ds = deepspeed_settings(t.deepspeed)
    zero = ds.get("zero", 0) if zero is None else zero
    offload = (ds.get("offload", False) and zero > 0) if offload is None else offload
    if offload and zero == 0:
        fail("offload needs DeepSpeed ZeRO: pass --zero 1, 2 or 3 (or a recipe with train.deepspeed)")
    if cfg.quantized_4bit and zero == 3:
        fail("QLoRA (4-bit) with ZeRO-3 is not supported by this toolkit; plan with --zero 2 or --zero 0")
    precision = t.precision if t.precision != "auto" else ("bf16" if gpu else "fp32")
    weights = m.dtype if m.dtype != "auto" else ("bfloat16" if gpu else "float32")
    weights = "nf4" if cfg.quantized_4bit else "int8" if m.load_in_8bit else weights
    per_step = t.per_device_batch_size * gpus
    grpo = t.stage == "grpo"
    return Setup(
        method=cfg.peft.method,
        weights=weights,
        act_bytes=2 if precision in ("bf16", "fp16") or weights in ("bfloat16", "float16") else 4,
        optimizer=t.optimizer,
        zero=zero,
        offload=offload,
        gpus=gpus,
        batch=t.per_device_batch_size,
        seq=t.max_length,
        accum=max(t.effective_batch_size // per_step, 1),
        checkpointing=t.gradient_checkpointing,
        eager=m.attn_implementation == "eager",
        lora_dropout=cfg.peft.dropout > 0,
        double_quant=m.bnb_4bit_use_double_quant,
        sub_group=ds.get("sub_group", 10**8),
        max_live=ds.get("max_live", 10**9),
        tile_copies=PLAN_LM_HEAD_TILES_GPU if gpu else PLAN_LM_HEAD_TILES_CPU,
        overhead_gib=PLAN_OVERHEAD_GIB_GPU if gpu else PLAN_OVERHEAD_GIB_CPU,
        grpo=grpo,
        # TRL's fused head scores only completion tokens on Triton devices (GPUs); elsewhere every position
        scored=cfg.grpo.max_completion_length if grpo and gpu else 0,
        ref_model=grpo and cfg.grpo.beta > 0 and cfg.peft.method == "full",
    )


def shape_for(cfg: Config, model_path: str) -> tuple[Shape, str]:
    mcfg, source = load_model_config(model_path, cfg.model.trust_remote_code)
    p = cfg.peft
    return model_shape(mcfg, p.method, p.r, p.target_modules, cfg.model.trust_remote_code), source


def accelerate_processes(cfg: Config) -> int:
    """num_processes of the recipe's accelerate config (the GPU count it is meant for), else 1."""
    import yaml

    if not cfg.accelerate_config:
        return 1
    p = Path(cfg.accelerate_config)
    if not p.is_file():
        fail(f"accelerate_config {p} not found; fix the recipe's accelerate_config or pass --gpus N")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        fail(
            f"{p}: not a valid accelerate config (YAML error{yaml_error_where(err)}); fix it or pass --gpus N"
        )
    if not isinstance(data, dict):
        fail(
            f"{p}: an accelerate config is a YAML mapping, not {type(data).__name__}; fix it or pass --gpus N"
        )
    n = data.get("num_processes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        fail(f"{p}: num_processes must be a positive integer, got {n!r}; fix it or pass --gpus N")
    return n
