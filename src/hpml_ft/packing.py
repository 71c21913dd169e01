"""Packed rows for attention kernels without varlen support (SDPA, eager: every CPU and most GPUs without
flash-attn).

TRL's bfd packing is padding-free: its collator concatenates *all* packed rows of a micro-batch into one
sequence and relies on FlashAttention's varlen kernel to keep samples apart. Without that kernel, transformers
turns the restarting position ids into a dense block-diagonal mask over the whole concatenation, so attention
costs (rows x max_length)^2 instead of rows x max_length^2. Measured on an H200 (SDPA, TAT-QA single questions,
2026-11-26): the flattened layout ran at 0.39x the padded run's tokens/s at 32 rows on the SmolLM2-135M shape
and took +27% memory. This collator keeps each packed row a row of the batch (padded to the longest), with
position ids restarting at every sample, so the mask is block-diagonal within each row; the pad tail is a block
of its own with no labels, and no attention_mask is sent (transformers only reads packing from position ids
when there is none).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def needs_row_layout(model: Any) -> bool:
    """True unless the model's attention is a FlashAttention (varlen) kernel, which TRL's layout is made for."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    return "flash" not in str(impl)


def packed_rows_collator(pad_token_id: int) -> Callable[[list[dict]], dict]:
    """Collate bfd-packed examples (input_ids, labels, seq_lengths) into [rows, longest] tensors."""
    import torch

    def collate(examples: list[dict]) -> dict[str, Any]:
        width = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), -100, dtype=torch.long)
        pos = torch.zeros((len(examples), width), dtype=torch.long)
        for i, e in enumerate(examples):
            n = len(e["input_ids"])
            ids[i, :n] = torch.as_tensor(e["input_ids"])
            labels[i, :n] = torch.as_tensor(e.get("labels", e["input_ids"]))
            lengths = list(e.get("seq_lengths") or [n]) + ([width - n] if width > n else [])
            pos[i] = torch.cat([torch.arange(k) for k in lengths])
        labels[pos == 0] = -100  # a sample's first token is not predicted from the previous sample's last
        return {"input_ids": ids, "labels": labels, "position_ids": pos}

    return collate
