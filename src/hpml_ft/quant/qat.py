"""Quantization-aware training (the recipe's `quant:` section) with torchao: prepare / train / convert.

prepare: every linear layer but the LM head becomes a torchao FakeQuantizedLinear (weights rounded to
int<bits> per group in the forward pass, straight-through gradients) whose quantizer rounds exactly as the saved
model will: torchao's own PTQ tensor (`ptq_rounding`). torchao 0.18's asymmetric IntxFakeQuantizer computes
zero points for the unsigned range [0, 2^b - 1] but rounds into the signed one, so int8 weights came out ~13x
noisier than int8 PTQ (relative error 0.064 vs 0.0048) and training optimised for a quantizer nobody saves; with LoRA the fake-quantized layers are
the frozen base under the adapter. A frozen full-precision copy is kept as the teacher when
quant.distill.weight > 0. At save the fake quantizers are removed (the checkpoint holds the trained
full-precision weights, kept as merged-fp/) and merged/ is rewritten as the real low-bit model (ptq.py).
With LoRA the adapter is merged before the weights are rounded, so the saved model rounds W + BA where training
saw round(W) + BA; the difference is one rounding of a low-rank update (documented, measured in bench).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.config import Config

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel
    from trl import SFTTrainer


def fake_quant_config(cfg: Config) -> Any:
    import torch
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    q = cfg.quant
    weight = IntxFakeQuantizeConfig(
        getattr(torch, f"int{q.bits}"), group_size=q.group_size, is_symmetric=q.symmetric
    )
    return QATConfig(weight_config=weight, step="prepare")


@functools.cache
def _ptq_rounding_class() -> type:
    import torch  # torch stays a lazy import of this module (train --help)

    class PtqRounding(torch.nn.Module):
        """The weight quantizer of a FakeQuantizedLinear: round to int<bits> per group with torchao's PTQ tensor
        (the one ptq.py saves), dequantize, and pass gradients straight through to the full-precision weight."""

        def __init__(self, weight_config: Any) -> None:
            super().__init__()
            self.weight_config = weight_config
            self.enabled = True  # rounded_once switches it off while evaluating

        def forward(self, weight: torch.Tensor) -> torch.Tensor:
            if not self.enabled:
                return weight
            from torchao.quantization.quantize_.workflows.intx.intx_unpacked_to_int8_tensor import (
                IntxUnpackedToInt8Tensor,
            )

            c = self.weight_config
            q = IntxUnpackedToInt8Tensor.from_hp(
                weight.detach(),
                (1, c.granularity.group_size),
                c.weight_dtype,
                mapping_type=c.mapping_type,
                intx_choose_qparams_algorithm=c.intx_choose_qparams_algorithm,
            )
            return weight + (q.dequantize().to(weight.dtype) - weight).detach()

    return PtqRounding


def ptq_rounding(bits: int, group_size: int, symmetric: bool) -> torch.nn.Module:
    """A weight quantizer that rounds exactly as `quantize`/ptq.py will save the model."""
    from hpml_ft.quant.ptq import weight_config

    return _ptq_rounding_class()(weight_config(bits, group_size, symmetric))


def _not_lm_head(module: torch.nn.Module, fqn: str) -> bool:
    import torch

    return isinstance(module, torch.nn.Linear) and not fqn.endswith("lm_head")


def prepare_qat(model: PreTrainedModel, cfg: Config) -> tuple[PreTrainedModel, PreTrainedModel | None]:
    """Fake-quantize the model's linear layers in place; return it and the full-precision teacher (or None).
    A no-op without quant.bits / quant.qat."""
    q = cfg.quant
    if q.bits is None or not q.qat:
        return model, None
    from torchao.quantization import quantize_

    from hpml_ft.quant.ptq import check_group_size

    check_group_size(model, q.group_size)
    teacher = None
    if q.distill.weight > 0:
        teacher = copy.deepcopy(model).eval()
        teacher.requires_grad_(False)
    quantize_(model, fake_quant_config(cfg), filter_fn=_not_lm_head)
    fake = [m for m in model.modules() if type(m).__name__ == "FakeQuantizedLinear"]
    for mod in fake:  # round as the saved model will (see the module docstring)
        mod.weight_fake_quantizer = ptq_rounding(q.bits, q.group_size, q.symmetric)
    n = len(fake)
    print(
        f"[hpml_ft] QAT: {n} linear layers fake-quantized to int{q.bits} (group {q.group_size}, "
        f"{'symmetric' if q.symmetric else 'asymmetric'})"
        + (f"; self-distillation weight {q.distill.weight}, T={q.distill.temperature}" if teacher else "")
    )
    return model, teacher


def attach_distillation(trainer: SFTTrainer, teacher: PreTrainedModel | None, cfg: Config) -> None:
    """Replace the trainer's loss with CE + KL against the teacher (no-op without a teacher)."""
    if teacher is None:
        return
    from hpml_ft.quant.distill import DistillLoss

    d = cfg.quant.distill
    trainer.compute_loss_func = DistillLoss(trainer.model, teacher, d.weight, d.temperature)


@contextlib.contextmanager
def rounded_once(model: torch.nn.Module) -> Iterator[int]:
    """Generate from a fake-quantized model without re-rounding every weight at every decoding step.

    During training each forward must round the (changing) weights; during greedy eval they do not change, so
    round each FakeQuantizedLinear's weight once, switch its quantizer off, and put the trained weights back on
    exit. Same logits, ~one rounding per eval instead of one per generated token (minutes per QAT eval on CPU).
    """
    import torch

    saved: list[tuple[torch.nn.Module, torch.Tensor]] = []
    with torch.no_grad():
        for mod in model.modules():
            fq = getattr(mod, "weight_fake_quantizer", None)
            if type(mod).__name__ == "FakeQuantizedLinear" and fq is not None and fq.enabled:
                saved.append((mod, mod.weight.detach().clone()))
                mod.weight.copy_(fq(mod.weight))
                fq.enabled = False
    try:
        yield len(saved)
    finally:
        with torch.no_grad():
            for mod, weight in saved:
                mod.weight.copy_(weight)
                mod.weight_fake_quantizer.enabled = True


def strip_fake_quant(model: torch.nn.Module) -> int:
    """Swap every FakeQuantizedLinear back to a plain Linear with the same (trained) weights."""
    swapped = 0
    for name, mod in list(model.named_modules()):
        if type(mod).__name__ == "FakeQuantizedLinear":
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, mod.to_linear())
            swapped += 1
    return swapped


def convert_run(run_dir: Path, cfg: Config, record: dict[str, Any]) -> dict[str, str]:
    """merged/ (full precision) -> merged-fp/, and merged/ := its low-bit version. Returns new artifacts."""
    q = cfg.quant
    merged = Path(run_dir) / "merged"
    if q.bits is None or not merged.is_dir():
        return {}
    from hpml_ft.quant.ptq import quantize_dir

    fp = Path(run_dir) / "merged-fp"
    os.replace(merged, fp)
    extra = {k: v for k, v in record.items() if k != "metrics"}
    extra["qat"] = {"enabled": q.qat, "distill": q.distill.model_dump(), "full_precision": "merged-fp"}
    quantize_dir(fp, merged, q.bits, q.group_size, q.symmetric, q.quantize_embeddings, extra)
    print(f"[hpml_ft] low-bit model: {merged} (int{q.bits}); full-precision weights: {fp}")
    return {"merged": "merged", "merged_fp": "merged-fp"}
