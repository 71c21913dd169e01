"""Answering with each model: every distinct model loaded once, batched generation under a progress bar, then
the answers scored for the task (QA, IFEval or safety)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpml_ft.eval.ifeval import score_responses
from hpml_ft.eval.safety import is_guard_template, prompts_for, score
from hpml_ft.generation import generate
from hpml_ft.runs import ModelSpec, load_model, load_tokenizer
from hpml_ft.scoring import score_samples

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from hpml_ft.eval.tasks import Task


@dataclass(frozen=True)
class Voting:
    """`eval --samples K --temperature T --top-p P --seed S`: K sampled outputs per question vote."""

    samples: int
    temperature: float
    top_p: float = 1.0
    seed: int = 0


def key(spec: ModelSpec) -> tuple[str, str | None]:
    """Specs naming the same model (and adapter) share one load and one set of answers."""
    return spec.path, spec.adapter


def load_tokenizers(models: list[ModelSpec], task: Task) -> dict[tuple, Any]:
    """Every tokenizer up front (fast): a model without a chat template fails before any generation."""
    return {key(m): load_tokenizer(m, task.model_cfg.trust_remote_code) for m in models}


def generate_all(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    max_new_tokens: int,
    batch_size: int,
    desc: str,
    **gen_kwargs: Any,
) -> tuple[list[str], dict[str, float]]:
    """`generation.generate` batch by batch under a tqdm progress bar; speed summed over batches."""
    from tqdm.auto import tqdm

    texts: list[str] = []
    tokens = seconds = 0.0
    with tqdm(total=len(prompts), desc=desc, unit="sample", dynamic_ncols=True) as bar:
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i : i + batch_size]
            out, speed = generate(
                model, tok, chunk, max_new_tokens=max_new_tokens, batch_size=batch_size, **gen_kwargs
            )
            texts.extend(out)
            tokens, seconds = tokens + speed["new_tokens"], seconds + speed["seconds"]
            bar.update(len(chunk))
    return texts, {
        "new_tokens": int(tokens),
        "seconds": round(seconds, 2),
        "tokens_per_s": round(tokens / max(seconds, 1e-9), 1),
    }


def sample_all(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, prompts: list[list[dict]], greedy: list[str],
    fmt: str, voting: Voting, max_new_tokens: int, batch_size: int, desc: str,
) -> tuple[list[str], list[dict], dict[str, float]]:
    """`voting.samples` sampled outputs per prompt (each prompt repeated, so a batch holds several questions'
    samples), then the vote over their executed answers: (chosen outputs, per-question votes, sampling speed)."""
    from transformers import set_seed

    from hpml_ft.eval.voting import vote_all

    k = voting.samples
    set_seed(voting.seed)
    repeated = [p for p in prompts for _ in range(k)]
    kwargs = {"do_sample": True, "temperature": voting.temperature, "top_p": voting.top_p}
    texts, speed = generate_all(model, tok, repeated, max_new_tokens, batch_size, f"{desc} x{k}", **kwargs)
    chosen, votes = vote_all(greedy, [texts[i * k : (i + 1) * k] for i in range(len(prompts))], fmt)
    return chosen, votes, speed


def answer_all(
    models: list[ModelSpec],
    toks: dict[tuple, Any],
    task: Task,
    max_new_tokens: int,
    batch_size: int,
    voting: Voting | None = None,
) -> dict[tuple, tuple[list, dict, list | None]]:
    """Generate with each distinct model once (a model named twice is reused), freeing it before the next.
    With `voting` (QA only), the greedy output is followed by the sampled ones and the vote picks the answer."""
    if task.kind == "ifeval":
        prompts = [[{"role": "user", "content": r["prompt"]}] for r in task.items]
    elif task.kind == "qa":  # safety prompts depend on each model's template: built below
        prompts = [s["messages"][:-1] for s in task.items]
    done: dict[tuple, tuple[list, dict]] = {}
    for spec in models:
        k = key(spec)
        if k in done:
            continue
        if task.kind == "safety":  # guard models get the raw message, others the Llama-Guard-style prompt
            prompts = prompts_for(task.items, is_guard_template(toks[k].chat_template))
        model = load_model(spec, task.model_cfg)
        texts, speed = generate_all(model, toks[k], prompts, max_new_tokens, batch_size, spec.label)
        votes = None
        if voting is not None and voting.samples > 1 and task.kind == "qa":
            texts, votes, sampling = sample_all(
                model, toks[k], prompts, texts, task.fmt, voting, max_new_tokens, batch_size, spec.label
            )
            speed = {**speed, "sampling_seconds": sampling["seconds"], "sampled_tokens": sampling["new_tokens"]}
        done[k] = (texts, speed, votes)
        del model
        gc.collect()
    return done


def score_all(models: list[ModelSpec], task: Task, answers: dict) -> list[dict]:
    """One result per model: {name, path, adapter, metrics, speed, rows}."""
    results, unsupported = [], {}
    for spec in models:
        preds, speed, votes = answers[key(spec)]
        if task.kind == "ifeval":
            rows, metrics = score_responses(task.items, preds)
            unsupported.update({k: v["why"] for k, v in metrics["unsupported"].items()})
        elif task.kind == "safety":
            rows, metrics = score(task.items, preds)
        else:
            rows, metrics = score_samples(task.items, preds, task.fmt)
            if votes is not None:  # every sample is kept with the row it voted for
                rows = [{**row, "vote": v} for row, v in zip(rows, votes, strict=True)]
                metrics["voting"] = {"samples": len(votes[0]["samples"]) if votes else 0}
        result = {"name": spec.label, "path": spec.path, "metrics": metrics, "speed": speed, "rows": rows}
        results.append({**result, **({"adapter": spec.adapter} if spec.adapter else {})})
    for r, spec in zip(
        results, models, strict=True
    ):  # IFEval: every model is scored on the same instructions
        if task.kind == "ifeval" and set(r["metrics"]["unsupported"]) != set(unsupported):
            r["rows"], r["metrics"] = score_responses(task.items, answers[key(spec)][0], unsupported)
    return results
