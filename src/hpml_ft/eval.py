"""`python -m hpml_ft.eval --models base,outputs/run_a,DIR [--data PATH | --recipe RECIPE | --ifeval [PATH]]`.

Answers every eval prompt with each model (batched, progress bar), scores them and writes one folder:
results.json, results.md (comparison table), predictions/<model>.jsonl and, for TAT-QA,
predictions/<model>.official.json ({uid: [answer, scale]}, the official scorer's input).

Data: --data (all of it), --recipe (its eval split), --ifeval (instruction following; default IFBench), or by
default the eval split of the latest finished run's recipe. Models: 'base' (the base model of the recipe / run
in play, else the embedded one), 'embedded', a run dir (its merged/ model), a model dir, or a cached hub id;
default: base and the latest finished run. Add --judge PATH or --judge-url URL for a 1-5 LLM-as-judge score.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config import ModelConfig, build_config, load_config
from hpml_ft.errors import ArgumentParser, fail, run_cli
from hpml_ft.evaluate import load_model
from hpml_ft.judge import add_judge_args, judge_rows, judge_spec_from_args, summarize_rows
from hpml_ft.outputs import RUN_RECORD, check_output_target, latest_finished_run, read_run


@dataclass
class Task:
    """What to evaluate on: QA samples (alpaca/chat/tatqa) or IFEval rows, and the run/recipe in play."""

    kind: str  # "qa" or "ifeval"
    fmt: str
    data: str
    items: list[dict]
    model_cfg: ModelConfig = field(default_factory=ModelConfig)
    run: Path | None = None
    base: str | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m hpml_ft.eval",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--models", help="comma-separated model specs (see below); default: base,<latest run>")
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
    p.add_argument("--batch-size", type=int, default=8, help="generation batch size (default 8)")
    p.add_argument("--max-new-tokens", type=int, help="answer length (default 64; 512 with --ifeval)")
    p.add_argument(
        "--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype (default: auto)"
    )
    p.add_argument("--runs-dir", default="outputs", help="where finished runs are found (default outputs)")
    p.add_argument("--out", help="result folder (default: <runs-dir>/eval/<date-time>)")
    p.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run Python code shipped in a model dir (config.json auto_map); a run's own record never turns "
        "this on, only this flag does: use it for models you trust",
    )
    add_judge_args(p)
    return p.parse_args(argv)


def _check_numbers(args: argparse.Namespace) -> None:
    for name in ("limit", "batch_size", "max_new_tokens"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            fail(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def _run_base(run: Path) -> str:
    """The base model of a finished run: the path it trained from if still there, else its recipe's model."""
    record = read_run(run)
    base = record.get("base_path")
    if base and Path(base).is_dir():
        return str(base)
    return str(record.get("recipe", {}).get("model", {}).get("name_or_path", EMBEDDED_MODEL))


def _qa_from_run(run: Path) -> Task:
    from hpml_ft.data import load_splits

    cfg = build_config(read_run(run)["recipe"])
    splits = load_splits(cfg.data)
    data = f"{run.name} eval split ({cfg.data.eval_path or cfg.data.path})"
    return Task("qa", splits.format, data, splits.eval, cfg.model, run, _run_base(run))


def load_task(args: argparse.Namespace) -> Task:
    """Read the data now (cheap), so a wrong path fails before any model is loaded."""
    from hpml_ft.data import load_samples, load_splits

    latest = latest_finished_run(args.runs_dir)
    if args.ifeval:
        from hpml_ft.ifeval import load_ifeval, validate

        rows = load_ifeval(args.ifeval)
        validate(rows)
        task = Task("ifeval", "ifeval", args.ifeval, rows, run=latest)
    elif args.safety:
        from hpml_ft.safety_eval import load_safety_file

        task = Task("safety", "safety", args.safety, load_safety_file(args.safety), run=latest)
    elif args.data:
        tatqa = (args.tatqa_target, args.tatqa_table)
        samples, fmt = load_samples(args.data, args.format, system=args.system_prompt, tatqa=tatqa)
        task = Task("qa", fmt, args.data, samples, run=latest)
    elif args.recipe:
        cfg = load_config(args.recipe)
        splits = load_splits(cfg.data)
        run = cfg.run_dir if (cfg.run_dir / RUN_RECORD).exists() else None  # its own run, not the latest
        task = Task(
            "qa",
            splits.format,
            f"{args.recipe} eval split",
            splits.eval,
            cfg.model,
            run,
            cfg.model.name_or_path,
        )
    elif latest is not None:
        task = _qa_from_run(latest)
    else:
        fail(
            f"no finished run under {args.runs_dir}/ to take the eval split from; "
            "pass --data PATH or --recipe RECIPE"
        )
    if not task.items:
        fail(f"{task.data} has no samples to evaluate (empty eval split?); use --data")
    task.items = task.items[: args.limit] if args.limit else task.items
    return task


