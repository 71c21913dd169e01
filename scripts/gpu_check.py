"""Measured vs planned memory: a few training steps of randomly initialised models with real shapes.

    python scripts/gpu_check.py --out DIR                # GPU: Llama-3.2-1B full (ZeRO-3) / LoRA / QLoRA, 8B LoRA/QLoRA
    python scripts/gpu_check.py --out DIR --cpu-smoke    # the same code paths on a tiny config, on the CPU
    python scripts/gpu_check.py --out DIR --cpu-measure  # embedded SmolLM2-135M on the CPU: the planner check

Every case runs in its own process (clean peak counters, a crash or OOM only loses that case) through the
project's own pieces: load_config -> model_kwargs/build_model -> wrap_peft -> runner.build_trainer (SFTTrainer
with the recipe's SFTConfig), on synthetic sequences of exactly `seq` tokens. Weights are random: no downloads.
Results (step time, tokens/s, peak memory, the planner's estimate) go to DIR/gpu_check.json and .md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30

# (model, method, deepspeed json or "", per-device batch, seq, gradient checkpointing)
GPU_CASES = [
    ("meta-llama/Llama-3.2-1B", "full", "deepspeed/zero3.json", 4, 1024, False),
    ("meta-llama/Llama-3.2-1B", "lora", "", 4, 1024, False),
    ("meta-llama/Llama-3.2-1B", "qlora", "", 4, 1024, False),
    ("meta-llama/Meta-Llama-3-8B", "lora", "", 2, 1024, True),
    ("meta-llama/Meta-Llama-3-8B", "qlora", "", 2, 1024, True),
]
SMOKE_CASES = [
    ("tiny", "full", "deepspeed/zero3.json", 2, 64, False),
    ("tiny", "lora", "", 2, 64, False),
    ("tiny", "full", "", 2, 64, True),
]
MEASURE_CASES = [
    ("embedded", "full", "", 4, 128, False),
    ("embedded", "full", "deepspeed/zero3.json", 4, 128, False),
    ("embedded", "full", "", 4, 256, True),
    ("embedded", "lora", "", 4, 256, False),
    ("embedded", "lora", "", 4, 256, True),
    ("small", "full", "", 8, 256, False),
    ("small", "lora", "", 8, 512, False),
]


def random_config(name: str) -> Any:
    """'tiny' (smoke test) and 'small' (58M params, untied 32k vocab: a second shape for the planner check)."""
    from transformers import LlamaConfig

    if name == "tiny":
        return LlamaConfig(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=1024,
        )
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def tokenizer() -> Any:
    """A word-level tokenizer with a chat template: SFTTrainer needs one; the data below is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "x": 3}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="x")),
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
    )
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}<eos>{% endfor %}"
    return tok


def model_dir(name: str, mcfg: Any, dtype: Any) -> str:
    """Random weights saved once per shape (QLoRA quantizes while loading, so it needs files)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(os.environ.get("GPU_CHECK_MODELS", "/tmp/gpu_check_models")) / name.replace("/", "__")
    if not (path / "config.json").is_file():
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):  # initialising on the GPU is seconds even for 8B
            model = AutoModelForCausalLM.from_config(mcfg, dtype=dtype)
        model.save_pretrained(path)
        del model
    return str(path)


def case_config(case: dict[str, Any]) -> tuple[Any, Any]:
    """(recipe config, model config) for one case: the defaults of config.py plus the case's overrides."""
    from hpml_ft.config import load_config
    from hpml_ft.model import resolve_model_path
    from hpml_ft.plan import load_model_config

    name = case["model"]
    path = resolve_model_path(name) if name == "embedded" else name
    mcfg = random_config(name) if name in ("tiny", "small") else load_model_config(path)[0]
    ckpt = str(case["ckpt"]).lower()
    cfg = load_config(
        None,
        [
            f"model.name_or_path={path}",
            f"peft.method={case['method']}",
            f"train.max_length={case['seq']}",
            f"train.per_device_batch_size={case['batch']}",
            f"train.effective_batch_size={case['batch']}",
            f"train.gradient_checkpointing={ckpt}",
            f"train.deepspeed={case['deepspeed'] or 'null'}",
            "train.num_epochs=null",
            f"train.max_steps={case['steps']}",
            "train.logging_steps=1",
            "train.eval_generate=0",
            f"train.output_dir={case['work']}",
            "train.optimizer=adamw_torch",
        ],
    )
    return cfg, mcfg


