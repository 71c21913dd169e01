"""Memory planner: will a recipe fit on N GPUs of G GiB? (`python -m hpml_ft.plan`, `train --dry-run`).

shape.py   parameter counts and dimensions of the model (meta-device build of its config, no weights)
memory.py  the estimate: model states (ZeRO paper), activations, LM head, step transients, overhead
recipe.py  a recipe + its DeepSpeed / accelerate configs -> Setup
render.py  the table, the verdict, the largest batch that fits; the `train --dry-run` text
cli.py     the command line
User-tunable constants (overheads, usable fraction, default GPU memory) are in hpml_ft.config.runtime.
"""

from hpml_ft.plan.cli import main
from hpml_ft.plan.memory import (
    GIB,
    Row,
    Setup,
    estimate,
    largest_batch,
    peak,
    phase_peaks,
    phases,
    total_bytes,
)
from hpml_ft.plan.recipe import accelerate_processes, deepspeed_settings, setup_for, shape_for
from hpml_ft.plan.render import plan_text_for_config, ram_gib, render
from hpml_ft.plan.shape import KNOWN_CONFIGS, Shape, load_model_config, model_shape

__all__ = [
    "GIB",
    "KNOWN_CONFIGS",
    "Row",
    "Setup",
    "Shape",
    "accelerate_processes",
    "deepspeed_settings",
    "estimate",
    "largest_batch",
    "load_model_config",
    "main",
    "model_shape",
    "peak",
    "phase_peaks",
    "phases",
    "plan_text_for_config",
    "ram_gib",
    "render",
    "setup_for",
    "shape_for",
    "total_bytes",
]