def remote_code_policy(mcfg: ModelConfig, flag: bool) -> ModelConfig:
    """trust_remote_code comes from this command line only, never from a (possibly shared) run or recipe."""
    if mcfg.trust_remote_code and not flag:
        print(
            "[hpml_ft] note: the recipe in play sets model.trust_remote_code=true; model code is not run "
            "unless you pass --trust-remote-code on this command line",
            file=sys.stderr,
        )
    return mcfg.model_copy(update={"trust_remote_code": flag})


def _label(spec: str, path: str) -> str:
    if spec in ("base", EMBEDDED_MODEL):
        return spec
    p = Path(path)
    name = p.parent.name if p.name in ("merged", "adapter") else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def resolve_models(args: argparse.Namespace, task: Task) -> list[tuple[str, str]]:
    """(label, path) per spec; 'base': the recipe's model, else the first run's (named or latest) base, else
    the embedded model."""
    from hpml_ft.evaluate import resolve_model

    specs = [s.strip() for s in (args.models or "").split(",") if s.strip()]
    if not specs:
        specs = ["base"] + ([str(task.run)] if task.run else [])
    runs = [Path(s) for s in specs if (Path(s) / RUN_RECORD).is_file()] + ([task.run] if task.run else [])
    base = task.base or (_run_base(runs[0]) if runs else EMBEDDED_MODEL)
    out, seen = [], set()
    for spec in specs:
        path = resolve_model(base if spec == "base" else spec)
        label, k = _label(spec, path), 2
        while label in seen:
            label, k = f"{_label(spec, path)}-{k}", k + 1
        seen.add(label)
        out.append((label, path))
    return out


def out_dir(args: argparse.Namespace) -> Path:
    """The result folder; an existing folder is replaced only when it holds an earlier eval result."""
    out = Path(args.out) if args.out else Path(args.runs_dir) / "eval" / time.strftime("%Y%m%d-%H%M%S")
    check_output_target(out, "--out")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "results.json").is_file())):
        fail(f"--out {out} exists and is not an earlier eval result; pick a new folder")
    return out


def load_tokenizers(models: list[tuple[str, str]], task: Task) -> dict[str, Any]:
    """Every tokenizer up front (fast): a model without a chat template fails before any generation."""
    from hpml_ft.model import load_tokenizer

    return {path: load_tokenizer(path, task.model_cfg.trust_remote_code) for _, path in models}


def answer_all(
    models: list[tuple[str, str]], toks: dict[str, Any], task: Task, args: argparse.Namespace
) -> dict[str, tuple[list, dict]]:
    """Generate with each distinct model once (a path named twice is reused), freeing it before the next."""
    from hpml_ft.evaluate import generate_all

    if task.kind == "ifeval":
        prompts = [[{"role": "user", "content": r["prompt"]}] for r in task.items]
    elif task.kind == "qa":  # safety prompts depend on each model's template: built below
        prompts = [s["messages"][:-1] for s in task.items]
    done: dict[str, tuple[list, dict]] = {}
    for label, path in models:
        if path in done:
            continue
        if task.kind == "safety":  # guard models get the raw message, others the Llama-Guard-style prompt
            from hpml_ft.safety_eval import is_guard_template, prompts_for

            prompts = prompts_for(task.items, is_guard_template(toks[path].chat_template))
        model = load_model(path, task.model_cfg, args.dtype)
        done[path] = generate_all(model, toks[path], prompts, args.max_new_tokens, args.batch_size, label)
        del model
        gc.collect()
    return done