def build(case: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(recipe config, model config, model) for one case; random weights, built where training runs."""
    import torch
    from transformers import AutoModelForCausalLM

    from hpml_ft.model import build_model, model_kwargs, wrap_peft

    cfg, mcfg = case_config(case)
    kwargs = model_kwargs(cfg)
    if "quantization_config" in kwargs:
        model = build_model(cfg, model_dir(case["model"], mcfg, kwargs["dtype"]))
    else:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            model = AutoModelForCausalLM.from_config(mcfg, **kwargs)
    return cfg, mcfg, wrap_peft(model, cfg, cfg.train.gradient_checkpointing)


def synthetic(n: int, seq: int, vocab: int) -> Any:
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, vocab, (n, seq), generator=g).tolist()
    return Dataset.from_dict({"input_ids": ids, "assistant_masks": [[1] * seq for _ in range(n)]})


def rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    import resource

    import datasets  # noqa: F401 - imported before the baseline so the RSS delta counts tensors, not code
    import peft  # noqa: F401
    import torch
    import trl  # noqa: F401
    from transformers import TrainerCallback

    from hpml_ft.plan import estimate, model_shape, peak, setup_for
    from hpml_ft.runner import build_trainer

    gpu = torch.cuda.is_available()
    base = rss()
    cfg, mcfg, model = build(case)
    # Plan first: once SFTConfig activates ZeRO-3, even a meta-device build goes through DeepSpeed's init.
    sh = model_shape(mcfg, cfg.peft.method, cfg.peft.r, cfg.peft.target_modules)
    rows = estimate(sh, setup_for(cfg, 1, gpu=gpu))
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            if gpu:
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())

    ds = synthetic(case["steps"] * case["batch"], case["seq"], mcfg.vocab_size)
    trainer = build_trainer(cfg, model, tokenizer(), ds, None, 1)
    trainer.add_callback(Clock())
    start = time.perf_counter()
    trainer.train()
    steps = [b - a for a, b in zip([start, *stamps], stamps, strict=False)][2:] or [
        time.perf_counter() - start
    ]
    step_s = sum(steps) / len(steps)
    resident = sum(r[1] for r in rows if r[3] == "all" and r[0] != "overhead")
    out = {
        **{k: case[k] for k in ("model", "method", "deepspeed", "batch", "seq", "ckpt")},
        "step_s": round(step_s, 3),
        "tokens_per_s": round(case["batch"] * case["seq"] / step_s, 1),
        "planned_gib": round(peak(rows) / GIB, 2),
        "planned_no_overhead_gib": round((peak(rows) - rows[-1][1]) / GIB, 2),
        "planned_resident_gib": round(resident / GIB, 2),
        "planned_rows_gib": {r[0]: round(r[1] / GIB, 3) for r in rows},
    }
    if gpu:
        free, total = torch.cuda.mem_get_info()
        out.update(
            peak_allocated_gib=round(torch.cuda.max_memory_allocated() / GIB, 2),
            peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GIB, 2),
            device_used_now_gib=round((total - free) / GIB, 2),
            device=torch.cuda.get_device_name(),
        )
        measured = out["peak_allocated_gib"]
    else:
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(peak_rss_delta_gib=round((max_rss - base) / GIB, 2), device="cpu")
        measured = out["peak_rss_delta_gib"]
    out["error_pct"] = round(100 * (out["planned_no_overhead_gib"] - measured) / max(measured, 1e-9), 1)
    return out


def child_env(case: dict[str, Any], port: int) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    env.update(
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", WANDB_MODE="disabled"
    )
    # Large blocks straight from mmap go back to the OS when freed, so RSS tracks live tensors (CPU runs).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    if case["deepspeed"]:  # one-process DeepSpeed without a launcher needs the torch.distributed variables
        env.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK="0",
            LOCAL_RANK="0",
            WORLD_SIZE="1",
            LOCAL_WORLD_SIZE="1",
        )
        env.setdefault("DS_ACCELERATOR", "cuda" if case["device"] == "cuda" else "cpu")
    return env


def markdown(results: list[dict[str, Any]]) -> str:
    head = (
        "| model | method | ZeRO | batch x seq | ckpt | step s | tokens/s | measured GiB | planned GiB "
        "(no overhead) | planned total | error |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['method']} | | | | | | failed: {r['error'][:80]} | | | |")
            continue
        measured = r.get("peak_allocated_gib", r.get("peak_rss_delta_gib"))
        zero = "3" if r["deepspeed"] else "-"
        lines.append(
            f"| {r['model']} | {r['method']} | {zero} | {r['batch']} x {r['seq']} | {r['ckpt']} | "
            f"{r['step_s']} | {r['tokens_per_s']} | {measured} | {r['planned_no_overhead_gib']} | "
            f"{r['planned_gib']} | {r['error_pct']:+}% |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("OUT", "outputs/gpu_check"))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--cpu-smoke", action="store_true", help="tiny config on the CPU: checks the script itself"
    )
    mode.add_argument("--cpu-measure", action="store_true", help="embedded model on the CPU: planner vs RSS")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--deadline-s", type=float, default=420, help="start no new case after this many seconds")
    p.add_argument("--case-timeout-s", type=float, default=240)
    p.add_argument("--run-case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_case:  # child process: one case, result as JSON on the last stdout line
        print("GPU_CHECK_RESULT " + json.dumps(run_case(json.loads(args.run_case))))
        return 0
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = SMOKE_CASES if args.cpu_smoke else MEASURE_CASES if args.cpu_measure else GPU_CASES
    if device == "cpu" and cases is GPU_CASES:
        print(
            "gpu_check: no CUDA GPU here; use --cpu-smoke (or --cpu-measure) on a CPU machine",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    for i, (model, method, ds, batch, seq, ckpt) in enumerate(cases):
        skip = "deadline reached" if time.perf_counter() - t0 > args.deadline_s else None
        if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
            skip = "bitsandbytes not installed (carry .whl/extra)"
        if skip:
            results.append({"model": model, "method": method, "error": f"skipped: {skip}"})
            continue
        case = {
            "model": model,
            "method": method,
            "deepspeed": ds,
            "batch": batch,
            "seq": seq,
            "ckpt": ckpt,
            "steps": args.steps,
            "device": device,
            "work": f"/tmp/gpu_check_runs/{i}",
        }
        print(
            f"[gpu_check] {model} {method} {ds or 'no DeepSpeed'} b={batch} s={seq} ckpt={ckpt}", flush=True
        )
        results.append(run_child(case, 29600 + i, args.case_timeout_s))
        (out / "gpu_check.json").write_text(json.dumps(results, indent=2) + "\n")  # partial results survive
        (out / "gpu_check.md").write_text(markdown(results))
        print(json.dumps(results[-1]), flush=True)
    print(markdown(results))
    return 0 if all("error" not in r for r in results) else 1


def run_child(case: dict[str, Any], port: int, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run-case", json.dumps(case)]
    try:
        proc = subprocess.run(
            cmd, env=child_env(case, port), capture_output=True, text=True, timeout=timeout, cwd=ROOT
        )
    except subprocess.TimeoutExpired:
        return {"model": case["model"], "method": case["method"], "error": f"timeout after {timeout:.0f}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("GPU_CHECK_RESULT "):
            return json.loads(line.split(" ", 1)[1])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": case["model"], "method": case["method"], "error": f"exit {proc.returncode}: {tail}"}


if __name__ == "__main__":
    sys.exit(main())
