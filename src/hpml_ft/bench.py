"""`python -m hpml_ft.bench train|generate ...`: step time, tokens/s and peak memory, as a markdown table.

train:    LoRA vs QLoRA vs full (vs DoRA) training steps on the same model and batch, each method in its own
          process so peak memory (RSS on CPU, allocator peak on GPU) is not polluted by the previous one.
generate: decoding speed with the KV cache on and off, and with prompt lookup decoding.
Results go to stdout and outputs/bench/<mode>-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from hpml_ft.errors import fail, run_cli

METHODS = ("lora", "qlora", "dora", "full")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m hpml_ft.bench", description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=["train", "generate", "_train_one"])
    p.add_argument("--model", default="embedded", help="'embedded', a model dir, or a cached hub id")
    p.add_argument("--methods", default="lora,qlora,full", help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=80, help="tokens per sample")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="outputs/bench")
    args = p.parse_args(argv)
    bad = [m for m in args.methods.split(",") if m not in METHODS]
    if bad:
        fail(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
    for name in ("steps", "batch", "seq", "new_tokens", "repeats"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def _peak_mib() -> float:
    import resource

    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def train_one(args: argparse.Namespace, method: str) -> dict[str, Any]:
    """A few optimizer steps of `method` on random tokens; runs in a fresh process (see `train`)."""
    import torch

    from hpml_ft.config import load_config
    from hpml_ft.model import build_model, count_parameters, wrap_peft

    cfg = load_config(
        None, ["train.max_steps=1", f"model.name_or_path={args.model}", f"peft.method={method}"]
    )
    model = wrap_peft(build_model(cfg), cfg)
    model.train()
    loaded = _peak_mib()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if step:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - start)
    step_s = sum(times) / len(times)
    trainable, total = count_parameters(model)
    return {
        "method": method,
        "step_s": round(step_s, 3),
        "tokens_per_s": round(args.batch * args.seq / step_s, 1),
        "peak_mib": round(_peak_mib(), 1),
        "after_load_mib": round(loaded, 1),
        "trainable": trainable,
        "total": total,
        "loss": round(loss.item(), 4),
    }


def train(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for method in args.methods.split(","):
        cmd = [
            sys.executable,
            "-m",
            "hpml_ft.bench",
            "_train_one",
            "--methods",
            method,
            "--model",
            args.model,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            last = (res.stderr.strip().splitlines() or ["?"])[-1]
            rows.append({"method": method, "error": last[:200]})
            continue
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(f"[bench] {method}: {rows[-1]}", file=sys.stderr)
    return rows


def generate_bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    from hpml_ft.generation import generate
    from hpml_ft.model import load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    model, tok = AutoModelForCausalLM.from_pretrained(path), load_tokenizer(path)
    # a prompt the answer copies from, so prompt lookup has something to find
    text = "Repeat this list exactly: " + ", ".join(f"item {i} costs {i * 7} dollars" for i in range(12))
    prompts = [[{"role": "user", "content": text}]] * args.repeats
    variants = {
        "kv_cache": {},
        "no_cache": {"use_cache": False},
        "prompt_lookup_10": {"prompt_lookup_num_tokens": 10},
    }
    rows = []
    for name, kwargs in variants.items():
        outs, speed = generate(
            model, tok, prompts, args.new_tokens, batch_size=1, min_new_tokens=args.new_tokens, **kwargs
        )
        rows.append(
            {
                "variant": name,
                "tokens_per_s": round(speed["tokens_per_s"], 1),
                "new_tokens": speed["new_tokens"],
                "seconds": round(speed["seconds"], 2),
                "same_as_kv_cache": outs == rows[0]["_outs"] if rows else True,
                "_outs": outs,
            }
        )
    for r in rows:
        r.pop("_outs")
    return rows


def to_markdown(rows: list[dict[str, Any]]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "_train_one":
        print(json.dumps(train_one(args, args.methods)))
        return 0
    rows = train(args) if args.mode == "train" else generate_bench(args)
    import torch

    machine = (
        torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"CPU x{torch.get_num_threads()} threads"
    )
    header = (
        f"`python -m hpml_ft.bench {' '.join(argv if argv is not None else sys.argv[1:])}` on {machine} "
        f"({platform.machine()}), {time.strftime('%Y-%m-%d')}, torch {torch.__version__}"
    )
    md = f"{header}\n\n{to_markdown(rows)}\n"
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"{args.mode}-{stamp}.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2))
    (out / f"{args.mode}-{stamp}.md").write_text(md)
    return 0


if __name__ == "__main__":
    run_cli(main)
