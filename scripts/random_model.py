"""Save a randomly initialised model of a real shape with a real tokenizer: GPU benches without weights.

    python scripts/random_model.py CONFIG_JSON TOKENIZER_DIR OUT_DIR [--tiny]

CONFIG_JSON is a config.json (e.g. src/hpml_ft/model_configs/llama-3.2-1b.json or the embedded model's); the
tokenizer (chat template included) is copied from TOKENIZER_DIR and its special-token ids are written into the
config, so the toolkit loads OUT_DIR like any local model. A larger model vocabulary than the tokenizer's is fine
(unused rows). Weights are bf16 on a GPU (initialised there: seconds even for 8B), fp32 on the CPU. `--tiny`
shrinks the layers for a CPU smoke test of the scripts that use it. Speed and memory of random weights are those
of the real model; their outputs and losses are not.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("tokenizer")
    p.add_argument("out")
    p.add_argument("--tiny", action="store_true", help="2 small layers: a CPU smoke test")
    args = p.parse_args()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    raw = {k: v for k, v in json.loads(Path(args.config).read_text()).items() if not k.startswith("_")}
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    raw.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    raw["vocab_size"] = max(raw["vocab_size"], len(tok))
    if args.tiny:
        raw.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
        raw.update(num_key_value_heads=2, head_dim=16)
    cfg = AutoConfig.for_model(**raw)
    gpu = torch.cuda.is_available()
    torch.manual_seed(0)
    with torch.device("cuda" if gpu else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16 if gpu else torch.float32)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    n = sum(t.numel() for t in model.parameters())
    print(f"random_model: {args.out}: {n:,} parameters, vocab {cfg.vocab_size}, {model.dtype}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
