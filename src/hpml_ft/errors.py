"""User-facing errors: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import errno
import logging
import math
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn


class UserError(Exception):
    """Bad input that the user can fix. The message names the problem and the fix."""


def fail(message: str) -> NoReturn:
    raise UserError(message)


class Terminated(BaseException):
    """SIGTERM (`kill`, a scheduler, a launcher stopping its workers), raised like Ctrl-C's KeyboardInterrupt so
    that every `finally` and staging cleanup runs before the process exits (see `run_cli`)."""


# ---------------------------------------------------------------- full disk

_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# safetensors wraps the OSError in its own error whose text is all that is left of it
_DISK_FULL_TEXT = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")
_OUTPUTS: list[Path] = []  # where this command writes, as checked by outputs.check_output_target


def is_disk_full(err: BaseException | None) -> bool:
    """ENOSPC / EDQUOT, also when a library re-raised it as its own error type."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _DISK_FULL_ERRNOS:
            return True
        if any(text in str(err) for text in _DISK_FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _size(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def disk_full_message(path: str | Path, need: int | None = None) -> str:
    """One line naming the location, the space left there and, when known, the space the write needs."""
    probe = Path(path).absolute()
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    needed = f", about {_size(need)} needed" if need else ""
    return (
        f"no space left on device writing {path} ({_size(free)} free there{needed}); "
        "free some space or write elsewhere"
    )


def note_output(path: str | Path) -> None:
    """Remember where this command writes: a full disk outside any staged write is reported there."""
    _OUTPUTS.append(Path(path))


# ---------------------------------------------------------------- SIGTERM

_SIGNAL = {"critical": 0, "pending": False}


def _terminate(signum: int, frame: Any) -> None:
    if _SIGNAL["critical"]:  # inside `uninterrupted`: raised when it ends
        _SIGNAL["pending"] = True
        return
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """Defer SIGTERM over steps that must happen together (the renames that swap in a finished result)."""
    _SIGNAL["critical"] += 1
    try:
        yield
    finally:
        _SIGNAL["critical"] -= 1
    if _SIGNAL["pending"] and not _SIGNAL["critical"]:
        _SIGNAL["pending"] = False
        _terminate(signal.SIGTERM, None)


# Import-time notices of optional backends that say nothing about the user's command; printed before an
# error line they bury it (torchao's CUDA kernels on a CPU box, a torch deprecation, bitsandbytes' CPU kernels,
# the `kernels` hub loader's offline notice that transformers >= 5.25 triggers when bitsandbytes is imported).
_NOISY_LOGGERS = ("torchao", "torch.utils._pytree", "bitsandbytes", "kernels")
_NOISY_MESSAGES = ("Setting accelerator to CPU",)  # DeepSpeed on a machine without an accelerator


def _drop_noise(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(_NOISY_MESSAGES)


def quiet_library_noise() -> None:
    """Silence the import-time notices above, so a failing command prints only its `error:` line."""
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    logging.getLogger("DeepSpeed").addFilter(_drop_noise)


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> NoReturn:
    """Run a CLI entry point, turning `UserError` into `error: ...` on stderr and exit code 2.

    A full disk is one `error:` line too (staged writes have removed their temp files by then), and SIGTERM
    unwinds like Ctrl-C, so that staged writes remove their temp files before the process exits (143).
    """
    quiet_library_noise()
    _OUTPUTS.clear()
    handles = threading.current_thread() is threading.main_thread()  # signal handlers live in the main thread
    previous = signal.signal(signal.SIGTERM, _terminate) if handles else None
    try:
        code = main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Terminated:
        print("terminated", file=sys.stderr)
        sys.exit(143)
    except Exception as err:
        if not is_disk_full(err):
            raise
        where = getattr(err, "filename", None) or (_OUTPUTS[-1] if _OUTPUTS else Path.cwd())
        print(f"error: {disk_full_message(where)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if handles:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
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
