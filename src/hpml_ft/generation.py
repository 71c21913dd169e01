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
        gen = out[:, enc["input_ids"].shape[1] :]
        for row in gen:
            keep = row[row != tok.pad_token_id]
            new_tokens += int(keep.numel()) + (1 if keep.numel() < row.numel() else 0)
            outputs.append(tok.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    secs = time.perf_counter() - start
    return outputs, {"new_tokens": new_tokens, "seconds": secs, "tokens_per_s": new_tokens / max(secs, 1e-9)}
