"""`python -m hpml_ft.quantize`: the entry point of the low-bit command, whose code is `hpml_ft.quant.cli`."""

from hpml_ft.errors import run_cli
from hpml_ft.quant.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    run_cli(main)
