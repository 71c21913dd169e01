"""Which fused int4 kernel a saved low-bit model runs on, and the load-time repack onto the CPU one.

`quantize --bits 4` names a format in the model's hpml_ft.json (`quantization.format`):

- `cpu-int4pack`: the files hold torchao's portable int4 weights (`IntxUnpackedToInt8Tensor`: codes in int8,
  one scale and zero point per group). `load_causal_lm` on a CPU repacks every int4 linear weight into
  torchao's `Int4OpaqueTensor` (two codes a byte, the layout of `aten._weight_int4pack_mm_for_cpu`) and runs
  the model in bf16: that kernel is fast for bf16 activations only (fp32 ones were 0.16x of fp32 here, slower
  than dequantizing). torchao 0.18 cannot write `Int4OpaqueTensor` to safetensors (not in its allow list), so
  the repack runs at every load (about a second at 135M). It is exact: the kernel computes
  (u - 8) * scale + zero with u = q + 8, and zero = -zero_point * scale gives the portable (q - zero_point) *
  scale, up to scale and zero rounded to bf16.
- `cuda-tinygemm`: torchao's `Int4TilePackedTo4dTensor` (tinygemm, `aten._weight_int4pack_mm`), written as is;
  transformers loads it on a GPU with no help from here.
- `portable` (and any model without the field): loaded as saved, dequantize-then-matmul on any device.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

CPU_INT4PACK, CUDA_TINYGEMM, PORTABLE = "cpu-int4pack", "cuda-tinygemm", "portable"
INT4PACK_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu takes
INT4PACK_ROWS = 16  # _convert_weight_to_int4pack_for_cpu needs out_features % 16 == 0


def saved_format(path: str | Path) -> str | None:
    """`quantization.format` of a model dir's hpml_ft.json; None for a model without one."""
    try:
        rec = json.loads((Path(path) / "hpml_ft.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    quant = rec.get("quantization") if isinstance(rec, dict) else None
    return quant.get("format") if isinstance(quant, dict) else None


def repacks_for_cpu(path: str | Path, dtype: str) -> bool:
    """Whether `load_causal_lm` should load `path` in bf16 and repack it (`repack_int4_for_cpu`): its record
    says cpu-int4pack, there is no GPU and the requested dtype is auto or bfloat16. Otherwise such a model
    runs its portable weights, and a note says why."""
    import torch

    if saved_format(path) != CPU_INT4PACK:
        return False
    if torch.cuda.is_available():
        why = "on a GPU"
    elif dtype not in ("auto", "bfloat16"):
        why = f"with dtype {dtype} (the CPU int4 kernel is fast for bf16 activations only)"
    else:
        return True
    print(
        f"[hpml_ft] note: {path} is a cpu-int4pack model; {why} it runs its portable int4 weights",
        file=sys.stderr,
    )
    return False


def int4pack_fits(weight: Any) -> bool:
    """A portable int4 per-group weight whose shape and group size the CPU kernel takes."""
    if type(weight).__name__ != "IntxUnpackedToInt8Tensor" or str(weight.target_dtype) != "torch.int4":
        return False
    rows, cols = weight.shape
    groups = weight.block_size[-1]
    return (
        weight.block_size[0] == 1
        and groups in INT4PACK_GROUPS
        and cols % groups == 0
        and rows % INT4PACK_ROWS == 0
    )


def to_int4pack(weight: Any, dtype: torch.dtype) -> Any:
    """The `Int4OpaqueTensor` (CPU int4pack layout) computing the same weights as the portable `weight`."""
    import torch
    from torchao.prototype.quantization.int4 import Int4OpaqueTensor
    from torchao.quantization.utils import pack_tinygemm_scales_and_zeros

    codes = weight.qdata.to(torch.int32) + 8  # [-8, 7] -> [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
    scale = weight.scale.float()
    zero = -weight.zero_point.float() * scale
    scale_and_zero = pack_tinygemm_scales_and_zeros(scale.to(dtype), zero.to(dtype), dtype)
    return Int4OpaqueTensor(packed, scale_and_zero, list(weight.block_size), weight.shape)


def repack_int4_for_cpu(model: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """Every linear layer with a fitting portable int4 weight onto the CPU kernel, in place; the others keep
    their weights, cast to the model's dtype. Returns (repacked, kept)."""
    import torch

    dtype = dtype or next(p.dtype for p in model.parameters() if p.is_floating_point())
    repacked = kept = 0
    for mod in model.modules():
        w = getattr(mod, "weight", None)
        if not isinstance(mod, torch.nn.Linear) or type(w).__name__ != "IntxUnpackedToInt8Tensor":
            continue
        if int4pack_fits(w):
            new, repacked = to_int4pack(w, dtype), repacked + 1
        else:
            new, kept = w.to(dtype), kept + 1
        mod.weight = torch.nn.Parameter(new, requires_grad=False)
    return repacked, kept
