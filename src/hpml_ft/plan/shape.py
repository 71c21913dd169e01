"""Model shape for the planner: parameter counts and dimensions from a meta-device build of the config."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import ADAPTER_METHODS
from hpml_ft.errors import fail
from hpml_ft.model import pretrained

if TYPE_CHECKING:
    from transformers import PretrainedConfig

CONFIG_DIR = Path(__file__).parent.parent / "model_configs"
# Hub ids whose architecture ships here (configs, not weights): plans work offline without the HF cache.
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
}


@dataclass(frozen=True)
class Shape:
    """Parameter counts and dimensions of a causal LM, read off a meta-device build of its config."""

    total: int  # all parameters (tied weights once)
    head: int  # parameters of the output (LM head) matrix; the embedding when tied
    layer: int  # parameters of one decoder layer
    layers: int
    linear: int  # nn.Linear weights except the LM head: what bitsandbytes quantizes
    lora: int  # adapter parameters for the recipe's peft section (0 for full/none)
    hidden: int
    kv_hidden: int
    inter: int
    heads: int
    vocab: int


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """(config, source): a local model dir, the local HF cache, or a config shipped in model_configs/."""
    from transformers import AutoConfig

    if Path(name_or_path).is_dir():
        try:
            return pretrained(AutoConfig, name_or_path, trust_remote_code), name_or_path
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            fail(f"{name_or_path}/config.json cannot be read ({first}); fix or re-download the model")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        folder = str(Path(cached).parent)
        return pretrained(AutoConfig, folder, trust_remote_code), f"HF cache {folder}"
    if name_or_path in KNOWN_CONFIGS:
        path = CONFIG_DIR / f"{KNOWN_CONFIGS[name_or_path]}.json"
        data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(data.pop("model_type"), **data), f"built-in {path.name}"
    fail(
        f"no config for '{name_or_path}': not a local model dir, not in the HF cache, not one of the "
        f"built-in configs ({', '.join(KNOWN_CONFIGS)}); pass a local directory holding its config.json"
    )


def _lora_params(model: Any, method: str, r: int, targets: list[str] | str) -> int:
    """Adapter size as PEFT builds it: r*(in+out) per adapted Linear (+ out for DoRA's magnitude)."""
    from torch import nn

    if method not in ADAPTER_METHODS:
        return 0
    head, n = model.get_output_embeddings(), 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            n += r * (m.in_features + m.out_features) + (m.out_features if method == "dora" else 0)
    return n


def model_shape(
    mcfg: PretrainedConfig,
    method: str = "full",
    r: int = 16,
    targets: list[str] | str = "all-linear",
    trust_remote_code: bool = False,
) -> Shape:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = pretrained(AutoModelForCausalLM, mcfg, trust_remote_code)
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    head = model.get_output_embeddings()
    tc = mcfg.get_text_config()
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return Shape(
        total=sum(p.numel() for p in model.parameters()),
        head=head.weight.numel(),
        layer=sum(p.numel() for p in blocks[0].parameters()),
        layers=len(blocks),
        linear=sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head),
        lora=_lora_params(model, method, r, targets),
        hidden=tc.hidden_size,
        kv_hidden=(getattr(tc, "num_key_value_heads", None) or heads) * head_dim,
        inter=getattr(tc, "intermediate_size", None) or 4 * tc.hidden_size,
        heads=heads,
        vocab=tc.vocab_size,
    )