def score_all(models: list[tuple[str, str]], task: Task, answers: dict) -> list[dict]:
    from hpml_ft.evaluate import score_samples
    from hpml_ft.ifeval import score_responses

    results, unsupported = [], {}
    for label, path in models:
        preds, speed = answers[path]
        if task.kind == "ifeval":
            rows, metrics = score_responses(task.items, preds)
            unsupported.update({k: v["why"] for k, v in metrics["unsupported"].items()})
        elif task.kind == "safety":
            from hpml_ft.safety_eval import score

            rows, metrics = score(task.items, preds)
        else:
            rows, metrics = score_samples(task.items, preds, task.fmt)
        results.append({"name": label, "path": path, "metrics": metrics, "speed": speed, "rows": rows})
    for r in results:  # IFEval: every model is scored on the same instructions
        if task.kind == "ifeval" and set(r["metrics"]["unsupported"]) != set(unsupported):
            r["rows"], r["metrics"] = score_responses(task.items, answers[r["path"]][0], unsupported)
    return results


def write_results(
    out: Path, task: Task, results: list[dict], args: argparse.Namespace, judge: str | None
) -> str:
    """Everything into a temp folder renamed into place: a result folder is complete or absent."""
    from hpml_ft.evaluate import official_predictions, results_markdown
    from hpml_ft.ifeval import ifeval_markdown
    from hpml_ft.outputs import atomic_dir, versions, write_json_atomic, write_text_atomic
    from hpml_ft.tatqa_metric import write_official_predictions

    if task.kind == "ifeval":
        md = ifeval_markdown(results, task.data)
    elif task.kind == "safety":
        from hpml_ft.safety_eval import safety_markdown

        md = safety_markdown(results, task.data)
    else:
        md = results_markdown(results, task.fmt, task.data)
    summary = {
        "kind": "eval",
        "task": task.kind,
        "format": task.fmt,
        "data": task.data,
        "n": len(task.items),
        "limit": args.limit,
        "max_new_tokens": args.max_new_tokens,
        "judge": judge,
        "versions": versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "models": [],
    }
    with atomic_dir(out, {"kind": "eval"}) as tmp:
        for r in results:
            entry = {k: r[k] for k in ("name", "path", "metrics", "speed")}
            entry["predictions"] = f"predictions/{r['name']}.jsonl"
            lines = [json.dumps(x, ensure_ascii=False, default=str) + "\n" for x in r["rows"]]
            write_text_atomic(tmp / entry["predictions"], "".join(lines))
            if task.fmt == "tatqa":
                entry["official_predictions"] = f"predictions/{r['name']}.official.json"
                official = official_predictions(r["rows"])
                write_official_predictions(official, tmp / entry["official_predictions"])
            summary["models"].append(entry)
        write_text_atomic(tmp / "results.md", md)
        write_json_atomic(tmp / "results.json", summary)
    return md


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _check_numbers(args)
    out = out_dir(args)  # a bad --out fails before any data or model is read
    task = load_task(args)
    task.model_cfg = remote_code_policy(task.model_cfg, args.trust_remote_code)
    args.max_new_tokens = args.max_new_tokens or {"ifeval": 512, "safety": 10}.get(task.kind, 64)
    models = resolve_models(args, task)
    from hpml_ft.threads import apply_cpu_threads

    apply_cpu_threads(log=False)  # every core this process owns, also under accelerate launch
    toks = load_tokenizers(models, task)
    if (args.judge or args.judge_url) and task.kind in ("ifeval", "safety"):
        fail("--judge/--judge-url grade QA answers; IFEval and --safety are scored by rules, drop the judge option")
    spec = judge_spec_from_args(args, args.batch_size)
    print(
        f"[hpml_ft] {len(task.items)} {task.fmt} samples from {task.data}; models: "
        + ", ".join(f"{label} ({path})" for label, path in models),
        file=sys.stderr,
    )
    results = score_all(models, task, answer_all(models, toks, task, args))
    if spec:
        judge_rows(spec, [row for r in results for row in r["rows"]])  # one judge load for every model
        for r in results:
            r["metrics"]["judge"] = summarize_rows(r["rows"])
    print(write_results(out, task, results, args, spec.name if spec else None))
    print(f"[hpml_ft] results: {out}/results.json, table: {out}/results.md")
    return 0


if __name__ == "__main__":
    run_cli(main)
