"""Per-device memory of a training setup (no model or weights needed).

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
- GRPO (train.stage=grpo, TRL GRPOTrainer) adds a generation phase before each optimizer step: b*accum
  sequences sampled at once (one generation batch a step), so their KV cache, 2*L*s*kv_h*B bytes a
  sequence, plus one layer's no-grad prefill transients, s*(4h + 2h_kv + 3i)*B a sequence; under ZeRO-3
  every rank gathers the full weights to generate. Plain torch has freed the gradients by then. The policy
  update is an SFT-like forward/backward over prompt + completion, whose LM head scores only the completion
  tokens on a GPU (TRL's fused head; off Triton devices, the CPU included, it scores every position).
  beta > 0 keeps a frozen reference copy of the weights for full fine-tuning (LoRA disables its adapter).
  Peak = resident + max(training (gradients + max(fwd/bwd, step)), generation).
Checked against measured peaks on the CPU (docs/scale-out.md); `python -m hpml_ft.bench train` measures them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from hpml_ft.config import ADAPTER_METHODS
from hpml_ft.config.runtime import PLAN_LM_HEAD_TILES_GPU, PLAN_MAX_BATCH, PLAN_OVERHEAD_GIB_GPU
from hpml_ft.plan.shape import Shape

GIB = 2**30
WEIGHT_BYTES = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0}  # physical facts
Row = tuple[str, float, float, str]  # component, bytes per device, CPU RAM bytes per rank, phase (see peak)


@dataclass(frozen=True)
class Setup:
    method: str = "full"  # one of TRAIN_METHODS, or none
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
    tile_copies: int = PLAN_LM_HEAD_TILES_GPU  # LM-head tiles alive at once (more on the CPU)
    overhead_gib: float = PLAN_OVERHEAD_GIB_GPU
    grpo: bool = False  # train.stage=grpo: a generation phase of batch*accum sequences before each step
    scored: int = 0  # tokens per sequence through the LM head: 0 = all of seq; GRPO on a GPU: the completion
    ref_model: bool = False  # GRPO with beta > 0 on full fine-tuning: a frozen reference copy of the weights


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
    if st.method in ADAPTER_METHODS and st.lora_dropout:
        per_tok += (6 * sh.hidden + sh.inter) * (b + 1)
    one_layer = tokens * per_tok
    acts = sh.layers * (tokens * sh.hidden * b if st.checkpointing else one_layer)
    acts += (one_layer if st.checkpointing else 0) + 2 * tokens * sh.hidden * b  # + embedding out, final norm
    scored = st.batch * (st.scored or st.seq)
    tiles = st.tile_copies * min(scored, 4096) * min(sh.vocab, 32768) * b
    # A trained head gets an fp32 gradient accumulator, then its grad in the weight dtype (the same tensor in fp32)
    head_grad = sh.head * (4.0 + (b if b < 4 else 0)) if st.method == "full" else 0.0
    return acts, tiles + scored * sh.hidden * 4.0 + head_grad


def _generation(sh: Shape, st: Setup, weights: float) -> list[Row]:
    """GRPO's sampling phase: KV cache and prefill transients of one generation batch; ZeRO-3 gathers the rest
    of the weights (`weights` is this rank's shard)."""
    seqs, b = st.batch * st.accum, st.act_bytes
    kv = seqs * st.seq * sh.layers * 2 * sh.kv_hidden * b
    per_tok = (4 * sh.hidden + 2 * sh.kv_hidden + 3 * sh.inter) * b
    prefill = seqs * st.seq * per_tok + (2 * seqs * sh.heads * st.seq**2 * b if st.eager else 0)
    rows = [("KV cache", kv, 0.0, "gen"), ("prefill transients", prefill, 0.0, "gen")]
    if st.zero == 3:  # every shard but this rank's own (offloaded: its own too)
        rows.append(
            ("weights gathered to generate", weights * (st.gpus - (0 if st.offload else 1)), 0.0, "gen")
        )
    return rows


def estimate(sh: Shape, st: Setup) -> list[Row]:
    """Rows of (component, bytes per device, CPU RAM bytes per rank, phase: all | train | fwd | step | gen)."""
    n = st.gpus if st.zero else 1
    count, pbytes, state = _trainable(sh, st)
    w = _weight_bytes(sh, st) / (n if st.zero == 3 else 1)
    g = count * pbytes / (n if st.zero >= 2 else 1)
    master = 4.0 if st.zero else 0.0  # DeepSpeed keeps an fp32 master copy of what it trains
    o = count * (master + 2 * state) / (n if st.zero >= 1 else 1)
    # Step transients: DeepSpeed's fp32 gradient copy + torch AdamW's foreach temporaries (8-bit Adam: fused)
    stepped = min(count / n, st.sub_group) if st.zero == 3 else count / n if st.zero else count
    step = stepped * (master + (state if st.optimizer == "adamw_torch" else 0.0))
    # torch frees grads after each step; with accumulation they live through training, not GRPO's generation
    grad_phase = "all" if st.zero else "train" if st.accum > 1 else "step"
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
    if st.ref_model:
        rows.append(("reference model", w, 0.0, "all"))
    acts, head = _activations(sh, st)
    rows += [("activations", acts, 0.0, "fwd"), ("LM head + loss", head, 0.0, "fwd")]
    rows.append(
        ("optimizer step transients", 0.0 if st.offload else step, step if st.offload else 0.0, "step")
    )
    if st.grpo:
        rows += _generation(sh, st, w)
    return [*rows, ("overhead", st.overhead_gib * GIB, 0.0, "all")]


def phases(rows: list[Row], column: int = 1) -> dict[str, float]:
    """Bytes per phase. all: always resident; train: through forward/backward and the step (not GRPO's
    generation); fwd / step: transients of one of them; gen: GRPO's sampling phase."""
    return {ph: sum(r[column] for r in rows if r[3] == ph) for ph in ("all", "train", "fwd", "step", "gen")}


def phase_peaks(rows: list[Row], column: int = 1) -> tuple[float, float]:
    """(training peak, generation peak); without a GRPO generation phase the second is the resident part."""
    p = phases(rows, column)
    return p["all"] + p["train"] + max(p["fwd"], p["step"]), p["all"] + p["gen"]


def peak(rows: list[Row], column: int = 1) -> float:
    return max(phase_peaks(rows, column))


def total_bytes(sh: Shape, st: Setup) -> float:
    return peak(estimate(sh, st))


def largest_batch(sh: Shape, st: Setup, mem_bytes: float, limit: int = PLAN_MAX_BATCH) -> int:
    """Largest per-device batch that fits (0 if not even 1); memory grows with batch, so bisect."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if total_bytes(sh, replace(st, batch=mid)) <= mem_bytes else (lo, mid - 1)
    return lo
