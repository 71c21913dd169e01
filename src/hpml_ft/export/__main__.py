"""`python -m hpml_ft.export MODEL --gguf --out FILE [--type f16|q8_0|q4_0]`: a model as one GGUF file.

MODEL is 'embedded', a run dir (its merged/ model), a model dir or a Meta checkpoint dir, of the Llama
architecture. FILE is one GGUF file for llama.cpp (`llama-cli -m FILE -cnv`) and Ollama, with the tokenizer and
chat template inside; an Ollama `Modelfile` is written beside it (`ollama create NAME -f Modelfile` there).
--type: f16 (lossless for a bf16/fp16 model), q8_0 (8-bit, blocks of 32) or q4_0 (4-bit, the output projection
kept at 8 bits). An unmerged adapter is refused: merge it first. See docs/export.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from hpml_ft.errors import ArgumentParser, fail, note_output, run_cli
from hpml_ft.outputs import check_not_input, check_output_target, staged, write_text_atomic

GGUF_TYPES = ("f16", "q8_0", "q4_0")  # what export.gguf_file writes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(
        prog="python -m hpml_ft.export",
        description=__doc__.splitlines()[0],
        epilog="\n".join(__doc__.splitlines()[2:]),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "model", help="'embedded', a run dir (its merged/ model), a model dir or a Meta checkpoint dir"
    )
    p.add_argument("--gguf", action="store_true", help="write a GGUF file (the one export format so far)")
    p.add_argument(
        "--type", default="f16", choices=GGUF_TYPES, help="tensor type of 2-D weights (default f16)"
    )
    p.add_argument("--out", required=True, help="the GGUF file to write, e.g. exports/model-f16.gguf")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out file and its Modelfile"
    )
    return p.parse_args(argv)


def check_output_file(path: str, inputs: list[str | None], overwrite: bool) -> Path:
    """--out is a file: its folder must be writable (outputs' rule), the file and the Modelfile beside it new
    unless --overwrite, and neither may overlap an input."""
    out = Path(path).expanduser()
    if out.is_dir():
        fail(f"--out {out} is a directory; pass a file path such as {out / 'model.gguf'}")
    check_output_target(out.parent, "--out folder")
    check_not_input(out, inputs, "--out")
    for target in (out, out.parent / "Modelfile"):
        if target.exists() and not overwrite:
            fail(f"{target} already exists; pass --overwrite to replace it or choose another --out")
    note_output(out)
    return out


def export_gguf(src: Path, out: Path, kind: str, label: str) -> dict:
    """Write `out` (staged beside it, renamed when complete) and its Modelfile; returns what was written."""
    from transformers import AutoTokenizer

    from hpml_ft.export.gguf_file import read_config, write_gguf
    from hpml_ft.export.gguf_vocab import read_vocab
    from hpml_ft.export.modelfile import modelfile_text
    from hpml_ft.model import pretrained

    config = read_config(src)
    tok = pretrained(AutoTokenizer, src)
    vocab = read_vocab(tok, config["vocab_size"], str(src))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    with staged(Path(tmp), out):
        report = write_gguf(src, Path(tmp), kind, vocab, label)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    write_text_atomic(out.parent / "Modelfile", modelfile_text(out.name, tok))
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.gguf:
        fail("choose the export format: --gguf (the one format so far)")
    from hpml_ft.runs import standalone_dir

    out = check_output_file(args.out, [args.model], args.overwrite)
    src = standalone_dir(args.model, "GGUF export")  # an adapter: one line with the merge command
    check_not_input(out, [src], "--out")
    from hpml_ft.export.gguf_file import read_config

    read_config(Path(src))  # a non-Llama model: one error line before anything is read or written
    start = time.perf_counter()
    print(f"[hpml_ft] exporting {src} as {args.type} GGUF -> {out}", file=sys.stderr)
    report = export_gguf(Path(src), out, args.type, Path(args.model).name or args.model)
    size = out.stat().st_size / 2**20
    print(
        f"wrote {out} ({size:.1f} MiB, {report['tensors']} tensors {report['types']}, "
        f"pre-tokenizer {report['pre_tokenizer']}) and {out.parent / 'Modelfile'} "
        f"in {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    run_cli(main)
