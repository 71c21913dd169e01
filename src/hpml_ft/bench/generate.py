"""`bench generate`: KV cache on/off, static cache + torch.compile, prompt lookup decoding on input-grounded vs
open-ended prompts; time-to-first-token, latency, tokens/s, peak memory; medians over repeats after warm-up."""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from hpml_ft.bench.report import profiled
from hpml_ft.data import load_samples
from hpml_ft.generation import generate
from hpml_ft.model import load_causal_lm, load_tokenizer
from hpml_ft.runs import standalone_dir
from hpml_ft.system.measure import PeakRSS

COLUMNS = [
    "variant",
    "prompts",
    "batch",
    "in_tokens",
    "out_tokens",
    "ttft_s",
    "latency_s",
    "tokens_per_s",
    "peak_mib",
    "same_as_kv_cache",
    "status",
]
ITEMS = [
    "Revenue",
    "Cost of sales",
    "Gross profit",
    "Operating expenses",
    "Net income",
    "Total assets",
    "Cash and equivalents",
    "Inventories",
    "Deferred revenue",
    "Long-term debt",
    "Capital expenditure",
]
WORDS = [
    "the",
    "river",
    "city",
    "morning",
    "lantern",
    "quiet",
    "harbor",
    "old",
    "friend",
    "letter",
    "winter",
    "garden",
    "road",
    "music",
    "story",
    "small",
    "bright",
    "window",
    "evening",
    "train",
    "mountain",
]


def grounded_prompt(rng: random.Random, rows: int) -> list[dict]:
    """A TAT-QA-like question whose answer is copied verbatim from the table (prompt lookup has it to find)."""
    years = ["2019", "2018", "2017"]
    lines = ["| | " + " | ".join(years) + " |", "|---|---|---|---|"]
    facts = []
    for i in range(rows):
        name = f"{ITEMS[i % len(ITEMS)]} ({chr(65 + i // len(ITEMS))})"
        vals = [f"{rng.randint(1000, 99999):,}.{rng.randint(0, 9)}" for _ in years]
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
        facts.append((name, vals))
    name, vals = facts[rng.randrange(len(facts))]
    q = (
        "Table (in thousands):\n" + "\n".join(lines) + f"\n\nQuestion: copy the row '{name}' of the table "
        "exactly, values for every year with their year, then nothing else."
    )
    return [{"role": "user", "content": q}]


def open_prompt(rng: random.Random, words: int) -> list[dict]:
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    return [{"role": "user", "content": f"Notes: {text}\n\nWrite a new short story inspired by these notes."}]


def tatqa_prompts(path: str) -> list[list[dict]]:
    samples, _ = load_samples(path, "tatqa")
    return [s["messages"][:-1] for s in samples]


def n_tokens(tok: Any, msgs: list[dict]) -> int:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def sized_prompts(kind: str, tok: Any, n: int, in_tokens: int, seed: int) -> list[list[dict]]:
    """n prompts of about `in_tokens` chat-template tokens (the table or notes grow until they reach it)."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        size = 1
        while True:
            msgs = grounded_prompt(rng, size) if kind == "grounded" else open_prompt(rng, size * 8)
            if n_tokens(tok, msgs) >= in_tokens or size > 400:
                break
            size += 1
        out.append(msgs)
    return out


def timed_generate(
    model: Any, tok: Any, prompts: list, new: int, batch: int, kw: dict
) -> tuple[list[str], float, float]:
    """(outputs, seconds, peak MiB) of one pass over the prompts with the project's generation path."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with PeakRSS() as rss:
        start = time.perf_counter()
        outs, _ = generate(model, tok, prompts, new, batch_size=batch, min_new_tokens=new, **kw)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        secs = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else rss.peak
    return outs, secs, peak


