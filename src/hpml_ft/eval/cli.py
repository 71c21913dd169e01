"""`python -m hpml_ft.eval --models base,outputs/run_a,DIR [--data PATH | --recipe RECIPE | --ifeval [PATH]]`.

Answers every eval prompt with each model (batched, progress bar), scores them and writes one folder:
results.json, results.md (comparison table), predictions/<model>.jsonl and, for TAT-QA,
predictions/<model>.official.json ({uid: [answer, scale]}, the official scorer's input).

Data: --data (all of it), --recipe (its eval split), --ifeval (instruction following; default IFBench), or by
default the eval split of the latest finished run's recipe. Models: 'base' (the base model of the recipe / run
in play, else the embedded one), 'embedded', a run dir (its merged/ model, or base + adapter when it was
trained with train.merge=false), a model or adapter dir, or a cached hub id; default: base and the latest
finished run. Add --judge PATH or --judge-url URL for a 1-5 LLM-as-judge score.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from hpml_ft.config import DTYPE_CHOICES
from hpml_ft.config import runtime as rt
from hpml_ft.config.schema import SAFE_NAME
from hpml_ft.errors import ArgumentParser, fail, positive_float, positive_int
from hpml_ft.eval.answers import Voting, answer_all, load_tokenizers, score_all
from hpml_ft.eval.judge import add_judge_args, judge_rows, judge_spec_from_args, summarize_rows
from hpml_ft.eval.report import write_results
from hpml_ft.eval.tasks import load_task, resolve_models
from hpml_ft.outputs import check_not_input, check_output_target
from hpml_ft.runs import model_config
from hpml_ft.system.threads import apply_cpu_threads


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m hpml_ft.eval",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--models", help="comma-separated model specs (see below); default: base,<latest run>")
    p.add_argument(
        "--labels",
        type=model_labels,
        help="comma-separated names for the models, one per --models entry, in results and prediction files\n"
        "(default: from each path: outputs/run/merged -> run)",
    )
    _data_args(p)
    _run_args(p)
    add_judge_args(p)
    return p.parse_args(argv)


def _data_args(p: argparse.ArgumentParser) -> None:
    """What to evaluate on: one source, and how --data records become prompts."""
    src = p.add_mutually_exclusive_group()
    src.add_argument("--data", help="a .json/.jsonl file (alpaca, chat or TAT-QA); every record is evaluated")
    src.add_argument("--recipe", help="a recipe YAML: evaluate on its eval split, 'base' is its model")
    src.add_argument(
        "--ifeval",
        nargs="?",
        const="ifbench",
        metavar="PATH",
        help="instruction following on an IFEval-format JSONL (no PATH: IFBench test set)",
    )
    src.add_argument(
        "--safety", metavar="FILE", help="safe/unsafe classification on a ToxicChat-format CSV/JSON/JSONL"
    )
    p.add_argument(
        "--format", default="auto", choices=["auto", "alpaca", "chat", "tatqa"], help="format of --data"
    )
    p.add_argument("--system-prompt", help="system prompt for --data samples (default: the format's own)")
    p.add_argument(
        "--tatqa-target",
        default="answer",
        choices=["answer", "derivation", "extract"],
        help="TAT-QA --data prompts as trained with data.tatqa_target (default answer); --recipe/runs use theirs",
    )
    p.add_argument(
        "--tatqa-table", default="pipe", choices=["pipe", "cells"], help="TAT-QA --data table rendering"
    )
    p.add_argument("--limit", type=int, help="evaluate the first N samples only")


def _run_args(p: argparse.ArgumentParser) -> None:
    """How to generate and where results go."""
    p.add_argument(
        "--batch-size",
        type=int,
        default=rt.EVAL_BATCH_SIZE,
        help=f"generation batch size (default {rt.EVAL_BATCH_SIZE})",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"answer length (default {rt.EVAL_MAX_NEW_TOKENS}; {rt.IFEVAL_MAX_NEW_TOKENS} with --ifeval, "
        f"{rt.SAFETY_MAX_NEW_TOKENS} with --safety)",
    )
    p.add_argument("--dtype", choices=DTYPE_CHOICES, help="model dtype (default: auto)")
    vote = p.add_argument_group("voting over executed answers (QA; TAT-QA derivations are executed first)")
    vote.add_argument(
        "--samples",
        type=sample_counts,
        default=(rt.VOTE_SAMPLES,),
        help="K sampled outputs per question after the greedy one; the most common executed answer wins, "
        "ties go to the greedy answer. A list (5,9) draws max(K) samples once and votes over the first K of "
        "them for each K: each model gets its greedy row plus a MODEL@voteK row (default 1: greedy only)",
    )
    vote.add_argument(
        "--temperature",
        type=positive_float,
        default=rt.VOTE_TEMPERATURE,
        help=f"sampling temperature of the K samples (default {rt.VOTE_TEMPERATURE})",
    )
    vote.add_argument("--top-p", type=positive_float, default=rt.TOP_P, help="nucleus sampling (default 1.0)")
    vote.add_argument("--seed", type=int, default=rt.SEED, help=f"sampling seed (default {rt.SEED})")
    p.add_argument(
        "--runs-dir", default=rt.RUNS_DIR, help=f"where finished runs are found (default {rt.RUNS_DIR})"
    )
    p.add_argument("--out", help="result folder (default: <runs-dir>/eval/<date-time>)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped in a model dir (config.json auto_map); a run's own record never turns "
        "this on, only this flag does: use it for models you trust",
    )


def model_labels(text: str) -> tuple[str, ...]:
    """argparse type of --labels: names that are safe file names (predictions/<label>.jsonl), no '@' (it marks
    a vote row, MODEL@vote5), no duplicates."""
    labels = tuple(part.strip() for part in text.split(","))
    bad = [x for x in labels if not SAFE_NAME.fullmatch(x)]
    if bad:
        raise argparse.ArgumentTypeError(
            f"label {bad[0]!r} is not a plain name: use letters, digits, '.', '_' or '-' (e.g. sft,sft_grpo)"
        )
    if len(set(labels)) < len(labels):
        raise argparse.ArgumentTypeError(f"labels must differ, got {text!r}")
    return labels


def sample_counts(text: str) -> tuple[int, ...]:
    """argparse type of --samples: one count or a comma list (5,9), each >= 1; sorted, duplicates dropped."""
    return tuple(sorted({positive_int(part.strip()) for part in text.split(",")}))


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    if args.top_p > 1:
        fail(f"--top-p must be in (0, 1], got {args.top_p}")
    if max(args.samples) > 1 and (args.ifeval or args.safety):
        fail("--samples votes on QA answers; IFEval and --safety score one greedy response, drop --samples")


def out_dir(args: argparse.Namespace) -> Path:
    """The result folder, checked by the output rule against every input named on the command line (the
    resolved models are checked once known); an earlier result is replaced only with --overwrite."""
    out = Path(args.out) if args.out else Path(args.runs_dir) / "eval" / time.strftime("%Y%m%d-%H%M%S")
    named = [*(args.models or "").split(","), args.data, args.recipe, args.ifeval, args.safety, args.judge]
    return check_output_target(out, "--out", named, args.overwrite)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _check_numbers(args)
    out = out_dir(args)  # a bad --out fails before any data or model is read
    task = load_task(args)
    task.model_cfg = model_config(task.model_cfg, args.trust_remote_code, args.dtype)
    lengths = {"ifeval": rt.IFEVAL_MAX_NEW_TOKENS, "safety": rt.SAFETY_MAX_NEW_TOKENS}
    args.max_new_tokens = args.max_new_tokens or lengths.get(task.kind, rt.EVAL_MAX_NEW_TOKENS)
    models = resolve_models(args, task)
    check_not_input(out, [p for m in models for p in (m.path, m.adapter)], "--out")  # 'base', the latest run
    apply_cpu_threads(log=False)  # every core this process owns, also under accelerate launch
    toks = load_tokenizers(models, task)
    if (args.judge or args.judge_url) and task.kind in ("ifeval", "safety"):
        fail(
            "--judge/--judge-url grade QA answers; IFEval and --safety are scored by rules, drop the judge option"
        )
    spec = judge_spec_from_args(args, args.batch_size)
    print(
        f"[hpml_ft] {len(task.items)} {task.fmt} samples from {task.data}; models: "
        + ", ".join(f"{m.label} ({m.path}{' + ' + m.adapter if m.adapter else ''})" for m in models),
        file=sys.stderr,
    )
    votes_at = tuple(k for k in args.samples if k > 1)
    voting = Voting(votes_at, args.temperature, args.top_p, args.seed) if votes_at else None
    answers = answer_all(models, toks, task, args.max_new_tokens, args.batch_size, voting)
    results = score_all(models, task, answers, voting)
    if spec:
        judge_rows(spec, [row for r in results for row in r["rows"]])  # one judge load for every model
        for r in results:
            r["metrics"]["judge"] = summarize_rows(r["rows"])
    print(write_results(out, task, results, args, spec.name if spec else None))
    print(f"[hpml_ft] results: {out}/results.json, table: {out}/results.md")
    return 0
