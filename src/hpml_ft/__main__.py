"""`python -m hpml_ft`: the version, `env` (what a bug report needs), and where each command lives."""

from __future__ import annotations

import sys

import hpml_ft
from hpml_ft.errors import fail, run_cli

COMMANDS = {
    "train": "a recipe -> a run dir (adapter/, merged/, metrics, records)",
    "merge": "an adapter onto its base -> a standalone model",
    "consolidate": "a DeepSpeed ZeRO checkpoint -> an HF safetensors model",
    "infer": "answer held-out samples, prompts or a chat; models side by side",
    "eval": "exact match / F1, LLM judge, IFEval/IFBench, safety -> results.md",
    "serve": "an OpenAI-compatible server for a model (transformers serve)",
    "quantize": "low-bit PTQ (int8/4/3/2) of a model",
    "bench": "speed and memory of training, generation and low-bit models",
    "plan": "memory and batch plan of a recipe on a GPU or CPU",
    "export": "a model -> one GGUF file (llama.cpp, Ollama) + a Modelfile",
}
USAGE = (
    f"hpml_ft {hpml_ft.__version__}\n\nusage: python -m hpml_ft env [--json] | --version\n"
    "       python -m hpml_ft.COMMAND --help\n\ncommands:\n"
    + "\n".join(f"  {name:<12} {what}" for name, what in COMMANDS.items())
    + "\n  env          versions, torch build, devices, threads and caches for a bug report"
)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    if args[0] in ("-V", "--version"):
        print(f"hpml_ft {hpml_ft.__version__}")
        return 0
    if args[0] == "env":
        from hpml_ft.env import main as env_main

        return env_main(args[1:])
    if args[0] in COMMANDS:
        fail(f"'{args[0]}' is a module of its own: python -m hpml_ft.{args[0]} {' '.join(args[1:])}".rstrip())
    fail(f"unknown command '{args[0]}'; see python -m hpml_ft --help")


if __name__ == "__main__":
    run_cli(main)
