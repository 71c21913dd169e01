"""`python -m hpml_ft.bench train|generate|lowbit|all`: measured training and generation on the paths users run.

train.py (SFTTrainer path), generate.py (decoding variants), report.py (JSON/markdown/PNG, profiler output),
cli.py (arguments, dispatch, `all`). `lowbit` lives in hpml_ft.bench.lowbit.
"""

from hpml_ft.bench.cli import main

__all__ = ["main"]
