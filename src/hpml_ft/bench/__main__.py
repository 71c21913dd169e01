"""`python -m hpml_ft.bench ...` (see hpml_ft.bench.cli)."""

from hpml_ft.bench.cli import main
from hpml_ft.errors import run_cli

if __name__ == "__main__":
    run_cli(main)
