"""The plan as text: breakdown table, verdict and the largest per-device batch that fits."""

from __future__ import annotations

import os

from hpml_ft.config import Config, world_size
from hpml_ft.config.runtime import PLAN_USABLE_FRACTION
from hpml_ft.plan.memory import GIB, Setup, estimate, largest_batch, peak
from hpml_ft.plan.recipe import setup_for, shape_for
from hpml_ft.plan.shape import Shape

PHASES = {"all": "", "train": "", "fwd": " (fwd/bwd)", "step": " (step)", "gen": " (generation)"}
GRPO_PHASES = {**PHASES, "train": " (training)"}  # gradients: not alive while GRPO generates
GRPO_CAVEAT = (
    "GRPO: measured CPU peaks ran 10% (full) to 34% (LoRA) above this plan; GPU peaks unmeasured "
    "(docs/scale-out.md, GRPO): leave that margin"
)


def _gib(x: float) -> str:
    return f"{x / GIB:.2f} GiB" if x else "-"


def render(sh: Shape, st: Setup, mem_gib: float | None, device: str = "GPU") -> str:
    """The breakdown table, the verdict and the largest per-device batch that fits."""
    rows = estimate(sh, st)
    dev, cpu = peak(rows), peak(rows, column=2)
    zero = f"DeepSpeed ZeRO-{st.zero}" + (" + CPU offload" if st.offload else "") if st.zero else "no ZeRO"
    trainable = sh.total if st.method == "full" else sh.lora
    phases, peak_is = (
        (GRPO_PHASES, "max(training, generation)") if st.grpo else (PHASES, "max(fwd/bwd, step)")
    )
    grpo = f", GRPO: {st.batch * st.accum} sequences generated at once" if st.grpo else ""
    lines = [
        f"params: {sh.total / 1e9:.3f}B total, {trainable / 1e6:,.1f}M trainable ({st.method}); "
        f"weights {st.weights}, activations {8 * st.act_bytes}-bit, optimizer {st.optimizer}",
        f"setup: {st.gpus} x {device}, {zero}, per-device batch {st.batch} x seq {st.seq} (x{st.accum} "
        f"accumulation), gradient checkpointing {'on' if st.checkpointing else 'off'}, "
        f"{'eager' if st.eager else 'SDPA/flash'} attention{grpo}",
        "",
        f"| component | per {device} | CPU RAM per rank |",
        "|---|---:|---:|",
        *[f"| {name}{phases[ph]} | {_gib(d)} | {_gib(c)} |" for name, d, c, ph in rows],
        f"| **peak** = resident + {peak_is} | **{_gib(dev)}** | {_gib(cpu)} |",
    ]
    if st.grpo:
        lines += ["", GRPO_CAVEAT]
    if mem_gib:
        usable = PLAN_USABLE_FRACTION * mem_gib * GIB
        best = largest_batch(sh, st, usable)
        verdict = (
            f"fits: {dev / GIB:.1f} GiB" if dev <= usable else f"does NOT fit: {dev / GIB:.1f} GiB needed"
        )
        verdict += f" of {mem_gib:.1f} GiB ({PLAN_USABLE_FRACTION:.0%} usable)"
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

    sh, source = shape_for(cfg, model_path)
    gpu = torch.cuda.is_available()
    mem = torch.cuda.get_device_properties(0).total_memory / GIB if gpu else ram_gib()
    st = setup_for(cfg, world_size(), gpu=gpu)
    return f"model config: {source}\n" + render(sh, st, mem, "GPU" if gpu else "CPU process")
