"""What `python -m hpml_ft.eval` evaluates: the task (QA samples, IFEval rows or safety rows, read before any
model loads) and the models, named as `hpml_ft.runs` resolves them, each with a short unique label."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from pathlib import Path

from hpml_ft import EMBEDDED_MODEL
from hpml_ft.config import ModelConfig, load_config
from hpml_ft.data import load_samples, load_splits
from hpml_ft.errors import fail
from hpml_ft.eval.ifeval import load_ifeval, validate
from hpml_ft.eval.safety import load_safety_file
from hpml_ft.outputs import RUN_RECORD, latest_finished_run
from hpml_ft.runs import ModelSpec, resolve, run_config


@dataclass
class Task:
    """What to evaluate on: QA samples (alpaca/chat/tatqa), IFEval or safety rows, and the run/recipe in play."""

    kind: str  # "qa", "ifeval" or "safety"
    fmt: str
    data: str
    items: list[dict]
    model_cfg: ModelConfig = field(default_factory=ModelConfig)
    run: Path | None = None  # the run whose base 'base' is, when no recipe names one
    base: str | None = None  # the recipe's model: what 'base' is


def _qa_from_run(run: Path) -> Task:
    cfg = run_config(run)
    splits = load_splits(cfg.data)
    data = f"{run.name} eval split ({cfg.data.eval_path or cfg.data.path})"
    return Task("qa", splits.format, data, splits.eval, cfg.model, run)


def _qa_from_recipe(recipe: str) -> Task:
    cfg = load_config(recipe)
    splits = load_splits(cfg.data)
    run = cfg.run_dir if (cfg.run_dir / RUN_RECORD).exists() else None  # its own run, not the latest
    return Task(
        "qa", splits.format, f"{recipe} eval split", splits.eval, cfg.model, run, cfg.model.name_or_path
    )


def load_task(args: argparse.Namespace) -> Task:
    """Read the data now (cheap), so a wrong path fails before any model is loaded."""
    latest = latest_finished_run(args.runs_dir)
    if args.ifeval:
        rows = load_ifeval(args.ifeval)
        validate(rows)
        task = Task("ifeval", "ifeval", args.ifeval, rows, run=latest)
    elif args.safety:
        task = Task("safety", "safety", args.safety, load_safety_file(args.safety), run=latest)
    elif args.data:
        tatqa = (args.tatqa_target, args.tatqa_table)
        samples, fmt = load_samples(args.data, args.format, system=args.system_prompt, tatqa=tatqa)
        task = Task("qa", fmt, args.data, samples, run=latest)
    elif args.recipe:
        task = _qa_from_recipe(args.recipe)
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


def _label(entry: str, spec: ModelSpec) -> str:
    if entry in ("base", EMBEDDED_MODEL):
        return entry
    p = Path(spec.adapter or spec.path)
    name = p.parent.name if p.name in ("merged", "adapter") else p.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def resolve_models(args: argparse.Namespace, task: Task) -> list[ModelSpec]:
    """One spec per --models entry, labelled uniquely; 'base': the recipe's model, else the base of the first
    run named (or the run in play), else the embedded model. Default: base and the run in play."""
    entries = [s.strip() for s in (args.models or "").split(",") if s.strip()]
    if not entries:
        entries = ["base"] + ([str(task.run)] if task.run else [])
    labels = getattr(args, "labels", None)
    if labels and len(labels) != len(entries):
        fail(
            f"--labels names {len(labels)} models but there are {len(entries)} ({', '.join(entries)}); "
            "give one label per model, in the same order"
        )
    ref_run = next((Path(e) for e in entries if (Path(e) / RUN_RECORD).is_file()), task.run)
    out, seen = [], set()
    for i, entry in enumerate(entries):
        spec = resolve(entry, ref_run, base=task.base)
        label, k = (labels[i] if labels else _label(entry, spec)), 2
        while label in seen:  # only path-derived labels can repeat: --labels are checked to differ
            label, k = f"{_label(entry, spec)}-{k}", k + 1
        seen.add(label)
        out.append(ModelSpec(label, spec.path, spec.adapter))
    return out
