"""The one typed config: every recipe default lives in schema.py; load.py reads YAML + overrides into it.

`from hpml_ft.config import X` is the public door: the names below. CLI defaults of commands that run without a
recipe are in runtime.py; `train.sft_extra` / `peft.extra` name checks in extras.py.
"""

from __future__ import annotations

from hpml_ft.config.load import (
    apply_override,
    build_config,
    dump_config,
    format_validation_error,
    grad_accum_steps,
    load_config,
    redact,
    redact_text,
    world_size,
)
from hpml_ft.config.schema import (
    ADAPTER_METHODS,
    DTYPE_CHOICES,
    TRAIN_METHODS,
    Config,
    DataConfig,
    DistillConfig,
    Dtype,
    GrpoConfig,
    Method,
    ModelConfig,
    PeftConfig,
    QuantConfig,
    TrackingConfig,
    TrainConfig,
)

__all__ = [
    "ADAPTER_METHODS",
    "DTYPE_CHOICES",
    "TRAIN_METHODS",
    "Config",
    "DataConfig",
    "DistillConfig",
    "Dtype",
    "GrpoConfig",
    "Method",
    "ModelConfig",
    "PeftConfig",
    "QuantConfig",
    "TrackingConfig",
    "TrainConfig",
    "apply_override",
    "build_config",
    "dump_config",
    "format_validation_error",
    "grad_accum_steps",
    "load_config",
    "redact",
    "redact_text",
    "world_size",
]
