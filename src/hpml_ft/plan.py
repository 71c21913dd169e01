"""`python -m hpml_ft.plan RECIPE [overrides] --gpus N --gpu-mem-gib G [--zero 0-3] [--offload]`: memory plan.

Per-device bytes from the model config alone (no weights read); P = parameters, N = data-parallel GPUs,
s = sequence, b = per-device batch, B = bytes per activation (2 in bf16/fp16, 4 in fp32).
- Model states (ZeRO paper, Rajbhandari et al. 2020): DeepSpeed's AdamW keeps an fp32 master copy plus
  m and v (12 B per trainable param): bf16 mixed precision = 2 (weights) + 2 (grads) + 12 = 16*P bytes.
  Plain torch AdamW keeps m, v in the weight dtype and no master copy; 8-bit Adam keeps 2 B/param.
  Only trainable parameters have gradients and optimizer states; LoRA adapters are fp32 (PEFT upcasts
  them). NF4: 0.5 B/param + one absmax per 64 weights (fp32; double quantization: 8-bit + fp32 per 256).
- ZeRO-1 divides optimizer states by N, ZeRO-2 also gradients, ZeRO-3 also weights; offload moves the
  optimizer (and under ZeRO-3 the weight shards) to CPU RAM. ZeRO-3 keeps up to stage3_max_live_parameters
  gathered 16-bit parameters plus one layer's full gradient.
- Activations per decoder layer: Korthikanti et al. 2022 count s*b*h*(34 + 5*a*s/h) bytes for a GPT
  block; the same bookkeeping for a Llama block (RMSNorm, SwiGLU MLP, grouped-query attention, no
  dropout) gives s*b*(8h + 2h_kv + 4i)*B, + 2*a*s^2*b*B for eager attention only (SDPA/flash keep no s*s
  scores); LoRA dropout adds a copy of every adapted input and its mask, s*b*(6h + i)*(B + 1). Gradient
  checkpointing keeps s*b*h*B per layer (2*s*b*h in bf16) plus one layer's activations while recomputing.
- LM head: TRL computes the loss in vocabulary tiles and never materialises the s*b*V logits: k tiles of
  min(s*b, 4096) x min(V, 32768) x B (k = 2 on a GPU; 8 on the CPU, whose torch fallback makes temporary
  copies: measured), plus fp32 gradients of the last hidden states and, when it trains, of the head.
- Peak = resident + max(forward/backward transients, optimizer-step transients: DeepSpeed's fp32 gradient
  copy and AdamW's foreach temporaries, per ZeRO-3 sub-group). Plain torch frees gradients after each
  step, so without DeepSpeed or accumulation they count in the step phase only.
- Fixed overhead: CUDA context, cuBLAS workspaces, NCCL buffers, fragmentation (2 GiB on a GPU; on the
  CPU the resident size of a Python process with torch and transformers imported, 0.75 GiB).
Checked against measured peaks on the CPU (scripts/gpu_check.py --cpu-measure); GPU: scripts/gpu_check.sh.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import Config, load_config
from hpml_ft.errors import ArgumentParser, fail, finite_float, run_cli

if TYPE_CHECKING:
    from transformers import PretrainedConfig

GIB = 2**30
CONFIG_DIR = Path(__file__).parent / "model_configs"
# Hub ids whose architecture ships here (configs, not weights): plans work offline without the HF cache.
KNOWN_CONFIGS = {
    "meta-llama/Meta-Llama-3-8B": "llama-3-8b",
    "meta-llama/Meta-Llama-3-8B-Instruct": "llama-3-8b",
    "meta-llama/Llama-3.2-1B": "llama-3.2-1b",
    "meta-llama/Llama-3.2-1B-Instruct": "llama-3.2-1b",
}
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0}
USABLE = 0.95  # of device memory: the rest absorbs allocator fragmentation spikes
Row = tuple[str, float, float, str]  # component, bytes per device, CPU RAM bytes per rank, phase


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


@dataclass(frozen=True)
class Setup:
    method: str = "full"  # full | lora | qlora | dora | none
    weights: str = "bfloat16"  # float32 | bfloat16 | float16 | int8 | nf4
    act_bytes: int = 2
    optimizer: str = "adamw_torch"
    zero: int = 0  # 0 = no DeepSpeed
    offload: bool = False
    gpus: int = 1
    batch: int = 1
    seq: int = 512
    accum: int = 1
    checkpointing: bool = False
    eager: bool = False
    lora_dropout: bool = True
    double_quant: bool = True
    sub_group: int = 10**8  # DeepSpeed sub_group_size (as in deepspeed/zero3.json)
    max_live: int = 10**9  # DeepSpeed stage3_max_live_parameters
    tile_copies: int = 2  # LM-head tiles alive at once: 2 on a GPU, 8 on the CPU
    overhead_gib: float = 2.0


# ---------------------------------------------------------------- model shape


def load_model_config(name_or_path: str, trust_remote_code: bool = False) -> tuple[PretrainedConfig, str]:
    """(config, source): a local model dir, the local HF cache, or a config shipped in model_configs/."""
    from transformers import AutoConfig

    if Path(name_or_path).is_dir():
        try:
            return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code), name_or_path
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
            fail(f"{name_or_path}/config.json cannot be read ({first}); fix or re-download the model")
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(name_or_path, "config.json")
    if isinstance(cached, str):
        folder = str(Path(cached).parent)
        return AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code), f"HF cache {folder}"
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

    if method not in ("lora", "qlora", "dora"):
        return 0
    head, n = model.get_output_embeddings(), 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.Linear) or m is head:
            continue
        if targets == "all-linear" or any(name == t or name.endswith("." + t) for t in targets):
            n += r * (m.in_features + m.out_features) + (m.out_features if method == "dora" else 0)
    return n


def model_shape(
    mcfg: PretrainedConfig, method: str = "full", r: int = 16, targets: list[str] | str = "all-linear"
) -> Shape:
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):  # shapes only: no memory, no weights
        model = AutoModelForCausalLM.from_config(mcfg)
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


def _trainable(sh: Shape, st: Setup) -> tuple[int, float, float]:
    """(trainable params, bytes per weight/gradient, bytes per optimizer state) for the recipe's method."""
    if st.method == "none":
        return 0, 0.0, 0.0
    n, pbytes = (sh.total, WEIGHT_BYTES[st.weights]) if st.method == "full" else (sh.lora, 4.0)
    state = 1.0 if st.optimizer != "adamw_torch" else (4.0 if st.zero else pbytes)
    return n, pbytes, state


