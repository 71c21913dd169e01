"""Batched greedy/sampled generation with left padding, shared by training's quick eval, infer and eval."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """Stop on the tokenizer's EOS and every EOS the generation config knows (end-of-turn tokens)."""
    ids = model.generation_config.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids


def _decode_answers(tok: PreTrainedTokenizerBase, answers: Any, outputs: list[str]) -> int:
    """Append each generated row's text to `outputs`; return its new tokens (the EOS counted, padding not)."""
    new_tokens = 0
    for row in answers:
        keep = row[row != tok.pad_token_id]
        new_tokens += int(keep.numel()) + (1 if keep.numel() < row.numel() else 0)
        outputs.append(tok.decode(row, skip_special_tokens=True).strip())
    return new_tokens


def _speed(new_tokens: int, start: float) -> dict[str, float]:
    secs = time.perf_counter() - start
    return {"new_tokens": new_tokens, "seconds": secs, "tokens_per_s": new_tokens / max(secs, 1e-9)}


def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[list[dict]],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    **gen_kwargs: Any,
) -> tuple[list[str], dict[str, float]]:
    """Answer chat prompts; returns (texts, {"new_tokens", "seconds", "tokens_per_s"})."""
    import torch

    tok.padding_side = "left"  # decoder-only batches must be left-padded
    outputs: list[str] = []
    new_tokens, start = 0, time.perf_counter()
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        texts = [
            tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
            for p in prompts[i : i + batch_size]
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        kwargs = {"do_sample": False, **gen_kwargs}
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                eos_token_id=eos_ids(model, tok),
                pad_token_id=tok.pad_token_id,
                **kwargs,
            )
        new_tokens += _decode_answers(tok, out[:, enc["input_ids"].shape[1] :], outputs)
    model.train(was_training)
    return outputs, _speed(new_tokens, start)


def _cache_kwarg(model: PreTrainedModel) -> str:
    """`cache` in transformers versions that renamed `past_key_values` (5.x deprecates the old name)."""
    import inspect

    base = (
        model.get_base_model() if hasattr(model, "get_base_model") else model
    )  # a PEFT model forwards **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def sample_shared_prefix(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompt: list[dict],
    k: int,
    max_new_tokens: int = 64,
    **gen_kwargs: Any,
) -> tuple[list[str], dict[str, float]]:
    """K outputs for one chat prompt whose prompt is read once: the prompt's KV cache is computed for one row,
    copied to K rows, and only the answers are generated K times (voting costs ~one prefill, not K).
    Returns (texts, {"new_tokens", "seconds", "tokens_per_s"}); with do_sample=False every row is the greedy answer."""
    import torch
    from transformers import DynamicCache

    start = time.perf_counter()
    was_training = model.training
    model.eval()
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
    cache = DynamicCache(config=model.config)
    with_cache = {_cache_kwarg(model): cache}
    with torch.no_grad():
        # every prompt token but the last: generate needs at least one uncached token to start from
        model(input_ids=ids[:, :-1], use_cache=True, **with_cache)
        cache.batch_repeat_interleave(k)
        out = model.generate(
            input_ids=ids.repeat(k, 1),
            attention_mask=torch.ones(k, ids.shape[1], dtype=torch.long, device=ids.device),
            **with_cache,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids(model, tok),
            pad_token_id=tok.pad_token_id,
            **{"do_sample": False, **gen_kwargs},
        )
    model.train(was_training)
    outputs: list[str] = []
    new_tokens = _decode_answers(tok, out[:, ids.shape[1] :], outputs)
    return outputs, _speed(new_tokens, start)
