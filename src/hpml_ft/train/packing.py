"""Packed rows for attention kernels without varlen support (SDPA, eager: every CPU and most GPUs without
flash-attn), padding-free micro-batches, and a per-sample SDPA for packed rows on CPU.

TRL's bfd packing is padding-free: its collator concatenates *all* packed rows of a micro-batch into one
sequence and relies on FlashAttention's varlen kernel to keep samples apart. Without that kernel, transformers
turns the restarting position ids into a dense block-diagonal mask over the whole concatenation, so attention
costs (rows x max_length)^2 instead of rows x max_length^2. Measured on an H200 (SDPA, TAT-QA single questions,
2026-11-26): the flattened layout ran at 0.39x the padded run's tokens/s at 32 rows on the SmolLM2-135M shape
and took +27% memory. This collator keeps each packed row a row of the batch (padded to the longest), with
position ids restarting at every sample, so the mask is block-diagonal within each row; the pad tail is a block
of its own with no labels, and no attention_mask is sent (transformers only reads packing from position ids
when there is none).

Even within a row, SDPA with a block-diagonal mask computes every score of the row (a mask also turns off the
kernel's causal skipping). `packed_sdpa` is the varlen kernel CPUs lack: while training on CPU it runs causal
SDPA on each sample of a row alone, which is exact (no score crosses a sample) and cheaper: one fwd+bwd of two
1280-token rows of the embedded model, 2-3 samples each, took 16.1 s instead of 20.8 s (2 threads, 2026-11-26).
Elsewhere (eval, generation, GPUs, where it is unmeasured) it is transformers' SDPA unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

PACKED_ATTENTION = "sdpa_packed"  # registered with transformers under this name by use_packed_attention


def needs_row_layout(model: Any) -> bool:
    """True unless the model's attention is a FlashAttention (varlen) kernel, which TRL's layout is made for."""
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None) or "sdpa"
    return "flash" not in str(impl)


def _rows_batch(rows: list[tuple[list[int], list[int], list[int]]], pad_token_id: int) -> dict[str, Any]:
    """(input_ids, labels, sample lengths) per row -> [rows, longest] tensors with restarting position ids."""
    import torch

    width = max(len(ids) for ids, _, _ in rows)
    ids_t = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    labels_t = torch.full((len(rows), width), -100, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels, lengths) in enumerate(rows):
        n = len(ids)
        ids_t[i, :n] = torch.as_tensor(ids)
        labels_t[i, :n] = torch.as_tensor(labels)
        pos[i] = torch.cat([torch.arange(k) for k in [*lengths, *([width - n] if width > n else [])]])
    labels_t[pos == 0] = -100  # a sample's first token is not predicted from the previous sample's last
    return {"input_ids": ids_t, "labels": labels_t, "position_ids": pos}


def packed_rows_collator(pad_token_id: int) -> Callable[[list[dict]], dict]:
    """Collate bfd-packed examples (input_ids, labels, seq_lengths) into [rows, longest] tensors."""

    def collate(examples: list[dict]) -> dict[str, Any]:
        rows = [
            (
                e["input_ids"],
                e.get("labels", e["input_ids"]),
                list(e.get("seq_lengths") or [len(e["input_ids"])]),
            )
            for e in examples
        ]
        return _rows_batch(rows, pad_token_id)

    return collate


def first_fit_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Indices of samples per row, longest first into the first row with room (first-fit decreasing)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        at = next((r for r, free in enumerate(room) if lengths[i] <= free), None)
        if at is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[at].append(i)
            room[at] -= lengths[i]
    return rows


def padding_free_collator(pad_token_id: int, max_length: int) -> Callable[[list[dict]], dict]:
    """The micro-batch's own samples packed into rows of at most max_length tokens: the same samples per step
    as padding them (so the same loss), fewer pad tokens."""

    def collate(examples: list[dict]) -> dict[str, Any]:
        lengths = [len(e["input_ids"]) for e in examples]
        rows = []
        for idx in first_fit_rows(lengths, max(max_length, max(lengths))):
            rows.append(
                (
                    [t for i in idx for t in examples[i]["input_ids"]],
                    [t for i in idx for t in examples[i].get("labels", examples[i]["input_ids"])],
                    [lengths[i] for i in idx],
                )
            )
        return _rows_batch(rows, pad_token_id)

    return collate


def _segments(position_ids: Any, batch: int) -> list[list[tuple[int, int]]]:
    """[start, end) of every sample in every row: a sample starts where its position id is 0."""
    out = []
    for row in position_ids.expand(batch, -1).tolist():
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        out.append(list(zip(starts[:-1], starts[1:], strict=True)))
    return out


def packed_sdpa(
    module: Any,
    query: Any,
    key: Any,
    value: Any,
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    position_ids: Any = None,
    **kwargs: Any,
) -> tuple[Any, None]:
    """Causal SDPA per packed sample while training on CPU; transformers' SDPA (and its mask) otherwise."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    length = query.shape[2]
    # sliding windows, soft-capping and sinks live in the mask or the kernel: those models keep plain SDPA
    plain = not any(kwargs.get(k) is not None for k in ("sliding_window", "softcap", "s_aux"))
    eligible = module.training and query.device.type == "cpu" and position_ids is not None and plain
    eligible = eligible and key.shape[2] == length >= 2 and getattr(module, "is_causal", True)
    segments = _segments(position_ids, query.shape[0]) if eligible else []
    if all(
        len(spans) == 1 for spans in segments
    ):  # not eligible, or nothing packed (a padded batch): its mask
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, spans in enumerate(segments):
        parts = [
            F.scaled_dot_product_attention(
                query[b : b + 1, :, s:e],
                key[b : b + 1, :, s:e],
                value[b : b + 1, :, s:e],
                dropout_p=dropout,
                is_causal=True,
                scale=scaling,
                enable_gqa=gqa,
            )
            for s, e in spans
        ]
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Switch a model on transformers' SDPA to packed_sdpa (registered once, with SDPA's mask); True if it did."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, sdpa_mask)
    base.set_attn_implementation(PACKED_ATTENTION)
    return True
