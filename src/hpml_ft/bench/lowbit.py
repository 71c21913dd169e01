"""`python -m hpml_ft.bench lowbit --model RUN_OR_MODEL --bits 2 [--qat RUN] [--data FILE | --safety FILE]`.

One table on one eval set: fp32 and bf16 (--model as is), PTQ int8 / int4 / int<bits> (torchao weight-only,
portable format, made here from --model), PTQ int4 in this device's fast format (cpu-int4pack on a CPU,
cuda-tinygemm on a GPU), QAT int<bits> (the merged/ low-bit model of --qat RUN) and QAT + prompt lookup
decoding. Columns: accuracy (exact match at batch 1; safety: accuracy), ms/token and tokens/s (greedy) at
batch 1 and batch 8 (8 prompts at a time, left-padded: throughput), batch-1 speed over fp32's, size on disk,
packed weight size, peak memory; each model runs in a fresh process so its peak memory is its own. Writes
results.json, results.md and lowbit.png; recovery = (QAT - PTQ) / (fp32 - PTQ) at --bits.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from hpml_ft.bench.lowbit_report import write_report
from hpml_ft.bench.report import add_docs_args, check_docs, docs_block, header_line, metadata, write_docs
from hpml_ft.config import DataConfig, ModelConfig
from hpml_ft.config import runtime as rt
from hpml_ft.data import load_samples, load_splits
from hpml_ft.errors import ArgumentParser, fail, run_cli
from hpml_ft.eval.safety import is_guard_template, load_safety_file, prompts_for, score
from hpml_ft.generation import generate
from hpml_ft.lowbit_kernels import INT4PACK_GROUPS, PORTABLE
from hpml_ft.model import load_causal_lm, load_tokenizer
from hpml_ft.outputs import check_output_target
from hpml_ft.quant.ptq import (
    check_spec,
    check_torchao,
    default_target,
    dir_size_mib,
    packed_size_mib,
    quantize_dir,
    resolve_format,
)
from hpml_ft.runs import standalone_dir
from hpml_ft.scoring import score_samples
from hpml_ft.system.measure import peak_memory, run_json_worker

BATCH = 8  # the batched speed columns


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m hpml_ft.bench lowbit",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "--model", default="embedded", help="the full-precision model: run dir, model dir, embedded"
    )
    p.add_argument(
        "--bits",
        type=int,
        default=rt.LOWBIT_BITS,
        help=f"bits of the PTQ/QAT rows compared (default {rt.LOWBIT_BITS})",
    )
    p.add_argument("--qat", help="a finished QAT run (recipe with quant:); its merged/ is the QAT row")
    p.add_argument("--group-size", type=int, default=rt.LOWBIT_GROUP_SIZE)
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--data", help="a .json/.jsonl eval file (alpaca, chat, TAT-QA); default: demo eval split"
    )
    src.add_argument("--safety", help="a ToxicChat-format file: safe/unsafe accuracy instead of exact match")
    p.add_argument("--format", default="auto", choices=["auto", "alpaca", "chat", "tatqa"])
    p.add_argument(
        "--limit", type=int, default=rt.LOWBIT_LIMIT, help=f"eval samples (default {rt.LOWBIT_LIMIT})"
    )
    p.add_argument("--max-new-tokens", type=int, default=rt.LOWBIT_MAX_NEW_TOKENS)
    p.add_argument(
        "--prompt-lookup",
        type=int,
        default=rt.PROMPT_LOOKUP_TOKENS,
        help=f"prompt lookup n-gram tokens (default {rt.PROMPT_LOOKUP_TOKENS})",
    )
    p.add_argument("--out", help="result folder (default outputs/bench/lowbit-<date-time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    add_docs_args(p)
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: evaluate one model in this process
    return p.parse_args(argv)


def load_items(args: argparse.Namespace) -> tuple[str, list[dict]]:
    """(kind, items): safety rows, or QA samples from --data or the demo eval split."""
    if args.safety:
        return "safety", load_safety_file(args.safety)[: args.limit]
    if args.data:
        samples, fmt = load_samples(args.data, args.format)
    else:
        splits = load_splits(DataConfig())
        samples, fmt = splits.eval, splits.format
    return fmt, [{"messages": s["messages"], "meta": s.get("meta", {})} for s in samples[: args.limit]]


def evaluate_one(job: dict[str, Any]) -> dict[str, Any]:
    """In the worker process: load, answer every item greedily at batch 1, score, measure."""

    path, kind, items = job["path"], job["kind"], job["items"]
    start = time.perf_counter()
    tok, model = load_tokenizer(path), load_causal_lm(path, ModelConfig(dtype=job.get("dtype", "auto")))
    load_s = time.perf_counter() - start
    if kind == "safety":
        prompts = prompts_for(items, is_guard_template(tok.chat_template))
    else:
        prompts = [s["messages"][:-1] for s in items]
    extra = {"prompt_lookup_num_tokens": job["prompt_lookup"]} if job["prompt_lookup"] else {}
    preds, speed = generate(model, tok, prompts, job["max_new_tokens"], batch_size=1, **extra)
    batched = {}
    if not job["prompt_lookup"]:  # prompt lookup decoding runs at batch 1 only
        speed8 = generate(model, tok, prompts, job["max_new_tokens"], batch_size=BATCH)[1]
        batched = {
            "ms_per_token_b8": round(1000 * speed8["seconds"] / max(speed8["new_tokens"], 1), 2),
            "tokens_per_s_b8": round(speed8["tokens_per_s"], 2),
        }
    if kind == "safety":
        metrics = score(items, preds)[1]
    else:
        rows, scored = score_samples(items, preds, kind)  # the one scoring path
        metrics = {
            "exact_match": scored["exact_match"],
            "f1": scored["f1"],
            "accuracy": scored["exact_match"],
            "correct": [float(r["em"]) for r in rows],  # per question: the recovery's interval
        }
    return {
        **metrics,
        "ms_per_token": round(1000 * speed["seconds"] / max(speed["new_tokens"], 1), 2),
        "tokens_per_s": round(speed["tokens_per_s"], 2),
        **batched,
        "load_s": round(load_s, 2),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "size_on_disk_mib": dir_size_mib(path),
        "packed_weights_mib": packed_size_mib(model),
        **peak_memory(),
        "examples": preds[:3],
    }


def run_worker(job: dict[str, Any]) -> dict[str, Any]:
    return run_json_worker(["hpml_ft.bench.lowbit", "--worker"], job, f"evaluating {job['path']}")


def plan_rows(args: argparse.Namespace, fp: str, out: Path) -> list[dict[str, Any]]:
    """(name, path, load dtype, prompt lookup, PTQ bits and format to make) for every row of the table."""
    rows = [
        {"name": "fp32", "path": fp, "lookup": 0, "dtype": "float32"},
        {"name": "bf16", "path": fp, "lookup": 0, "dtype": "bfloat16"},
    ]
    fast = (
        [resolve_format(4, args.group_size, default_target(), "fast")]
        if args.group_size in INT4PACK_GROUPS
        else []
    )
    for b in sorted({8, 4, args.bits}, reverse=True):
        for fmt in [PORTABLE, *fast] if b == 4 else [PORTABLE]:
            name, folder = (f"PTQ int{b}", f"ptq_int{b}") if fmt == PORTABLE else (f"PTQ int4 {fmt}", fmt)
            rows.append(
                {"name": name, "path": str(out / "models" / folder), "lookup": 0, "ptq": b, "fmt": fmt}
            )
    if args.qat:
        qat = standalone_dir(args.qat, "--qat")
        bits = json.loads((Path(qat) / "hpml_ft.json").read_text()).get("quantization", {}).get("bits")
        if bits is None:
            fail(f"--qat {args.qat}: {qat} is not a low-bit model (no quantization record); pass a QAT run")
        rows.append({"name": f"QAT int{bits}", "path": qat, "lookup": 0, "qat_bits": bits})
        rows.append(
            {
                "name": f"QAT int{bits} + prompt lookup",
                "path": qat,
                "lookup": args.prompt_lookup,
                "qat_bits": bits,
            }
        )
    return rows


def recovery(results: list[dict], bits: int) -> dict[str, float] | None:
    """(QAT - PTQ) / (fp32 - PTQ) at `bits` with its paired bootstrap interval over the questions (exact match);
    None without a QAT row, for safety accuracy, or when fp32 == PTQ."""
    from hpml_ft.eval.stats import recovery_interval

    per = {r["name"]: r.get("correct") for r in results}
    full, ptq, qat = per.get("fp32"), per.get(f"PTQ int{bits}"), per.get(f"QAT int{bits}")
    if None in (full, ptq, qat):
        return None
    rec = recovery_interval(full, ptq, qat)
    return {k: round(v, 3) for k, v in rec.items()} if rec else None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(evaluate_one(json.loads(Path(args.worker).read_text()))))
        return 0
    block = docs_block("lowbit", args.docs_tag)
    if args.docs:  # a doc without its markers fails now, not after the benchmark
        check_docs(args.docs, [block])
    check_spec(args.bits, args.group_size)
    for name in ("limit", "max_new_tokens"):
        if getattr(args, name) <= 0:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    check_torchao()
    fp = standalone_dir(args.model, "bench lowbit")
    kind, items = load_items(args)
    if not items:
        fail("the eval set is empty; pass --data or --safety with records")
    out = Path(args.out or f"outputs/bench/lowbit-{time.strftime('%Y%m%d-%H%M%S')}")
    inputs = [args.model, fp, args.qat, args.data, args.safety]
    check_output_target(out, "--out", inputs, args.overwrite)  # its models/ are reused by a rerun
    rows = plan_rows(args, fp, out)
    results = []
    for row in rows:
        if "ptq" in row and not Path(row["path"]).is_dir():
            quantize_dir(fp, Path(row["path"]), row["ptq"], args.group_size, fmt=row["fmt"])
        job = {"path": row["path"], "kind": kind, "items": items, "prompt_lookup": row["lookup"]}
        job["dtype"] = row.get("dtype", "auto")
        print(f"[hpml_ft] {row['name']}: {row['path']}", file=sys.stderr)
        results.append(
            {
                "name": row["name"],
                "path": row["path"],
                **run_worker({**job, "max_new_tokens": args.max_new_tokens}),
            }
        )
    base = next(r["tokens_per_s"] for r in results if r["name"] == "fp32")
    for r in results:
        r["speedup_b1"] = round(r["tokens_per_s"] / max(base, 1e-9), 2)
    summary = {"kind": kind, "n": len(items), "bits": args.bits, "recovery": recovery(results, args.bits)}
    md = write_report(out, summary, results, header_line(metadata(["lowbit", *argv])))
    print(md + f"\n[hpml_ft] {out}/results.json, results.md, lowbit.png")
    if args.docs:
        write_docs(args.docs, {block: md})
    return 0


if __name__ == "__main__":
    run_cli(main)
