"""train.padding_free packs each micro-batch's own samples into rows (same samples per step as padding them),
packed_sdpa attends within each sample only, and samples with nothing to learn are left out for every layout."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def _cfg(tiny_model_dir, tmp_path, *extra: str):
    from hpml_ft.config import load_config

    return load_config(
        None,
        [
            f"model.name_or_path={tiny_model_dir}",
            "data.demo_size=48",
            "train.max_length=96",
            "train.per_device_batch_size=6",
            "train.effective_batch_size=6",
            "train.max_steps=3",
            "train.logging_steps=1",
            "train.learning_rate=1e-3",
            "peft.method=full",
            "model.dtype=float32",
            "train.precision=fp32",
            "tracking.report_to=[none]",
            f"train.output_dir={tmp_path}",
            *extra,
        ],
    )


def _trainer(tiny_model_dir, tmp_path, *extra: str):
    from hpml_ft.data import build_train_eval, load_splits
    from hpml_ft.model import build_model, load_tokenizer
    from hpml_ft.train.runner import build_trainer
    from hpml_ft.train.trainer import sft_config

    cfg = _cfg(tiny_model_dir, tmp_path, *extra)
    tok = load_tokenizer(str(tiny_model_dir))
    train_ds, _ = build_train_eval(cfg, tok, load_splits(cfg.data))
    model = build_model(cfg, str(tiny_model_dir))
    return build_trainer(cfg, model, tok, train_ds, None, 1, sft_config(cfg, 1))


def test_first_fit_rows_fill_rows_and_keep_every_sample():
    from hpml_ft.train.packing import first_fit_rows

    lengths = [5, 4, 3, 2, 7, 1]
    rows = first_fit_rows(lengths, 7)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 7 for r in rows)
    assert len(rows) == 4  # 7 | 5+2 | 4+3 | 1 ... 22 tokens cannot go in fewer than 4 rows of 7


def test_padding_free_batch_holds_the_same_samples_with_equal_losses(tiny_model_dir, tmp_path, monkeypatch):
    import hpml_ft.train.packing as packing

    free = _trainer(tiny_model_dir, tmp_path / "free", "train.padding_free=true")
    padded = _trainer(tiny_model_dir, tmp_path / "padded")
    assert free.model.config._attn_implementation == packing.PACKED_ATTENTION
    examples = [padded.train_dataset[i] for i in range(6)]
    batch, ref = free.data_collator(examples), padded.data_collator(examples)
    assert batch["input_ids"].shape[0] < 6 and batch["input_ids"].shape[1] <= 96  # rows of <= max_length
    assert (batch["labels"] != -100).sum() == (ref["labels"] != -100).sum()
    assert (batch["input_ids"] != free.processing_class.pad_token_id).sum() >= sum(
        len(e["input_ids"]) for e in examples
    ) - 6  # every token of every sample is in a row (pad ids inside samples aside)
    per_sample = []
    real = packing._segments
    monkeypatch.setattr(
        packing, "_segments", lambda *a: per_sample.append(1) or real(*a)
    )  # count calls into the per-sample path
    free.model.train()
    padded.model.train()
    loss = free.model(**batch, use_cache=False).loss
    assert per_sample, "packed_sdpa did not see the packed rows"
    torch.testing.assert_close(loss, padded.model(**ref, use_cache=False).loss, atol=1e-5, rtol=1e-5)


def test_packed_sdpa_keeps_samples_apart(tiny_model_dir, tmp_path):
    """Each sample's logits in a packed row, under packed_sdpa in training mode, equal the sample alone; one
    causal sequence over the same row (what a wrong segmentation gives) does not."""
    free = _trainer(tiny_model_dir, tmp_path, "train.padding_free=true")
    examples = [free.train_dataset[i] for i in range(6)]
    batch = free.data_collator(examples)
    model = free.model.train()
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        row = batch["position_ids"][0]
        starts = [*(row == 0).nonzero().flatten().tolist(), len(row)]
        assert len(starts) >= 3, "the test needs two samples in the first row"
        for a, b in zip(starts[:-1], starts[1:], strict=True):
            alone = model(input_ids=batch["input_ids"][:1, a:b], use_cache=False).logits[0]
            torch.testing.assert_close(logits[0, a:b], alone, atol=1e-4, rtol=1e-4)
        a, b = starts[1], starts[2]
        mixed = model(input_ids=batch["input_ids"][:1, :b], use_cache=False).logits[0, a:b]
        assert not torch.allclose(mixed, logits[0, a:b], atol=1e-3)


def test_packed_sdpa_leaves_sliding_window_models_to_their_mask():
    """Per-sample attention would drop a sliding window (it lives in the mask): such calls get plain SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from hpml_ft.train.packing import packed_sdpa

    module = torch.nn.Module().train()
    q, k, v = (torch.randn(1, 2, 6, 4, generator=torch.Generator().manual_seed(i)) for i in range(3))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    per_sample, _ = packed_sdpa(module, q, k, v, None, position_ids=pos)
    plain, _ = sdpa_attention_forward(module, q, k, v, None)
    assert not torch.allclose(per_sample, plain)  # the two paths differ on this row ...
    windowed, _ = packed_sdpa(module, q, k, v, None, position_ids=pos, sliding_window=4)
    torch.testing.assert_close(windowed, plain)  # ... and a windowed call takes the plain one


@pytest.mark.slow
def test_padding_free_training_follows_the_padded_loss_curve(tiny_model_dir, tmp_path):
    """Same samples per step, same loss: three optimizer steps log the same losses as the padded run."""
    curves = []
    for name, extra in (("free", ["train.padding_free=true"]), ("padded", [])):
        trainer = _trainer(tiny_model_dir, tmp_path / name, *extra)
        trainer.train()
        curves.append([h["loss"] for h in trainer.state.log_history if "loss" in h])
    assert len(curves[0]) == 3 and curves[0][0] != curves[0][-1]
    assert curves[0] == pytest.approx(curves[1], abs=1e-4)


def test_samples_whose_answer_is_cut_off_are_left_out(capsys):
    from conftest import build_tiny_tokenizer

    from hpml_ft.data import build_dataset

    tok = build_tiny_tokenizer()
    convs = [
        [{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "ok"}] for n in (2, 3, 40)
    ]
    ds = build_dataset(convs, tok, 40, "training")
    assert len(ds) == 2 and all(1 in r for r in ds["assistant_masks"])
    assert "1 of 3 training samples left out" in capsys.readouterr().err
