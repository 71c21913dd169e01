"""Load time, tokens/s, ms/token and peak memory of one model dir, measured in a fresh process so that the
peak memory is this model's alone: `python -m hpml_ft.quant.measure DIR [--prompts FILE] [--prompt-lookup N]`
prints one JSON line."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from hpml_ft.errors import run_cli
from hpml_ft.generation import generate
from hpml_ft.model import load_causal_lm, load_tokenizer
from hpml_ft.quant.ptq import dir_size_mib, packed_size_mib
from hpml_ft.system.measure import peak_memory, reset_device_peak, run_json_worker

DEFAULT_PROMPTS = [
    "List three uses of a paperclip.",
    "Extract the number from the sentence. Reply with the number only.\n\nAmir packed 42 boxes of pears.",
    "Write one sentence about the sea.",
    "Sort these words alphabetically: pear, fig, apple, kiwi.",
]


def measure(path: str, prompts: list[list[dict]], max_new_tokens: int = 64, prompt_lookup: int = 0) -> dict:
    """Greedy generation over `prompts` (batch 1, the decode regime low-bit kernels target)."""

    start = time.perf_counter()
    tok = load_tokenizer(path)
    model = load_causal_lm(path)
    load_s = time.perf_counter() - start
    extra: dict[str, Any] = {"prompt_lookup_num_tokens": prompt_lookup} if prompt_lookup else {}
    reset_device_peak()
    texts, speed = generate(model, tok, prompts, max_new_tokens, batch_size=1, **extra)
    return {
        "path": path,
        "size_on_disk_mib": dir_size_mib(path),
        "packed_weights_mib": packed_size_mib(model),
        "load_s": round(load_s, 2),
        "tokens_per_s": round(speed["tokens_per_s"], 2),
        "ms_per_token": round(1000 * speed["seconds"] / max(speed["new_tokens"], 1), 2),
        "new_tokens": speed["new_tokens"],
        **peak_memory(),
        "texts": texts,
    }


def measure_in_subprocess(path: str, prompts: list[list[dict]] | None = None, prompt_lookup: int = 0) -> dict:
    prompts = prompts or [[{"role": "user", "content": p}] for p in DEFAULT_PROMPTS]
    args = ["hpml_ft.quant.measure", path, "--prompt-lookup", str(prompt_lookup), "--prompts"]
    return run_json_worker(args, prompts, f"measuring {path}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpml_ft.quant.measure", description=__doc__.splitlines()[0])
    p.add_argument("path")
    p.add_argument("--prompts", help="a JSON list of chat prompts (lists of messages)")
    p.add_argument("--prompt-lookup", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args(argv)
    prompts = (
        json.loads(Path(args.prompts).read_text())
        if args.prompts
        else [[{"role": "user", "content": t}] for t in DEFAULT_PROMPTS]
    )
    print(json.dumps(measure(args.path, prompts, args.max_new_tokens, args.prompt_lookup)))
    return 0


if __name__ == "__main__":
    run_cli(main)
