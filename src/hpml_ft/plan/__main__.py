"""`python -m hpml_ft.plan`: see hpml_ft.plan.cli."""

from hpml_ft.errors import run_cli
from hpml_ft.plan.cli import main

if __name__ == "__main__":
    run_cli(main)