def measure(
    model: Any, tok: Any, prompts: list, args: argparse.Namespace, batch: int, kw: dict
) -> dict[str, Any]:
    prompts = prompts[:batch]
    timed_generate(model, tok, prompts, min(args.out_tokens, 4), batch, kw)  # warm-up (compiles, if any)
    ttft = [timed_generate(model, tok, prompts, 1, batch, kw)[1] for _ in range(args.repeats)]
    runs = [timed_generate(model, tok, prompts, args.out_tokens, batch, kw) for _ in range(args.repeats)]
    latency = statistics.median(r[1] for r in runs)
    return {
        "batch": batch,
        "ttft_s": round(statistics.median(ttft), 4),
        "latency_s": round(latency, 3),
        "tokens_per_s": round(batch * args.out_tokens / latency, 1),
        "peak_mib": round(max(r[2] for r in runs), 1),
        "_outs": runs[-1][0],
    }


def static_skip_reason(mode: str) -> str | None:
    import torch

    if mode == "off":
        return "skipped: --static off"
    if mode == "auto" and not torch.cuda.is_available():
        return "skipped: CPU (torch.compile of the decode step takes minutes here and rarely pays off; --static on tries it)"
    return None


def variants(args: argparse.Namespace) -> list[tuple[str, str, int, dict[str, Any]]]:
    """(name, prompt kind, batch, generate kwargs). Prompt lookup runs at batch 1 (transformers' limit)."""
    out = []
    for b in args.batches:
        out += [("kv_cache", "grounded", b, {}), ("no_cache", "grounded", b, {"use_cache": False})]
        out.append(("static_compile", "grounded", b, {"cache_implementation": "static"}))
    for kind in ("grounded", "open"):
        out += [
            ("kv_cache", kind, 1, {}),
            ("prompt_lookup", kind, 1, {"prompt_lookup_num_tokens": args.lookup}),
        ]
    seen, uniq = set(), []
    for v in out:
        if (v[0], v[1], v[2]) not in seen:
            seen.add((v[0], v[1], v[2]))
            uniq.append(v)
    return uniq


def run(args: argparse.Namespace, out: Path) -> tuple[list[dict[str, Any]], list[str]]:
    path = standalone_dir(args.model, "bench generate")
    model, tok = load_causal_lm(path), load_tokenizer(path)
    n = max(args.batches)
    pool = {
        "grounded": tatqa_prompts(args.data)[:n]
        if args.data
        else sized_prompts("grounded", tok, n, args.in_tokens, 0),
        "open": sized_prompts("open", tok, n, args.in_tokens, 1),
    }
    rows, base = [], {}
    for name, kind, batch, kw in variants(args):
        row: dict[str, Any] = {
            "variant": name,
            "prompts": kind,
            "batch": batch,
            "out_tokens": args.out_tokens,
        }
        row["in_tokens"] = round(statistics.mean(n_tokens(tok, p) for p in pool[kind][:batch]))
        skip = static_skip_reason(args.static) if name == "static_compile" else None
        if skip:
            rows.append({**row, "status": skip})
            continue
        print(f"[bench] generate {name} {kind} batch {batch} ...", file=sys.stderr)
        try:
            row.update(measure(model, tok, pool[kind], args, batch, kw))
            if args.profile:
                with profiled(out, f"{name}-{kind}-b{batch}"):
                    timed_generate(model, tok, pool[kind][:batch], args.out_tokens, batch, kw)
            row["status"] = "ok"
        except Exception as err:  # noqa: BLE001 - one variant failing is a result row, and a non-zero exit
            row["status"] = (
                f"error: {type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
            )
        outs = row.pop("_outs", None)
        if outs is not None:
            key = (kind, batch)
            base.setdefault(key, outs) if name == "kv_cache" else None
            row["same_as_kv_cache"] = outs == base[key] if key in base else None
        rows.append(row)
    notes = [
        f"greedy, {args.out_tokens} new tokens forced (min_new_tokens), {args.repeats} repeats after one warm-up; "
        "medians. TTFT = a 1-token generate (prefill + first token). tokens/s = batch x new tokens / latency.",
        "peak memory: GPU allocator peak, else the process peak RSS while generating (includes the weights).",
        "grounded prompts ask to copy a table row (prompt lookup finds the answer in the input); open prompts ask for new text.",
    ]
    return rows, notes
