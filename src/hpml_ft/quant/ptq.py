"""Weight-only post-training quantization of a saved model (torchao, per-group scales), in the format that runs
fastest on the target device.

The low-bit model is saved through transformers' TorchAoConfig: safetensors holding torchao tensors and a
`quantization_config` in config.json, so `AutoModelForCausalLM.from_pretrained` (and with it infer, eval,
bench) reloads it. Formats (`lowbit_kernels` names them and repacks at load): `portable` (IntxWeightOnlyConfig,
dequantize-then-matmul on any device; every bit width), `cpu-int4pack` (the same files, repacked at load on a
CPU for `aten._weight_int4pack_mm_for_cpu` in bf16) and `cuda-tinygemm` (Int4WeightOnlyConfig's tile-packed
tensors, made on a GPU for `aten._weight_int4pack_mm`). Embeddings and the LM head stay full precision unless
`quantize_embeddings` (the usual policy: they are a small share of a 1B model, sensitive, and at 135M tied, so
quantizing one quantizes both).
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hpml_ft.errors import fail
from hpml_ft.lowbit_kernels import CPU_INT4PACK, CUDA_TINYGEMM, INT4PACK_GROUPS, PORTABLE
from hpml_ft.model import pretrained
from hpml_ft.outputs import atomic_dir

if TYPE_CHECKING:
    from transformers import PreTrainedModel

BITS = (2, 3, 4, 8)
METHOD = "torchao IntxWeightOnlyConfig (weight-only, per-group, round-to-nearest min/max)"
TINYGEMM_METHOD = "torchao Int4WeightOnlyConfig tile_packed_to_4d (weight-only, per-group, tinygemm min/max)"
KERNELS = {
    PORTABLE: ("dequantize, then aten::linear", "the loaded dtype"),
    CPU_INT4PACK: ("aten._weight_int4pack_mm_for_cpu (repacked at load on a CPU)", "bfloat16"),
    CUDA_TINYGEMM: ("aten._weight_int4pack_mm (tinygemm, GPU)", "bfloat16"),
}


def check_torchao() -> None:
    if importlib.util.find_spec("torchao") is None:
        fail("low-bit quantization needs torchao: pip install --no-deps 'torchao==0.18.*' (or make install)")


def check_spec(bits: int, group_size: int) -> None:
    if bits not in BITS:
        fail(f"--bits {bits} is not supported; use one of {', '.join(map(str, BITS))}")
    if group_size <= 0:
        fail(f"--group-size must be a positive integer, got {group_size}")


def default_target() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_format(
    bits: int,
    group_size: int,
    target: str,
    fmt: str | None,
    symmetric: bool = False,
    quantize_embeddings: bool = False,
) -> str:
    """The saved format of `--bits --target --format` (fmt None = fast at 4 bits, portable otherwise);
    a combination no kernel takes fails in one line."""
    if fmt == "portable" or (fmt is None and bits != 4):
        return PORTABLE
    if bits != 4:
        fail(f"--format fast is the int4 kernels only; --bits {bits} is saved portable (drop --format)")
    groups = ", ".join(map(str, INT4PACK_GROUPS))
    if group_size not in INT4PACK_GROUPS:
        fail(f"--group-size {group_size}: the int4 kernels take {groups}; pick one, or --format portable")
    if target == "cpu":
        return CPU_INT4PACK
    if symmetric or quantize_embeddings:
        flag = "--symmetric" if symmetric else "--quantize-embeddings"
        fail(
            f"{flag} does not fit --target cuda: tinygemm int4 has a zero point and packs linear layers only; "
            "drop it, or use --format portable or --target cpu"
        )
    import torch

    if not torch.cuda.is_available():
        fail(
            "--target cuda packs int4 weights for the GPU kernel on a GPU and this machine has none; quantize "
            "on the GPU machine, or use --target cpu or --format portable (runs anywhere)"
        )
    return CUDA_TINYGEMM


def check_group_size(model: PreTrainedModel, group_size: int) -> None:
    """Every quantized linear layer's input size must be a multiple of the group size."""
    import torch

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and mod.in_features % group_size and "lm_head" not in name:
            fail(
                f"--group-size {group_size} does not divide the input size {mod.in_features} of {name}; "
                "pick a divisor (32 and 64 fit Llama/SmolLM models)"
            )


def weight_config(bits: int, group_size: int, symmetric: bool) -> Any:
    """The torchao PTQ config: int<bits> weights, one scale (and zero point unless symmetric) per group."""
    import torch
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup

    return IntxWeightOnlyConfig(
        weight_dtype=getattr(torch, f"int{bits}"),
        granularity=PerGroup(group_size),
        mapping_type=MappingType.SYMMETRIC if symmetric else MappingType.ASYMMETRIC,
    )


