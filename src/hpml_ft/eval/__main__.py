"""`python -m hpml_ft.eval`: the evaluation CLI (see `hpml_ft.eval.cli`)."""

from hpml_ft.errors import run_cli
from hpml_ft.eval.cli import main

if __name__ == "__main__":
    run_cli(main)
