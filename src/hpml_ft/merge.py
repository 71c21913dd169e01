"""`python -m hpml_ft.merge --adapter DIR --out DIR [--base MODEL]`: fold a LoRA/DoRA adapter into its base.

QLoRA adapters are merged into a base reloaded in 16/32-bit, never into the 4-bit weights they were trained
against: merging into dequantized-then-requantized weights is how peers' users get garbage merges.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import DTYPE_CHOICES
from hpml_ft.errors import ArgumentParser, fail, run_cli
from hpml_ft.model import pretrained, resolve_model_path
from hpml_ft.outputs import atomic_dir, check_output_target, require_complete_model

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def set_generation_eos(model_dir: str | Path, tok: PreTrainedTokenizerBase) -> None:
    """Make the saved generation config stop on the chat template's EOS (the one used in training)."""
    from transformers import GenerationConfig

    try:
        gen = GenerationConfig.from_pretrained(model_dir)
    except OSError:
        gen = GenerationConfig()
    ids = gen.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.insert(0, tok.eos_token_id)
    gen.eos_token_id = ids[0] if len(ids) == 1 else ids
    gen.pad_token_id = tok.pad_token_id
    gen.save_pretrained(model_dir)


def adapter_base(adapter_dir: Path) -> str:
    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path") or ""


def merge_adapter(
    adapter_dir: str | Path,
    out: str | Path,
    base_path: str | None = None,
    dtype: str = "auto",
    record: dict[str, Any] | None = None,
    trust_remote_code: bool = False,
) -> Path:
    """Load base (unquantized) + adapter, merge_and_unload, save atomically with tokenizer and generation config.
    Model code runs only for a train recipe that allows it (`trust_remote_code`); the merge CLI never runs it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = require_complete_model(adapter_dir, "adapter")
    if not (adapter_dir / "adapter_config.json").is_file():
        fail(f"{adapter_dir} is not a PEFT adapter (no adapter_config.json); full fine-tunes need no merge")
    base_path = resolve_model_path(base_path or adapter_base(adapter_dir))
    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    base = pretrained(AutoModelForCausalLM, base_path, trust_remote_code, dtype=getattr(torch, dtype))
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as err:
        why = (
            "tensor shapes differ" if "size mismatch" in str(err) else str(err).strip().splitlines()[0][:160]
        )
        fail(
            f"adapter {adapter_dir} does not fit base {base_path} ({why}); pass the base it was trained on "
            f"(--base {adapter_base(adapter_dir) or 'MODEL'})"
        )
    merged = model.merge_and_unload()
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_path
    tok = pretrained(AutoTokenizer, tok_src, trust_remote_code)
    rec = {"base_model": base_path, "adapter": str(adapter_dir), **(record or {})}
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in merged.state_dict().values()}  # tied: once
    with atomic_dir(Path(out), rec, need=sum(sizes.values())) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        set_generation_eos(tmp, tok)
    return Path(out)


def merge_inputs(adapter: str, base: str | None) -> list[str | None]:
    """What a merge reads: the adapter, and the base given or recorded in the adapter."""
    try:
        recorded = adapter_base(Path(adapter))
    except (OSError, ValueError, AttributeError):
        recorded = None  # no readable adapter_config.json: merge_adapter says so in one line
    return [adapter, base, recorded]


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m hpml_ft.merge", description=__doc__.splitlines()[0])
    p.add_argument("--adapter", required=True, help="adapter directory (outputs/<run>/adapter)")
    p.add_argument("--out", required=True, help="where to write the merged model")
    p.add_argument("--base", default=None, help="base model (default: the adapter's recorded base)")
    p.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    args = p.parse_args(argv)
    out = check_output_target(args.out, "--out", merge_inputs(args.adapter, args.base), args.overwrite)
    merge_adapter(args.adapter, out, args.base, args.dtype)
    print(f"merged model written to {out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
