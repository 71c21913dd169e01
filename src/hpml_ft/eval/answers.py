"""Answering with each model: every distinct model loaded once, batched generation under a progress bar, then
the answers scored for the task (QA, IFEval or safety)."""

from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hpml_ft.eval.ifeval import score_responses
from hpml_ft.eval.safety import is_guard_template, prompts_for, score
from hpml_ft.generation import generate, sample_shared_prefix
from hpml_ft.runs import ModelSpec, load_model, load_tokenizer
from hpml_ft.scoring import score_samples

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from hpml_ft.eval.tasks import Task


@dataclass(frozen=True)
class Voting:
    """`eval --samples K[,K2..] --temperature T --top-p P --seed S`: max(K) sampled outputs per question are
    drawn once; for each K the first K of them vote."""

    votes_at: tuple[int, ...]
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
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    voting: Voting,
    max_new_tokens: int,
    desc: str,
) -> tuple[list[list[str]], dict[str, float]]:
    """max(voting.votes_at) sampled outputs per prompt, the prompt read once for all of them
    (`generation.sample_shared_prefix`): (outputs per prompt, sampling speed)."""
    from tqdm.auto import tqdm
    from transformers import set_seed

    k = max(voting.votes_at)
    set_seed(voting.seed)
    kwargs = {"do_sample": True, "temperature": voting.temperature, "top_p": voting.top_p}
    sampled: list[list[str]] = []
    tokens = seconds = 0.0
    for prompt in tqdm(prompts, desc=f"{desc} x{k}", unit="sample", dynamic_ncols=True):
        texts, speed = sample_shared_prefix(model, tok, prompt, k, max_new_tokens, **kwargs)
        sampled.append(texts)
        tokens, seconds = tokens + speed["new_tokens"], seconds + speed["seconds"]
    return sampled, {"new_tokens": int(tokens), "seconds": round(seconds, 2)}


def answer_all(
    models: list[ModelSpec],
    toks: dict[tuple, Any],
    task: Task,
    max_new_tokens: int,
    batch_size: int,
    voting: Voting | None = None,
) -> dict[tuple, tuple[list, dict, list | None]]:
    """Generate with each distinct model once (a model named twice is reused), freeing it before the next.
    With `voting` (QA only), the greedy outputs are followed by the sampled ones (kept per question)."""
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
        sampled = None
        if voting is not None and task.kind == "qa":
            sampled, sampling = sample_all(model, toks[k], prompts, voting, max_new_tokens, spec.label)
            speed = {
                **speed,
                "sampling_seconds": sampling["seconds"],
                "sampled_tokens": sampling["new_tokens"],
            }
        done[k] = (texts, speed, sampled)
        del model
        gc.collect()
    return done


def voted_results(spec: ModelSpec, task: Task, answers: dict, voting: Voting) -> list[dict]:
    """One result per K of `voting`, named MODEL@voteK: the vote of the first K samples (ties to greedy), each
    row keeping its samples and the greedy output."""
    from hpml_ft.eval.voting import sample_summary, vote_all

    greedy, speed, sampled = answers[key(spec)]
    greedy_em = [r["em"] for r in score_samples(task.items, greedy, task.fmt)[0]]
    columns = [
        score_samples(task.items, [s[j] for s in sampled], task.fmt)[0] for j in range(max(voting.votes_at))
    ]
    sample_em = [[col[i]["em"] for col in columns] for i in range(len(greedy))]  # per question, per sample
    results = []
    for k in voting.votes_at:
        chosen, votes = vote_all(greedy, [s[:k] for s in sampled], task.fmt)
        rows, metrics = score_samples(task.items, chosen, task.fmt)
        rows = [{**row, "vote": v} for row, v in zip(rows, votes, strict=True)]
        held = sample_summary(greedy_em, [e[:k] for e in sample_em], [v["for_greedy"] for v in votes])
        metrics["voting"] = {"samples": k, "temperature": voting.temperature, "top_p": voting.top_p, **held}
        result = {"name": f"{spec.label}@vote{k}", "path": spec.path, "metrics": metrics, "speed": speed}
        results.append({**result, "rows": rows, **({"adapter": spec.adapter} if spec.adapter else {})})
    return results


def score_all(models: list[ModelSpec], task: Task, answers: dict, voting: Voting | None = None) -> list[dict]:
    """One result per model: {name, path, adapter, metrics, speed, rows}; with `voting` (QA), each model's
    greedy result is followed by one result per K (`voted_results`)."""
    results, unsupported = [], {}
    for spec in models:
        preds, speed, _ = answers[key(spec)]
        if task.kind == "ifeval":
            rows, metrics = score_responses(task.items, preds)
            unsupported.update({k: v["why"] for k, v in metrics["unsupported"].items()})
        elif task.kind == "safety":
            rows, metrics = score(task.items, preds)
        else:
            rows, metrics = score_samples(task.items, preds, task.fmt)
        result = {"name": spec.label, "path": spec.path, "metrics": metrics, "speed": speed, "rows": rows}
        results.append({**result, **({"adapter": spec.adapter} if spec.adapter else {})})
        if voting is not None and task.kind == "qa":
            results.extend(voted_results(spec, task, answers, voting))
    if task.kind == "ifeval":  # every model is scored on the same instructions
        for r, spec in zip(results, models, strict=True):
            if set(r["metrics"]["unsupported"]) != set(unsupported):
                r["rows"], r["metrics"] = score_responses(task.items, answers[key(spec)][0], unsupported)
    return results
