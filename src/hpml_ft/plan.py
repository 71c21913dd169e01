"""`python -m hpml_ft.plan RECIPE [overrides] --gpus N --gpu-mem-gib G [--zero 0-3] [--offload]`: memory plan.

Per-device bytes from the model config alone (no weights read); P = parameters, N = data-parallel GPUs.
- Model states (ZeRO paper, Rajbhandari et al. 2020): DeepSpeed's AdamW keeps an fp32 master copy plus
  m and v (12 B per trainable param): bf16 mixed precision = 2 (weights) + 2 (grads) + 12 = 16*P bytes.
  Plain torch AdamW keeps m, v in the weight dtype and no master copy; 8-bit Adam keeps 2 B/param.
  Only trainable parameters have gradients and optimizer states; LoRA adapters are fp32 (PEFT upcasts
  them). NF4: 0.5 B/param + one absmax per 64 weights (fp32; double quantization: 8-bit + fp32 per 256).
- ZeRO-1 divides optimizer states by N, ZeRO-2 also gradients, ZeRO-3 also weights; offload moves the
  optimizer (and under ZeRO-3 the weight shards) to CPU RAM. ZeRO-3 re-gathers the parameters of the
  layers in flight: counted as max(embedding, 2 decoder layers).
- Activations per decoder layer: Korthikanti et al. 2022 count s*b*h*(34 + 5*a*s/h) bytes for a GPT
  block; for a Llama block (SwiGLU MLP, grouped-query attention, no dropout) the same bookkeeping gives
  s*b*(6h + 2h_kv + 4i)*B_act, + 2*a*s^2*b*B_act for eager attention only (SDPA/flash keep no s*s
  scores), + s*b*(6h + i)*B_act for the inputs LoRA dropout copies. Gradient checkpointing keeps
  s*b*h*B_act per layer (2*s*b*h in bf16) plus one layer's full activations while it is recomputed.
- Logits: s*b*V*(B_act + 8) (fp32 upcast for the loss, log-softmax and its gradient).
- Fixed overhead: CUDA context, cuBLAS workspaces, NCCL buffers, fragmentation (2 GiB on a GPU; on the
  CPU the resident size of a Python process with torch and transformers imported, 0.75 GiB).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import Config, load_config
from hpml_ft.errors import fail, run_cli

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30
CONFIG_DIR = Path(__file__).parent / "model_configs"
# Hub ids whose architecture ships here (configs, not weights): plans work offline without the HF cache.
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b", "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b", "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
}
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0}


@dataclass(frozen=True)
class Shape:
    """Parameter counts and dimensions of a causal LM, read off a meta-device build of its config."""

    total: int  # all parameters (tied weights once)
    embed: int  # the largest single tensor: the (input) embedding matrix
    layer: int  # parameters of one decoder layer
    layers: int
    linear: int  # nn.Linear weights except the LM head: what bitsandbytes quantizes
    lora: int  # adapter parameters for the recipe's peft section (0 for full/none)
    hidden: int
    kv_hidden: int
    inter: int
    heads: int
    vocab: int


@dataclass(frozen=True)
class Setup:
    method: str = "full"  # full | lora | qlora | dora | none
    weights: str = "bfloat16"  # float32 | bfloat16 | float16 | int8 | nf4
    act_bytes: int = 2
    optimizer: str = "adamw_torch"
    deepspeed: bool = False
    zero: int = 0
    offload: bool = False
    gpus: int = 1
    batch: int = 1
    seq: int = 512
    checkpointing: bool = False
    eager: bool = False
    lora_dropout: bool = True
    double_quant: bool = True
    overhead_gib: float = 2.0


# ---------------------------------------------------------------- model shape


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """(config, source): a local model dir, the local HF cache, or a config shipped in model_configs/."""
    from transformers import AutoConfig

    if Path(name_or_path).is_dir():
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code), name_or_path
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        folder = str(Path(cached).parent)
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), f"HF cache {folder}"
    if name_or_path in KNOWN_CONFIGS:
        path = CONFIG_DIR / f"{KNOWN_CONFIGS[name_or_path]}.json"
        data = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}
        return AutoConfig.for_model(data.pop("model_type"), **data), f"built-in {path.name}"
    fail(f"no config for '{name_or_path}': not a local model dir, not in the HF cache, not one of the "
         f"built-in configs ({', '.join(KNOWN_CONFIGS)}); pass a local directory holding its config.json")


def _lora_params(model: Any, method: str, r: int, targets: list[str] | str) -> int:
    """Adapter size as PEFT builds it: r*(in+out) per adapted Linear (+ out for DoRA's magnitude)."""
    from torch import nn

    if method not in ("lora", "qlora", "dora"):
        return 0
    head, n = model.get_output_embeddings(), 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            n += r * (m.in_features + m.out_features) + (m.out_features if method == "dora" else 0)
    return n


def model_shape(mcfg: PretrainedConfig, method: str = "full", r: int = 16,
                targets: list[str] | str = "all-linear") -> Shape:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = AutoModelForCausalLM.from_config(mcfg)
    blocks = max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)
    head = model.get_output_embeddings()
    tc = getattr(mcfg, "text_config", None) or mcfg
    heads = tc.num_attention_heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return Shape(
        total=sum(p.numel() for p in model.parameters()),
        embed=model.get_input_embeddings().weight.numel(),
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


# ---------------------------------------------------------------- the estimate


def _weight_bytes(sh: Shape, st: Setup) -> float:
    if st.weights == "nf4":
        consts = 1 / 64 + 4 / (64 * 256) if st.double_quant else 4 / 64
        base = sh.linear * (0.5 + consts) + (sh.total - sh.linear) * 2.0
    elif st.weights == "int8":
        base = sh.linear * 1.0 + (sh.total - sh.linear) * 2.0
    else:
        base = sh.total * WEIGHT_BYTES[st.weights]
    return base + sh.lora * 4.0


def _states(sh: Shape, st: Setup) -> tuple[float, float]:
    """(gradient bytes, optimizer bytes) of the trainable parameters, before any partitioning."""
    if st.method == "none":
        return 0.0, 0.0
    full = st.method == "full"
    n = sh.total if full else sh.lora
    pbytes = WEIGHT_BYTES[st.weights] if full else 4.0
    per_state = 1.0 if st.optimizer != "adamw_torch" else (4.0 if st.deepspeed else pbytes)
    master = 4.0 if st.deepspeed else 0.0  # DeepSpeed always keeps an fp32 master copy of what it trains
    return n * pbytes, n * (master + 2 * per_state)


def _activations(sh: Shape, st: Setup) -> tuple[float, float]:
    """(activation bytes over all layers, logits/loss bytes) for one micro-batch."""
    tokens = st.seq * st.batch
    per_tok = 6 * sh.hidden + 2 * sh.kv_hidden + 4 * sh.inter
    if st.eager:
        per_tok += 2 * sh.heads * st.seq
    if st.method in ("lora", "qlora", "dora") and st.lora_dropout:
        per_tok += 6 * sh.hidden + sh.inter
    one_layer = tokens * per_tok * st.act_bytes
    if st.checkpointing:
        acts = sh.layers * tokens * sh.hidden * st.act_bytes + one_layer
    else:
        acts = sh.layers * one_layer
    acts += 2 * tokens * sh.hidden * st.act_bytes  # embedding output, final norm
    return acts, tokens * sh.vocab * (st.act_bytes + 8)


def estimate(sh: Shape, st: Setup) -> list[tuple[str, float, float]]:
    """Rows of (component, bytes per device, bytes of CPU RAM per rank)."""
    n = st.gpus if st.zero else 1
    weights = _weight_bytes(sh, st)
    grads, optim = _states(sh, st)
    w = (weights / n if st.zero == 3 else weights, 0.0)
    g = (grads / n if st.zero >= 2 else grads, 0.0)
    o = (optim / n if st.zero >= 1 else optim, 0.0)
    if st.offload:  # the optimizer steps on the CPU, on fp32 copies of the gradient shards
        o, g = (0.0, o[0]), (0.0, g[0] * 4 / WEIGHT_BYTES.get(st.weights, 2.0))
        if st.zero == 3:
            w = (0.0, w[0])
    acts, logits = _activations(sh, st)
    rows = [("weights", *w), ("gradients", *g), ("optimizer states", *o)]
    if st.zero == 3:
        gathered = max(sh.embed, 2 * sh.layer) * WEIGHT_BYTES.get(st.weights, 2.0)
        rows.append(("ZeRO-3 gathered params", gathered, 0.0))
    rows += [("activations", acts, 0.0), ("logits + loss", logits, 0.0)]
    return [*rows, ("overhead", st.overhead_gib * GIB, 0.0)]


def total_bytes(sh: Shape, st: Setup) -> float:
    return sum(dev for _, dev, _ in estimate(sh, st))


def largest_batch(sh: Shape, st: Setup, mem_bytes: float, limit: int = 4096) -> int:
    """Largest per-device batch that fits (0 if not even 1); memory grows with batch, so bisect."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total_bytes(sh, replace(st, batch=mid)) <= mem_bytes else (lo, mid - 1)
    return lo


# ---------------------------------------------------------------- from a recipe


def deepspeed_settings(path: str | None) -> tuple[int, bool]:
    """(ZeRO stage, offload) of a DeepSpeed JSON; (0, False) without one."""
    if not path:
        return 0, False
    p = Path(path)
    if not p.is_file():
        fail(f"DeepSpeed config not found: {p} (use one of deepspeed/*.json)")
    try:
        zero = json.loads(p.read_text()).get("zero_optimization", {})
    except json.JSONDecodeError as err:
        fail(f"{p}: invalid JSON at line {err.lineno}: {err.msg}; fix the DeepSpeed config")
    keys = ("offload_optimizer", "offload_param")
    offload = any(zero.get(k, {}).get("device", "none") != "none" for k in keys)
    return int(zero.get("stage", 0)), offload


def setup_for(cfg: Config, gpus: int, gpu: bool, zero: int | None = None,
              offload: bool | None = None) -> Setup:
    """Training setup of a recipe on `gpus` devices; `gpu` False plans the CPU run (fp32, no CUDA)."""
    t, m = cfg.train, cfg.model
    ds_zero, ds_offload = deepspeed_settings(t.deepspeed)
    zero = ds_zero if zero is None else zero
    offload = ds_offload if offload is None else offload
    if offload and zero == 0:
        fail("offload needs DeepSpeed ZeRO: pass --zero 1, 2 or 3 (or a recipe with train.deepspeed)")
    if cfg.quantized_4bit and zero == 3:
        fail("QLoRA (4-bit) with ZeRO-3 is not supported by this toolkit; plan with --zero 2 or --zero 0")
    precision = t.precision if t.precision != "auto" else ("bf16" if gpu else "fp32")
    weights = m.dtype if m.dtype != "auto" else ("bfloat16" if gpu else "float32")
    if cfg.quantized_4bit:
        weights = "nf4"
    elif m.load_in_8bit:
        weights = "int8"
    act = 2 if precision in ("bf16", "fp16") or weights in ("bfloat16", "float16") else 4
    return Setup(method=cfg.peft.method, weights=weights, act_bytes=act, optimizer=t.optimizer,
                 deepspeed=zero > 0, zero=zero, offload=offload, gpus=gpus, batch=t.per_device_batch_size,
                 seq=t.max_length, checkpointing=t.gradient_checkpointing,
                 eager=m.attn_implementation == "eager",
                 lora_dropout=cfg.peft.dropout > 0, double_quant=m.bnb_4bit_use_double_quant,
                 overhead_gib=2.0 if gpu else 0.75)


def shape_for(cfg: Config, model_path: str) -> tuple[Shape, str]:
    mcfg, source = load_model_config(model_path, cfg.model.trust_remote_code)
    p = cfg.peft
    return model_shape(mcfg, p.method, p.r, p.target_modules), source


# ---------------------------------------------------------------- report


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x else "-"


def render(sh: Shape, st: Setup, mem_gib: float | None, device: str = "GPU") -> str:
    """The breakdown table, the verdict and the largest per-device batch that fits."""
    rows = estimate(sh, st)
    dev, cpu = sum(r[1] for r in rows), sum(r[2] for r in rows)
    zero = f"DeepSpeed ZeRO-{st.zero}" + (" + CPU offload" if st.offload else "") if st.zero else "no ZeRO"
    trainable = sh.total if st.method == "full" else sh.lora
    lines = [
        f"params: {sh.total / 1e9:.3f}B total, {trainable / 1e6:,.1f}M trainable ({st.method}); "
        f"weights {st.weights}, activations {8 * st.act_bytes}-bit, optimizer {st.optimizer}",
        f"setup: {st.gpus} {device}(s), {zero}, per-device batch {st.batch} x seq {st.seq}, "
        f"gradient checkpointing {'on' if st.checkpointing else 'off'}, "
        f"{'eager' if st.eager else 'SDPA/flash'} attention",
        "",
        f"| component | per {device} | CPU RAM per rank |",
        "|---|---:|---:|",
        *[f"| {name} | {_gib(d)} | {_gib(c)} |" for name, d, c in rows],
        f"| **total** | **{_gib(dev)}** | {_gib(cpu)} |",
    ]
    if mem_gib:
        best = largest_batch(sh, st, mem_gib * GIB)
        fits = dev <= mem_gib * GIB
        verdict = (f"fits: {dev / GIB:.1f} of {mem_gib:g} GiB" if fits else
                   f"does NOT fit: {dev / GIB:.1f} GiB needed, {mem_gib:g} GiB available")
        hint = (f"; largest per-device batch that fits: {best}" if best else "; not even batch 1 fits: "
                "enable gradient checkpointing, a higher ZeRO stage, offload, more GPUs, or LoRA/QLoRA")
        lines += ["", verdict + hint]
    return "\n".join(lines)


def plan_text_for_config(cfg: Config, model_path: str) -> str:
    """The plan for this machine as launched (`train --dry-run`): its GPU, or the CPU when it has none."""
    import os

    import torch

    from hpml_ft.config import world_size

    sh, source = shape_for(cfg, model_path)
    if torch.cuda.is_available():
        mem = torch.cuda.get_device_properties(0).total_memory / GIB
        st, device = setup_for(cfg, world_size(), gpu=True), "GPU"
    else:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB
        st, device = setup_for(cfg, world_size(), gpu=False), "CPU"
    return f"model config: {source}\n" + render(sh, st, mem, device)


def accelerate_processes(cfg: Config) -> int:
    """num_processes of the recipe's accelerate config (the GPU count it is meant for), else 1."""
    import yaml

    p = Path(cfg.accelerate_config) if cfg.accelerate_config else None
    if p is None or not p.is_file():
        return 1
    return int((yaml.safe_load(p.read_text()) or {}).get("num_processes", 1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hpml_ft.plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/fft_llama3_8b_tatqa.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.per_device_batch_size=2")
    p.add_argument("--gpus", type=int, default=None,
                   help="data-parallel GPUs (default: num_processes of the recipe's accelerate_config)")
    p.add_argument("--gpu-mem-gib", type=float, default=80.0, help="memory per GPU in GiB (default 80)")
    p.add_argument("--zero", type=int, choices=[0, 1, 2, 3], default=None,
                   help="DeepSpeed ZeRO stage; 0 = no DeepSpeed (default: the recipe's train.deepspeed)")
    p.add_argument("--offload", action="store_true", default=None,
                   help="offload the optimizer (and ZeRO-3 weights) to CPU RAM")
    p.add_argument("--cpu", action="store_true", help="plan the CPU run (fp32) instead of GPUs")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        fail(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpu_mem_gib <= 0:
        fail(f"--gpu-mem-gib must be positive, got {args.gpu_mem_gib:g}")
    cfg = load_config(args.recipe, args.overrides)
    from hpml_ft.model import resolve_model_path

    model_path = resolve_model_path(cfg.model.name_or_path)
    gpus = args.gpus or accelerate_processes(cfg)
    st = setup_for(cfg, gpus, gpu=not args.cpu, zero=args.zero, offload=args.offload)
    sh, source = shape_for(cfg, model_path)
    print(f"model: {cfg.model.name_or_path} (config: {source})")
    print(render(sh, st, args.gpu_mem_gib, "CPU" if args.cpu else "GPU"))
    return 0


if __name__ == "__main__":
    run_cli(main)
