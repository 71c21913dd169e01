"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Callable
from typing import NoReturn


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


# Import-time notices of optional backends that say nothing about the user's command; printed before an
# error line they bury it (torchao's CUDA kernels on a CPU box, a torch deprecation, bitsandbytes' CPU kernels).
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes")
_NOISY_MESSAGES = ("Setting accelerator to CPU",)  # DeepSpeed on a machine without an accelerator


def _drop_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISY_MESSAGES)


def quiet_library_noise() -> None:
    """Silence the import-time notices above, so a failing command prints only its `error:` line."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_drop_noise)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a CLI entry point, turning `UserError` into `error: ...` on stderr and exit code 2."""
    quiet_library_noise()
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one `error: ...` line (naming the problem and `--help`) instead of a usage dump."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {self.prog}: {message}; see {self.prog} --help", file=sys.stderr)
        sys.exit(2)


def finite_float(text: str) -> float:
    """argparse type: a real number; nan and inf are refused (they pass every `<= 0` check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0 (timeouts, memory sizes)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (counts, sizes)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a positive integer")
    return value
