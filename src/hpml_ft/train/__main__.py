"""`python -m hpml_ft.train` / `accelerate launch -m hpml_ft.train`."""

from hpml_ft.errors import run_cli
from hpml_ft.train.cli import main

if __name__ == "__main__":
    run_cli(main)
