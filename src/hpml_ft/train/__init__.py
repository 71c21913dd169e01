"""Training: `python -m hpml_ft.train` (cli.py: arguments, preflight, run dir) and the run it drives
(runner.py: setup -> before-eval -> train -> after-eval -> save; trainer.py: SFTConfig and the SFTTrainer;
grpo.py + rewards.py: train.stage=grpo, its GRPOTrainer and the reward registry; callbacks.py: what a user sees
while training; packing.py: packed and padding-free batches; report.py: the dry-run summary and the model card).
Nothing below this package imports it."""


def main(argv: list[str] | None = None) -> int:
    """The training command (lazy, so importing the package, e.g. for `--help`, loads nothing heavy)."""
    from hpml_ft.train.cli import main as cli_main

    return cli_main(argv)