def record(
    bits: int, group_size: int, symmetric: bool, quantize_embeddings: bool, source: str, fmt: str = PORTABLE
) -> dict:
    kernel, compute = KERNELS[fmt]
    return {
        "quantization": {
            "bits": bits,
            "group_size": group_size,
            "symmetric": symmetric,
            "format": fmt,
            "kernel": kernel,
            "compute_dtype": compute,
            "method": TINYGEMM_METHOD if fmt == CUDA_TINYGEMM else METHOD,
            "embeddings": "quantized (untied from the LM head)" if quantize_embeddings else "full precision",
            "lm_head": "quantized" if quantize_embeddings else "full precision",
            "source": source,
        }
    }


def quantize_model(
    src: str | Path,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    quantize_embeddings: bool = False,
    fmt: str = PORTABLE,
) -> PreTrainedModel:
    """Load `src` (a full-precision HF model dir) with its weights quantized by torchao on load; cpu-int4pack
    writes the portable weights (the repack happens at load), cuda-tinygemm packs on the GPU."""
    check_torchao()
    import torch
    from transformers import AutoModelForCausalLM, TorchAoConfig

    if fmt == CUDA_TINYGEMM:
        from torchao.quantization import Int4WeightOnlyConfig

        tiny = Int4WeightOnlyConfig(group_size=group_size, int4_packing_format="tile_packed_to_4d")
        qcfg = TorchAoConfig(tiny)
        return pretrained(
            AutoModelForCausalLM, src, dtype=torch.bfloat16, quantization_config=qcfg, device_map="cuda"
        )
    qcfg = TorchAoConfig(weight_config(bits, group_size, symmetric))  # linear layers, LM head skipped
    model = pretrained(AutoModelForCausalLM, src, dtype=torch.float32, quantization_config=qcfg)
    if quantize_embeddings:
        _quantize_embeddings(model, bits, group_size, symmetric)
    return model


def _quantize_embeddings(model: PreTrainedModel, bits: int, group_size: int, symmetric: bool) -> None:
    """Input embeddings and LM head too, each its own quantized tensor (a tied pair is untied), recorded in
    the config so that transformers reloads them as quantized."""
    import torch
    from torchao.quantization import quantize_

    def embeddings_or_head(module: torch.nn.Module, fqn: str) -> bool:
        return module is model.get_output_embeddings() or isinstance(module, torch.nn.Embedding)

    quantize_(model, weight_config(bits, group_size, symmetric), filter_fn=embeddings_or_head)
    model.config.tie_word_embeddings = False
    model.config.quantization_config.include_input_output_embeddings = True
    model.config.quantization_config.modules_to_not_convert = []


def save_quantized(model: PreTrainedModel, src: str | Path, out: Path, rec: dict[str, Any]) -> None:
    """Model (safetensors + quantization_config), `src`'s tokenizer and the record, written atomically."""
    from transformers import AutoTokenizer

    with atomic_dir(out, rec) as staging:  # removed on error, SIGTERM or a full disk
        model.save_pretrained(staging, safe_serialization=True)
        pretrained(AutoTokenizer, src).save_pretrained(staging)


def quantize_dir(
    src: str | Path,
    out: Path,
    bits: int,
    group_size: int,
    symmetric: bool = False,
    quantize_embeddings: bool = False,
    extra_record: dict | None = None,
    fmt: str = PORTABLE,
) -> dict[str, Any]:
    """Quantize the model dir `src` into the model dir `out` (with an hpml_ft.json record, returned)."""
    start = time.perf_counter()
    model = quantize_model(src, bits, group_size, symmetric, quantize_embeddings, fmt)
    rec = record(bits, group_size, symmetric, quantize_embeddings, str(src), fmt)
    rec["quantization"]["quantize_seconds"] = round(time.perf_counter() - start, 2)
    rec.update(extra_record or {})
    save_quantized(model, src, out, rec)
    return rec


def dir_size_mib(path: str | Path) -> float:
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20, 1)


def packed_size_mib(model: PreTrainedModel) -> float:
    """What the weights take at their nominal bit width (the int codes bit-packed, plus scales and zero
    points); torchao stores portable int<8 codes unpacked in int8, so the files on disk are larger than this.
    Kernel-packed tensors (int4pack, tinygemm) count what they hold."""
    total = 0.0
    for t in [*model.parameters(), *model.buffers()]:  # tied weights (embeddings = LM head) count once
        names = getattr(t, "tensor_data_names", None)
        if names and hasattr(t, "target_dtype"):
            bits = int(str(t.target_dtype).removeprefix("torch.int"))
            for n in names:
                part = getattr(t, n)
                total += part.numel() * (bits / 8 if n == "qdata" else part.element_size())
        elif names:
            for n in [*names, *getattr(t, "optional_tensor_data_names", [])]:
                part = getattr(t, n, None)
                total += 0 if part is None else part.numel() * part.element_size()
        else:
            total += t.numel() * t.element_size()
    return round(total / 2**20, 1)
