"""Packing (TRL bfd, padding-free) is correct with our assistant-only labels: packed samples share no
attention (position ids restart per sample, so transformers builds a block-diagonal mask for SDPA), the
per-sample losses equal the unpacked run, and prompt tokens stay masked."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _trainer(tiny_model_dir, tmp_path, packing: bool):
    from hpml_ft.config import load_config
    from hpml_ft.data import build_train_eval, load_splits
    from hpml_ft.model import build_model, load_tokenizer
    from hpml_ft.train.runner import build_trainer
    from hpml_ft.train.trainer import sft_config

    cfg = load_config(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            "data.demo_size=40",
            "train.max_steps=1",
            "train.max_length=256",
            f"train.packing={packing}",
            "peft.method=full",
            "model.dtype=float32",  # fp32 on any device: the 1e-4 comparison below is not a bf16 one
            "train.precision=fp32",
            f"train.output_dir={tmp_path / ('packed' if packing else 'padded')}",
        ],
    )
    tok = load_tokenizer(str(tiny_model_dir))
    train_ds, _ = build_train_eval(cfg, tok, load_splits(cfg.data))
    model = build_model(cfg, str(tiny_model_dir)).eval()
    trainer = build_trainer(cfg, model, tok, train_ds, None, 1, sft_config(cfg, 1))
    return trainer, train_ds


def _token_losses(model, batch: dict) -> torch.Tensor:
    """Per-position loss of predicting labels[t] from positions < t (0 where the label is -100)."""
    with torch.no_grad():
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits[0]
    labels = batch["labels"][0]
    loss = torch.nn.functional.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="none")
    return torch.cat([torch.zeros(1), loss])


def test_packed_losses_equal_unpacked_and_prompts_stay_masked(tiny_model_dir, tmp_path):
    packed, raw = _trainer(tiny_model_dir, tmp_path, packing=True)
    padded, _ = _trainer(tiny_model_dir, tmp_path, packing=False)
    row = packed.train_dataset[0]
    assert len(row["seq_lengths"]) >= 3, "the test needs several samples in one packed row"
    batch = packed.data_collator([row])
    assert "attention_mask" not in batch  # padding-free: the mask comes from position_ids
    starts = [0, *torch.tensor(row["seq_lengths"]).cumsum(0).tolist()]
    assert batch["position_ids"][0, starts[:-1]].tolist() == [0] * (len(starts) - 1)  # restart per sample
    # every packed sample is one unpacked sample with the same labels: assistant tokens only (+ EOS)
    unpacked = {tuple(r["input_ids"]): r for r in padded.train_dataset}
    masks = {tuple(r["input_ids"]): r["assistant_masks"] for r in raw}
    packed_losses = _token_losses(packed.model, batch)
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        ids = tuple(batch["input_ids"][0, a:b].tolist())
        labels = batch["labels"][0, a:b]
        ref = unpacked[ids]
        assert labels.tolist()[1:] == ref["labels"][1:]
        prompt = torch.tensor(masks[ids]) == 0
        assert (labels[prompt] == -100).all() and (labels[~prompt] != -100).any()
        alone = padded.data_collator([ref])
        mine = packed_losses[a:b][labels != -100]
        theirs = _token_losses(padded.model, alone)[alone["labels"][0] != -100]
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_without_position_reset_samples_would_mix(tiny_model_dir, tmp_path):
    """The check above can fail: one causal sequence over the same packed row gives different losses."""
    packed, _ = _trainer(tiny_model_dir, tmp_path, packing=True)
    batch = packed.data_collator([packed.train_dataset[0]])
    mixed = {**batch, "position_ids": torch.arange(batch["input_ids"].shape[1])[None]}
    labels = batch["labels"][0] != -100
    good, bad = _token_losses(packed.model, batch)[labels], _token_losses(packed.model, mixed)[labels]
    assert not torch.allclose(good, bad, atol=1e-3)


def test_packed_rows_stay_rows_without_varlen_attention(tiny_model_dir, tmp_path):
    """SDPA has no varlen kernel: two packed rows are a [2, longest] batch (TRL's padding-free collator would
    flatten them into one [1, sum] row whose dense mask costs (2 x max_length)^2), and each row's per-token
    losses equal the row collated alone (no attention across rows, the pad tail changes nothing)."""
    packed, _ = _trainer(tiny_model_dir, tmp_path, packing=True)
    rows = sorted(packed.train_dataset, key=lambda r: len(r["input_ids"]))
    short, long = rows[0], rows[-1]
    assert len(short["input_ids"]) < len(long["input_ids"]), "the test needs rows of different lengths"
    batch = packed.data_collator([short, long])
    width = len(long["input_ids"])
    assert batch["input_ids"].shape == (2, width) and "attention_mask" not in batch
    n = len(short["input_ids"])
    assert (batch["labels"][0, n:] == -100).all()  # the pad tail has no labels
    assert batch["position_ids"][0, n] == 0  # ... and is a block of its own
    with torch.no_grad():
        both = packed.model(**{k: v for k, v in batch.items() if k != "labels"}, use_cache=False).logits
    for i, row in enumerate((short, long)):
        alone = packed.data_collator([row])
        assert torch.equal(alone["labels"][0], batch["labels"][i, : len(row["input_ids"])])
        with torch.no_grad():
            ref = packed.model(**{k: v for k, v in alone.items() if k != "labels"}, use_cache=False).logits[0]
        torch.testing.assert_close(both[i, : len(row["input_ids"])], ref, atol=1e-4, rtol=1e-4)
