"""`python -m hpml_ft.quantize MODEL_OR_RUN --bits {8,4,3,2} --out DIR [--target cpu|cuda] [--format fast|portable]`.

Weight-only post-training quantization (torchao) of 'embedded', a run dir (its merged/ model) or a model dir.
The result is a model dir that infer, eval and bench load like any other (transformers reads its
quantization_config); hpml_ft.json records bits, group size, format, kernel, method and the embeddings / LM-head
policy. --bits 4 writes the format fastest on --target (default: cuda if this machine has a GPU, else cpu):
cpu-int4pack (portable files, repacked at load for the CPU int4 kernel, run in bf16) or cuda-tinygemm (packed
on the GPU). --format portable keeps the dequantize-then-matmul layout that loads on any device; other bit
widths are always portable.
Prints size on disk, load time, tokens/s and peak memory of the saved model (measured in a fresh process).
Embeddings and the LM head stay full precision unless --quantize-embeddings.
"""

from __future__ import annotations

import argparse
import json
import sys

from hpml_ft.config import runtime as rt
from hpml_ft.errors import ArgumentParser, fail
from hpml_ft.model import pretrained
from hpml_ft.outputs import check_output_target
from hpml_ft.quant.measure import measure_in_subprocess
from hpml_ft.quant.ptq import (
    check_spec,
    check_torchao,
    default_target,
    dir_size_mib,
    quantize_dir,
    resolve_format,
)
from hpml_ft.runs import standalone_dir


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m hpml_ft.quantize",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("model", help="'embedded', a run dir (its merged/ model) or a model dir")
    p.add_argument("--bits", type=int, required=True, help="weight bits: 8, 4, 3 or 2")
    p.add_argument("--out", required=True, help="where to write the low-bit model dir")
    p.add_argument(
        "--group-size",
        type=int,
        default=rt.LOWBIT_GROUP_SIZE,
        help=f"weights per scale (default {rt.LOWBIT_GROUP_SIZE})",
    )
    p.add_argument("--symmetric", action="store_true", help="no zero point (default: asymmetric)")
    p.add_argument(
        "--target",
        choices=["cpu", "cuda"],
        help="the device the model will run on (default: cuda if this machine has a GPU, else cpu)",
    )
    p.add_argument(
        "--format",
        choices=["fast", "portable"],
        help="int4: the target's fused-kernel format (fast, the default) or portable (any device)",
    )
    p.add_argument(
        "--quantize-embeddings", action="store_true", help="also quantize input embeddings and LM head"
    )
    p.add_argument("--no-measure", action="store_true", help="skip the load / speed / memory measurement")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier result in --out")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pathlib import Path

    check_spec(args.bits, args.group_size)
    check_torchao()
    target = args.target or default_target()
    fmt = resolve_format(
        args.bits, args.group_size, target, args.format, args.symmetric, args.quantize_embeddings
    )
    src = standalone_dir(args.model, "quantize")  # fails with one line on an unknown model
    out = check_output_target(args.out, "--out", [args.model, src], args.overwrite)
    _check_groups(src, args.group_size)
    what = f"int{args.bits} (group {args.group_size}, {fmt})"
    print(f"[hpml_ft] quantizing {src} to {what} -> {out}", file=sys.stderr)
    rec = quantize_dir(
        src, Path(out), args.bits, args.group_size, args.symmetric, args.quantize_embeddings, fmt=fmt
    )
    report = {**rec["quantization"], "out": str(out), "size_on_disk_mib": dir_size_mib(out)}
    report["source_size_mib"] = dir_size_mib(src)
    if not args.no_measure:
        m = measure_in_subprocess(str(out))
        report.update({k: v for k, v in m.items() if k not in ("texts", "path")})
    print(json.dumps(report, indent=2))
    return 0


def _check_groups(src: str, group_size: int) -> None:
    """Group size against the model's layer sizes, from config.json only (no weights loaded)."""
    from transformers import AutoConfig

    cfg = pretrained(AutoConfig, src)  # quantize never runs model code: one line for a model that needs it
    if getattr(cfg, "quantization_config", None):  # transformers cannot re-quantize it (NotImplementedError)
        fail(
            f"{src} is already quantized (quantization_config in its config.json); quantize its "
            "full-precision source instead (hpml_ft.json names it under quantization.source)"
        )
    for key in ("hidden_size", "intermediate_size"):
        size = getattr(cfg, key, None)
        if isinstance(size, int) and size % group_size:
            fail(
                f"--group-size {group_size} does not divide {key}={size} of {src}; "
                "pick a divisor (32 and 64 fit Llama/SmolLM models)"
            )
