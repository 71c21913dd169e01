"""`python -m hpml_ft.merge` success path: the written model loads on its own and equals base + adapter."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")


def test_merge_cli_writes_a_model_equal_to_base_plus_adapter(tiny_model_dir, tmp_path, capsys):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from hpml_ft.merge import main

    torch.manual_seed(0)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    with torch.no_grad():  # lora_B starts at zero (a no-op adapter): make it a real change
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    peft.save_pretrained(tmp_path / "adapter")  # records the base path: the CLI needs no --base

    assert (
        main(
            ["--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / "merged"), "--dtype", "float32"]
        )
        == 0
    )
    assert "merged model written to" in capsys.readouterr().out

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("lora" in k for k in merged.state_dict())  # a plain model, not an adapter
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    eos = GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id
    assert tok.eos_token_id in (
        eos if isinstance(eos, list) else [eos]
    )  # generation stops at the template's EOS
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = torch.randint(0, len(tok), (2, 12))
    with torch.no_grad():
        base_logits = base(ids).logits
        reference = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        want, got = reference(ids).logits, merged(ids).logits
    assert (want - got).abs().max().item() < 1e-4
    assert (base_logits - got).abs().max().item() > 1e-3  # the adapter really changed the model