def _activations(sh: Shape, st: Setup) -> tuple[float, float]:
    """(activation bytes over all layers, LM-head/loss transient bytes) for one micro-batch."""
    tokens, b = st.seq * st.batch, st.act_bytes
    per_tok = (8 * sh.hidden + 2 * sh.kv_hidden + 4 * sh.inter) * b
    if st.eager:
        per_tok += 2 * sh.heads * st.seq * b
    if st.method in ("lora", "qlora", "dora") and st.lora_dropout:
        per_tok += (6 * sh.hidden + sh.inter) * (b + 1)
    one_layer = tokens * per_tok
    acts = sh.layers * (tokens * sh.hidden * b if st.checkpointing else one_layer)
    acts += (one_layer if st.checkpointing else 0) + 2 * tokens * sh.hidden * b  # + embedding out, final norm
    tiles = st.tile_copies * min(tokens, 4096) * min(sh.vocab, 32768) * b
    # A trained head gets an fp32 gradient accumulator, then its grad in the weight dtype (the same tensor in fp32)
    head_grad = sh.head * (4.0 + (b if b < 4 else 0)) if st.method == "full" else 0.0
    return acts, tiles + tokens * sh.hidden * 4.0 + head_grad


def estimate(sh: Shape, st: Setup) -> list[Row]:
    """Rows of (component, bytes per device, CPU RAM bytes per rank, phase: all | fwd | step)."""
    n = st.gpus if st.zero else 1
    count, pbytes, state = _trainable(sh, st)
    w = _weight_bytes(sh, st) / (n if st.zero == 3 else 1)
    g = count * pbytes / (n if st.zero >= 2 else 1)
    master = 4.0 if st.zero else 0.0  # DeepSpeed keeps an fp32 master copy of what it trains
    o = count * (master + 2 * state) / (n if st.zero >= 1 else 1)
    # Step transients: DeepSpeed's fp32 gradient copy + torch AdamW's foreach temporaries (8-bit Adam: fused)
    stepped = min(count / n, st.sub_group) if st.zero == 3 else count / n if st.zero else count
    step = stepped * (master + (state if st.optimizer == "adamw_torch" else 0.0))
    grad_phase = "all" if st.zero or st.accum > 1 else "step"  # torch frees grads after each step
    rows = [
        ("weights", w, 0.0, "all"),
        ("gradients", g, 0.0, grad_phase),
        ("optimizer states", o, 0.0, "all"),
    ]
    if st.offload:  # the optimizer steps on the CPU, on fp32 copies of the gradient shards
        fp32_grads = 4.0 * count / (n if st.zero >= 2 else 1)
        rows = [
            ("weights", 0.0, w, "all") if st.zero == 3 else rows[0],
            ("gradients", 0.0, fp32_grads, "all"),
            ("optimizer states", 0.0, o, "all"),
        ]
    if st.zero == 3:
        live = min(st.max_live, sh.total) * WEIGHT_BYTES.get(st.weights, 2.0)
        layer_grads = sh.layer * pbytes if st.method == "full" else 0.0
        rows.append(("ZeRO-3 gathered params", live + layer_grads, 0.0, "all"))
    acts, head = _activations(sh, st)
    rows += [("activations", acts, 0.0, "fwd"), ("LM head + loss", head, 0.0, "fwd")]
    rows.append(
        ("optimizer step transients", 0.0 if st.offload else step, step if st.offload else 0.0, "step")
    )
    return [*rows, ("overhead", st.overhead_gib * GIB, 0.0, "all")]


