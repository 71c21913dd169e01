"""Arguments and dispatch for `python -m hpml_ft.bench train|generate|lowbit|all` (heavy imports stay lazy)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hpml_ft.bench.report import (
    add_docs_args,
    check_docs,
    docs_block,
    metadata,
    write_docs,
    write_results,
)
from hpml_ft.config import TRAIN_METHODS, load_config
from hpml_ft.config import runtime as rt
from hpml_ft.errors import ArgumentParser, fail
from hpml_ft.outputs import check_output_target, write_text_atomic
from hpml_ft.runs import base_model_path, standalone_dir
from hpml_ft.system.measure import print_json_line

METHODS = TRAIN_METHODS
ON_OFF = {"off": False, "on": True}
USAGE = """python -m hpml_ft.bench train     [--recipe R] [overrides] [--methods ...] [--packing off,on] ...
python -m hpml_ft.bench generate  [--model embedded|DIR|RUN] [--batches 1,16] [--in-tokens 256] ...
python -m hpml_ft.bench lowbit    ... (hpml_ft.bench.lowbit: PTQ / QAT low-bit models)
python -m hpml_ft.bench all       [--out DIR]   (the docs/performance.md tables, CPU defaults)
any of them + --docs FILE [--docs-tag TAG]: write the tables into FILE between <!-- bench:KIND[:TAG] --> markers"""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", help="result folder (default outputs/bench/<bench>-<date-time>)")
    p.add_argument("--profile", action="store_true", help="torch.profiler Chrome trace + top-15 operators")
    p.add_argument("--repeats", type=int, default=rt.BENCH_REPEATS, help="generate: timed repeats (median)")
    add_docs_args(p)


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "overrides", nargs="*", help="dotted recipe overrides, e.g. data.path=FILE data.max_samples=64"
    )
    p.add_argument("--recipe", help="recipe YAML (default: the built-in defaults: demo data, embedded model)")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {', '.join(METHODS)}")
    p.add_argument("--checkpointing", default="off,on", help="gradient checkpointing values: off,on")
    p.add_argument(
        "--packing",
        default="off,on,free",
        help="off (padded), on (bfd packing: train.packing), free (each batch packed: train.padding_free)",
    )
    p.add_argument("--liger", default="auto", help="Liger kernels: off,on (auto: on too when installed)")
    p.add_argument("--grid", action="store_true", help="every combination (default: one axis at a time)")
    p.add_argument("--steps", type=int, default=rt.BENCH_STEPS, help="timed optimizer steps (median)")
    p.add_argument("--warmup", type=int, default=rt.BENCH_WARMUP, help="untimed optimizer steps first")
    p.add_argument("--batch", type=int, help="per-device batch (default: the recipe's)")


def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="embedded", help="'embedded', a model dir or a run dir (its merged/)")
    p.add_argument("--batches", default=rt.BENCH_BATCHES, help="batch sizes")
    p.add_argument(
        "--in-tokens",
        type=int,
        default=rt.BENCH_IN_TOKENS,
        help="prompt length in tokens (synthetic prompts)",
    )
    p.add_argument("--out-tokens", type=int, default=rt.BENCH_OUT_TOKENS, help="generated tokens (forced)")
    p.add_argument("--data", help="a TAT-QA .json file for the grounded prompts (default: synthetic tables)")
    p.add_argument("--static", default="auto", choices=["auto", "on", "off"], help="static cache + compile")
    p.add_argument("--lookup", type=int, default=rt.PROMPT_LOOKUP_TOKENS, help="prompt lookup n-gram tokens")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hpml_ft.bench", description=__doc__.splitlines()[0], usage=USAGE)
    sub = p.add_subparsers(dest="bench", required=True, parser_class=ArgumentParser)
    tr = sub.add_parser("train", help="SFTTrainer steps: methods x checkpointing x packing x Liger")
    _train_args(tr)
    _common(tr)
    ge = sub.add_parser("generate", help="KV cache, static cache + compile, prompt lookup")
    _generate_args(ge)
    _common(ge)
    al = sub.add_parser("all", help="train + generate with CPU defaults; writes performance.md")
    _train_args(al)
    _generate_args(al)
    _common(al)
    # CPU-sized: KV cache off at batch 16 x 256/32 alone takes >10 min on 2 cores (a full forward per token);
    # on a GPU pass --batches 1,16 --out-tokens 32 --repeats 3 for the reference setup
    al.set_defaults(batches="1,4", out_tokens=16, repeats=2)
    sub.add_parser("lowbit", help="low-bit (PTQ/QAT) models: see python -m hpml_ft.bench lowbit --help")
    args, extra = p.parse_known_args(argv)
    # dotted overrides may come after options too (`--methods lora data.path=X`), as they do for train
    stray = [a for a in extra if a.startswith("-") or "=" not in a or not hasattr(args, "overrides")]
    if stray:
        p.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    return check_args(args)


def _values(args: argparse.Namespace, name: str) -> list[bool]:
    raw = getattr(args, name)
    if name == "liger" and raw == "auto":
        from hpml_ft.bench.train import liger_installed  # lazy: bench.train imports transformers

        return [False, True] if liger_installed() else [False]
    allowed = {**ON_OFF, "free": "free"} if name == "packing" else ON_OFF
    bad = [v for v in raw.split(",") if v not in allowed]
    if bad:
        fail(f"--{name}: unknown {bad}; use a comma list of {', '.join(allowed)}")
    return [allowed[v] for v in raw.split(",")]


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    for name in ("steps", "warmup", "batch", "repeats", "in_tokens", "out_tokens", "lookup"):
        value = getattr(args, name, None)
        if value is not None and value <= 0 and not (name == "warmup" and value == 0):
            fail(f"--{name.replace('_', '-')} must be positive, got {value}")
    if hasattr(args, "methods"):
        methods = args.methods.split(",")
        bad = [m for m in methods if m not in METHODS]
        if bad:
            fail(f"--methods: unknown {bad}; choose from {', '.join(METHODS)}")
        args.methods = methods
        for name in ("checkpointing", "packing", "liger"):
            setattr(args, name, _values(args, name))
    if hasattr(args, "batches"):
        try:
            args.batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            fail(f"--batches must be a comma list of integers, got {args.batches!r}")
        if min(args.batches) <= 0:
            fail(f"--batches must be positive, got {args.batches}")
        if args.data and not Path(args.data).is_file():
            fail(f"--data file not found: {args.data}; pass a TAT-QA .json file or leave it out")
    return args


def out_dir(args: argparse.Namespace) -> Path:
    out = Path(args.out or f"outputs/bench/{args.bench}-{time.strftime('%Y%m%d-%H%M%S')}")
    if out.is_dir() and (out / "results.json").exists():
        fail(f"--out {out} already holds bench results; pass another --out")
    return check_output_target(out, "--out")


def check_inputs(args: argparse.Namespace) -> None:
    """Recipe, overrides and model names: fail in one line before any work."""
    if args.bench in ("train", "all"):
        from hpml_ft.bench.train import overrides_for, plan_configs  # lazy: imports transformers

        for c in plan_configs(args):  # every configuration's recipe must validate
            cfg = load_config(args.recipe, overrides_for(args, c, "outputs"))
        base_model_path(cfg.model.name_or_path)
    if args.bench in ("generate", "all"):
        standalone_dir(args.model, "bench generate")


def run_bench(
    kind: str, args: argparse.Namespace, out: Path, argv: list[str]
) -> tuple[str, list[dict[str, Any]]]:
    if kind == "train":
        from hpml_ft.bench.train import COLUMNS, run  # lazy: imports transformers

        rows, notes = run(args, out)
        chart = ("config", [("tokens_per_s", "non-padding tokens/s"), ("peak_mib", "peak memory MiB")])
    else:
        from hpml_ft.bench.generate import COLUMNS, run  # lazy: same names as the train branch

        rows, notes = run(args, out)
        for r in rows:
            r["label"] = f"{r['variant']} {r['prompts']} b{r['batch']}"
        chart = ("label", [("latency_s", "latency s"), ("tokens_per_s", "generated tokens/s")])
    md = write_results(out, kind, rows, metadata(argv), COLUMNS, chart, notes)
    print(md)
    return md, rows


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["lowbit"]:
        try:
            from hpml_ft.bench.lowbit import main as lowbit_main
        except ImportError as err:
            fail(
                f"bench lowbit needs hpml_ft.bench.lowbit, which is not available here ({err}); reinstall hpml_ft"
            )
        return lowbit_main(argv[1:])
    if argv[:1] == ["_train_worker"]:  # internal: one training configuration in this process
        import json

        from hpml_ft.bench.train import measure  # lazy: imports transformers

        print_json_line(measure(json.loads(Path(argv[1]).read_text())))
        return 0
    args = parse_args(argv)
    kinds = ["train", "generate"] if args.bench == "all" else [args.bench]
    if args.docs:  # a doc without its markers fails now, not after the benchmark
        check_docs(args.docs, [docs_block(k, args.docs_tag) for k in kinds])
    out = out_dir(args)
    check_inputs(args)
    failed, parts, tables = [], [], {}
    for kind in kinds:
        md, rows = run_bench(kind, args, out / kind if args.bench == "all" else out, argv)
        parts.append(f"### {kind}\n\n{md}")
        tables[docs_block(kind, args.docs_tag)] = md
        failed += [
            f"{kind} {r.get('config') or r.get('label')}: {r['status']}"
            for r in rows
            if str(r.get("status", "")).startswith("error")
        ]
    if args.bench == "all":
        write_text_atomic(out / "performance.md", "\n".join(parts))
        print(f"[bench] all tables: {out / 'performance.md'}", file=sys.stderr)
    print(f"[bench] results in {out}", file=sys.stderr)
    if failed:
        print("error: some configurations failed:\n  " + "\n  ".join(failed), file=sys.stderr)
        if args.docs:
            print(
                f"[bench] {args.docs} left as it was (a table with failed rows is not written)",
                file=sys.stderr,
            )
        return 1
    if args.docs:
        write_docs(args.docs, tables)
    return 0
