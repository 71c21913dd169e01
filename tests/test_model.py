"""Model resolution: the embedded SmolLM2 converts once and generates; bad paths fail clearly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from hpml_ft.config import load_config
from hpml_ft.errors import UserError
from hpml_ft.model import attn_implementation, resolve_model_path


def test_embedded_model_loads_and_generates():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from hpml_ft.generation import generate
    from hpml_ft.model import load_tokenizer

    path = resolve_model_path("embedded")  # converts on first use (~25 s), cached afterwards
    stamp = (Path(path) / "model.safetensors").stat().st_mtime_ns
    assert resolve_model_path("embedded") == path  # the second use reuses the cached conversion...
    assert (Path(path) / "model.safetensors").stat().st_mtime_ns == stamp  # ...without rewriting it
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = load_tokenizer(path)
    texts, speed = generate(
        model, tok, [[{"role": "user", "content": "What is the capital of France?"}]], max_new_tokens=12
    )
    assert model.config.num_hidden_layers == 30 and "quantization_config" not in model.config.to_dict()
    assert "Paris" in texts[0], texts
    assert speed["new_tokens"] > 0


def test_bad_model_paths(tmp_path):
    with pytest.raises(UserError, match="model path not found"):
        resolve_model_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no config.json"):
        resolve_model_path(str(tmp_path / "empty"))
    assert resolve_model_path("org/name") == "org/name"


def test_flash_attention_without_flash_attn_is_a_clear_error():
    import torch

    cfg = load_config(None, ["train.max_steps=1", "model.attn_implementation=flash_attention_2"])
    with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package, a CUDA GPU"):
        attn_implementation(cfg.model, torch.float32)  # FA2 has no fp32 kernels: an error on every device
    if importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available():
        with pytest.raises(UserError, match="flash_attention_2 needs the flash-attn package"):
            attn_implementation(cfg.model, torch.bfloat16)
    auto = load_config(None, ["train.max_steps=1"])
    assert attn_implementation(auto.model, torch.float32) == "sdpa"
