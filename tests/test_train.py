"""Smoke runs on a tiny random Llama: real effects, not just 'it ran'."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from hpml_ft.config import load_config
from hpml_ft.errors import UserError
from hpml_ft.train import main as train_main

# On a bf16 GPU runs train and merge in bf16 (dtype auto); the 1e-4 logit equality below is the fp32 merge's.
FP32_MERGE = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
    reason="runs merge in bf16 on a bf16 GPU; the 1e-4 logit check holds for the fp32 (CPU) merge",
)


def _overrides(tiny_model_dir, data, out, method="lora", steps=3, extra=()):
    return [
        f"model.name_or_path={tiny_model_dir}",
        f"data.path={data}",
        f"train.output_dir={out}",
        f"peft.method={method}",
        f"train.max_steps={steps}",
        "train.per_device_batch_size=4",
        "train.effective_batch_size=4",
        "train.learning_rate=1e-2",
        "train.logging_steps=1",
        "train.warmup_ratio=0",
        "train.lr_scheduler=constant",
        "data.max_samples=4",
        "data.eval_fraction=0.1",
        "train.eval_generate=2",
        "train.max_new_tokens=4",
        "train.max_length=128",
        "name=t",
        *extra,
    ]


def _trained(tiny_model_dir, alpaca_file, tmp_path, method, steps=3, extra=()):
    code = train_main(
        [
            str(_recipe(tmp_path)),
            *_overrides(tiny_model_dir, alpaca_file, tmp_path / "out", method, steps, extra),
        ]
    )
    assert code == 0
    run = tmp_path / "out" / "t"
    return run, json.loads((run / "metrics.json").read_text())


def _recipe(tmp_path):
    p = tmp_path / "recipe.yaml"
    p.write_text("name: t\n")
    return p


def test_lora_run_learns_and_writes_outputs(tiny_model_dir, alpaca_file, tmp_path):
    run, metrics = _trained(tiny_model_dir, alpaca_file, tmp_path, "lora")
    assert metrics["global_step"] == 3
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    assert metrics["final_loss"] < metrics["first_loss"]  # same 4 samples every step: loss must fall
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    for name in (
        "run.json",
        "recipe.yaml",
        "README.md",
        "merged/config.json",
        "merged/model.safetensors",
        "merged/tokenizer_config.json",
        "merged/chat_template.jinja",
        "merged/generation_config.json",
        "merged/hpml_ft.json",
    ):
        assert (run / name).exists(), name
    assert load_config(run / "recipe.yaml").peft.method == "lora"  # the saved recipe reloads as is
    assert "before" in metrics and "after" in metrics


def test_lora_trains_adapter_only(tiny_model_dir, alpaca_file, tmp_path):
    """The real build path (config -> model -> PEFT -> SFTTrainer): base frozen, adapter moves."""
    from hpml_ft.data import build_train_eval, load_splits
    from hpml_ft.model import build_model, load_tokenizer, wrap_peft
    from hpml_ft.train.trainer import build_trainer

    cfg = load_config(_recipe(tmp_path), _overrides(tiny_model_dir, alpaca_file, tmp_path / "out", steps=2))
    tok = load_tokenizer(str(tiny_model_dir))
    train_ds, _ = build_train_eval(cfg, tok, load_splits(cfg.data))
    model = wrap_peft(build_model(cfg, str(tiny_model_dir)), cfg)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    build_trainer(cfg, model, tok, train_ds, None, accum=1).train()
    after = dict(model.named_parameters())
    base_keys = [k for k in before if "lora_" not in k]
    lora_keys = [k for k in before if "lora_B" in k]
    assert base_keys and lora_keys
    assert all(torch.equal(before[k], after[k]) and not after[k].requires_grad for k in base_keys)
    assert all(not torch.equal(before[k], after[k]) for k in lora_keys)


@FP32_MERGE
def test_merged_logits_equal_base_plus_adapter(tiny_model_dir, alpaca_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run, _ = _trained(tiny_model_dir, alpaca_file, tmp_path, "lora")
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    ids = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        base_logits = base(ids).logits
    peft_model = PeftModel.from_pretrained(base, run / "adapter").eval()
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    with torch.no_grad():
        merged_logits = merged(ids).logits
        assert (peft_model(ids).logits - merged_logits).abs().max().item() < 1e-4
    assert (base_logits - merged_logits).abs().max().item() > 1e-3  # the adapter really changed the model


def test_full_finetune_changes_base_weights(tiny_model_dir, alpaca_file, tmp_path):
    run, metrics = _trained(tiny_model_dir, alpaca_file, tmp_path, "full", steps=2)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(run / "merged" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert len(changed) > len(before) // 2
    assert metrics["trainable_params"] == metrics["total_params"]
    assert not (run / "adapter").exists()


# The equality check below is 1e-4; the trained adapter must move the logits far more than that, or a merge that
# dropped the adapter (merged == base) would pass it. lr 1e-2 for 2 steps moves them by ~0.7 here.
ADAPTER_MOVES_LOGITS = 0.05


def _assert_merge_is_base_plus_adapter(tiny_model_dir, run):
    """merged/ gives the logits of base + adapter (1e-4), and those differ clearly from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 300, (2, 10))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        base_logits = base(ids).logits  # before PeftModel injects the adapter into `base` in place
        reference = PeftModel.from_pretrained(base, run / "adapter").eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()(ids).logits
    assert (reference - base_logits).abs().max().item() > ADAPTER_MOVES_LOGITS  # the adapter really trained
    assert (merged - base_logits).abs().max().item() > ADAPTER_MOVES_LOGITS  # ... and the merge kept it
    assert (reference - merged).abs().max().item() < 1e-4


@FP32_MERGE
def test_dora_merge_matches(tiny_model_dir, alpaca_file, tmp_path):
    run, _ = _trained(tiny_model_dir, alpaca_file, tmp_path, "dora", steps=2)
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    _assert_merge_is_base_plus_adapter(tiny_model_dir, run)


@FP32_MERGE
def test_qlora_trains_in_4bit_and_merges_in_full_precision(tiny_model_dir, alpaca_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    run, metrics = _trained(tiny_model_dir, alpaca_file, tmp_path, "qlora", steps=2)
    assert torch.isfinite(torch.tensor(metrics["final_loss"]))
    merged = AutoModelForCausalLM.from_pretrained(run / "merged").eval()
    assert merged.dtype == torch.float32 and not getattr(merged, "is_quantized", False)
    _assert_merge_is_base_plus_adapter(tiny_model_dir, run)


def test_finished_run_is_not_overwritten(tiny_model_dir, alpaca_file, tmp_path):
    _trained(tiny_model_dir, alpaca_file, tmp_path, "lora", steps=1)
    with pytest.raises(UserError, match="holds a finished run; pass train.overwrite=true"):
        train_main(
            [str(_recipe(tmp_path)), *_overrides(tiny_model_dir, alpaca_file, tmp_path / "out", steps=1)]
        )


def test_dry_run_prints_derived_numbers(tiny_model_dir, alpaca_file, tmp_path, capsys):
    code = train_main(
        [
            str(_recipe(tmp_path)),
            *_overrides(tiny_model_dir, alpaca_file, tmp_path / "out"),
            "train.effective_batch_size=8",
            "train.per_device_batch_size=2",
            "--dry-run",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "out").exists()
    assert "effective_batch: 2 per device x 4 accumulation x 1 processes = 8" in out
    assert "trainable_params:" in out and "tokens_per_step:" in out