def peak(rows: list[Row], column: int = 1) -> float:
    def phase(name: str) -> float:
        return sum(r[column] for r in rows if r[3] == name)

    return phase("all") + max(phase("fwd"), phase("step"))


def total_bytes(sh: Shape, st: Setup) -> float:
    return peak(estimate(sh, st))


def largest_batch(sh: Shape, st: Setup, mem_bytes: float, limit: int = 4096) -> int:
    """Largest per-device batch that fits (0 if not even 1); memory grows with batch, so bisect."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total_bytes(sh, replace(st, batch=mid)) <= mem_bytes else (lo, mid - 1)
    return lo


# ---------------------------------------------------------------- from a recipe


def deepspeed_settings(path: str | None) -> dict[str, Any]:
    """ZeRO stage, offload, sub_group_size, stage3_max_live_parameters of a DeepSpeed JSON ({} without one)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        fail(f"DeepSpeed config not found: {p} (use one of deepspeed/*.json)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
        zero = data.get("zero_optimization", {})
        offload = any(
            zero.get(k, {}).get("device", "none") != "none" for k in ("offload_optimizer", "offload_param")
        )
        return {
            "zero": int(zero.get("stage", 0)),
            "offload": offload,
            "sub_group": int(zero.get("sub_group_size", 10**9)),
            "max_live": int(zero.get("stage3_max_live_parameters", 10**9)),
        }
    except json.JSONDecodeError as err:
        fail(f"{p}: invalid JSON at line {err.lineno}: {err.msg}; fix the DeepSpeed config")
    except (AttributeError, TypeError, ValueError, UnicodeDecodeError):
        fail(f"{p}: zero_optimization has wrong types (stage, sizes: integers; offload_*: mappings); fix it")


def setup_for(
    cfg: Config, gpus: int, gpu: bool, zero: int | None = None, offload: bool | None = None
) -> Setup:
    """Training setup of a recipe on `gpus` devices; `gpu` False plans the CPU run (fp32, no CUDA)."""
    t, m = cfg.train, cfg.model
    ds = deepspeed_settings(t.deepspeed)
    zero = ds.get("zero", 0) if zero is None else zero
    offload = (ds.get("offload", False) and zero > 0) if offload is None else offload
    if offload and zero == 0:
        fail("offload needs DeepSpeed ZeRO: pass --zero 1, 2 or 3 (or a recipe with train.deepspeed)")
    if cfg.quantized_4bit and zero == 3:
        fail("QLoRA (4-bit) with ZeRO-3 is not supported by this toolkit; plan with --zero 2 or --zero 0")
    precision = t.precision if t.precision != "auto" else ("bf16" if gpu else "fp32")
    weights = m.dtype if m.dtype != "auto" else ("bfloat16" if gpu else "float32")
    weights = "nf4" if cfg.quantized_4bit else "int8" if m.load_in_8bit else weights
    per_step = t.per_device_batch_size * gpus
    return Setup(
        method=cfg.peft.method,
        weights=weights,
        act_bytes=2 if precision in ("bf16", "fp16") or weights in ("bfloat16", "float16") else 4,
        optimizer=t.optimizer,
        zero=zero,
        offload=offload,
        gpus=gpus,
        batch=t.per_device_batch_size,
        seq=t.max_length,
        accum=max(t.effective_batch_size // per_step, 1),
        checkpointing=t.gradient_checkpointing,
        eager=m.attn_implementation == "eager",
        lora_dropout=cfg.peft.dropout > 0,
        double_quant=m.bnb_4bit_use_double_quant,
        sub_group=ds.get("sub_group", 10**8),
        max_live=ds.get("max_live", 10**9),
        tile_copies=2 if gpu else 8,
        overhead_gib=2.0 if gpu else 0.75,
    )


def shape_for(cfg: Config, model_path: str) -> tuple[Shape, str]:
    mcfg, source = load_model_config(model_path, cfg.model.trust_remote_code)
    p = cfg.peft
    return model_shape(mcfg, p.method, p.r, p.target_modules), source


# ---------------------------------------------------------------- report

PHASES = {"all": "", "fwd": " (fwd/bwd)", "step": " (step)"}


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x else "-"


def render(sh: Shape, st: Setup, mem_gib: float | None, device: str = "GPU") -> str:
    """The breakdown table, the verdict and the largest per-device batch that fits."""
    rows = estimate(sh, st)
    dev, cpu = peak(rows), peak(rows, column=2)
    zero = f"DeepSpeed ZeRO-{st.zero}" + (" + CPU offload" if st.offload else "") if st.zero else "no ZeRO"
    trainable = sh.total if st.method == "full" else sh.lora
    lines = [
        f"params: {sh.total / 1e9:.3f}B total, {trainable / 1e6:,.1f}M trainable ({st.method}); "
        f"weights {st.weights}, activations {8 * st.act_bytes}-bit, optimizer {st.optimizer}",
        f"setup: {st.gpus} x {device}, {zero}, per-device batch {st.batch} x seq {st.seq} (x{st.accum} "
        f"accumulation), gradient checkpointing {'on' if st.checkpointing else 'off'}, "
        f"{'eager' if st.eager else 'SDPA/flash'} attention",
        "",
        f"| component | per {device} | CPU RAM per rank |",
        "|---|---:|---:|",
        *[f"| {name}{PHASES[ph]} | {_gib(d)} | {_gib(c)} |" for name, d, c, ph in rows],
        f"| **peak** = resident + max(fwd/bwd, step) | **{_gib(dev)}** | {_gib(cpu)} |",
    ]
    if mem_gib:
        usable = USABLE * mem_gib * GIB
        best = largest_batch(sh, st, usable)
        verdict = (
            f"fits: {dev / GIB:.1f} GiB" if dev <= usable else f"does NOT fit: {dev / GIB:.1f} GiB needed"
        )
        verdict += f" of {mem_gib:.1f} GiB ({USABLE:.0%} usable)"
        hint = f"; largest per-device batch that fits: {best}" if best else "; not even batch 1 fits: "
        if not best:
            hint += "enable gradient checkpointing, a higher ZeRO stage, offload, more GPUs, or LoRA/QLoRA"
        lines += ["", verdict + hint]
    return "\n".join(lines)


def ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB


def plan_text_for_config(cfg: Config, model_path: str) -> str:
    """The plan for this machine as launched (`train --dry-run`): its GPU, or the CPU when it has none."""
    import torch

    from hpml_ft.config import world_size

    sh, source = shape_for(cfg, model_path)
    gpu = torch.cuda.is_available()
    mem = torch.cuda.get_device_properties(0).total_memory / GIB if gpu else ram_gib()
    st = setup_for(cfg, world_size(), gpu=gpu)
    return f"model config: {source}\n" + render(sh, st, mem, "GPU" if gpu else "CPU process")


def accelerate_processes(cfg: Config) -> int:
    """num_processes of the recipe's accelerate config (the GPU count it is meant for), else 1."""
    import yaml

    if not cfg.accelerate_config:
        return 1
    p = Path(cfg.accelerate_config)
    if not p.is_file():
        fail(f"accelerate_config {p} not found; fix the recipe's accelerate_config or pass --gpus N")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        fail(f"{p}: not a valid accelerate config (YAML error{where}); fix it or pass --gpus N")
    if not isinstance(data, dict):
        fail(
            f"{p}: an accelerate config is a YAML mapping, not {type(data).__name__}; fix it or pass --gpus N"
        )
    n = data.get("num_processes", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        fail(f"{p}: num_processes must be a positive integer, got {n!r}; fix it or pass --gpus N")
    return n


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(prog="python -m hpml_ft.plan", description=__doc__.splitlines()[0])
    p.add_argument("recipe", help="recipe YAML, e.g. recipes/fft_llama3_8b_tatqa.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.per_device_batch_size=2")
    p.add_argument(
        "--gpus", type=int, help="data-parallel GPUs (default: the recipe's accelerate_config; --cpu: 1)"
    )
    p.add_argument(
        "--gpu-mem-gib",
        type=finite_float,
        help="memory per GPU in GiB (default 80; --cpu: this machine's RAM)",
    )
    p.add_argument(
        "--zero", type=int, choices=[0, 1, 2, 3], help="ZeRO stage, 0 = no DeepSpeed (default: recipe's)"
    )
    p.add_argument(
        "--offload", action="store_true", default=None, help="offload optimizer (ZeRO-3: and weights)"
    )
    p.add_argument("--cpu", action="store_true", help="plan a CPU run (fp32) instead of GPUs")
    args = p.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        fail(f"--gpus must be at least 1, got {args.gpus}")
    if args.gpu_mem_gib is not None and args.gpu_mem_gib <= 0:
        fail(f"--gpu-mem-gib must be positive, got {args.gpu_mem_gib:g}")
    cfg = load_config(args.recipe, args.overrides)
    gpus = args.gpus or (1 if args.cpu else accelerate_processes(cfg))
    st = setup_for(cfg, gpus, gpu=not args.cpu, zero=args.zero, offload=args.offload)
    from hpml_ft.model import resolve_model_path

    sh, source = shape_for(cfg, resolve_model_path(cfg.model.name_or_path))
    print(f"model: {cfg.model.name_or_path} (config: {source})")
    print(render(sh, st, args.gpu_mem_gib or (ram_gib() if args.cpu else 80.0), "CPU" if args.cpu else "GPU"))
    return 0


if __name__ == "__main__":
    run_cli(main)
