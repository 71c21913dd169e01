"""Run directories: atomic writes, completion records, finding finished runs.

Every artifact (adapter, merged model, consolidated model) is written into a hidden temporary directory and
renamed into place only when complete, carrying `hpml_ft.json` (what it is, the recipe, versions, metrics).
A run directory is finished when its `run.json` exists; it is written last. Temp names carry `<pid>@<host>`:
a failed or stopped write removes its own (`staged`), the next write to the same target removes a killed
process's (`sweep_stale`). `check_output_target` is the one output rule of every command.

Over 300 lines: every rule about writing (atomic writes, staging cleanup, the output rule, run-dir locks and
swaps) lives in this one module, so that no command grows its own variant.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from hpml_ft.config import redact, redact_text
from hpml_ft.errors import disk_full_message, fail, is_disk_full, note_output, uninterrupted
from hpml_ft.model import check_weight_files

RUN_RECORD = "run.json"
ARTIFACT_RECORD = "hpml_ft.json"
_PACKAGES = (
    "hpml_ft",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "bitsandbytes",
    "deepspeed",
)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            out[name] = importlib.metadata.version(name)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def staged(tmp: Path, target: Path, need: int | None = None) -> Iterator[Path]:
    """Remove the temp file/dir `tmp` when writing `target` through it fails or is stopped (error, Ctrl-C,
    SIGTERM: see errors.run_cli); a full disk becomes one error line naming `target` (and `need`, in bytes)."""
    try:
        yield tmp
    except BaseException as err:
        _remove(tmp)
        if is_disk_full(err):
            fail(disk_full_message(target, need))
        raise


def _write_atomic(path: Path, text: str) -> None:
    """A temp file beside `path` renamed over it when complete, with the mode a plain open() gives it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with staged(Path(tmp), path), os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o666 & ~_umask())  # mkstemp's 0600 would lock out a team sharing the run dir
        f.write(text)
        f.close()
        os.replace(tmp, path)


def write_json_atomic(path: Path, data: Any) -> None:
    _write_atomic(Path(path), json.dumps(redact(data), indent=2, default=str) + "\n")  # secrets as ***


def write_text_atomic(path: Path, text: str) -> None:
    _write_atomic(Path(path), redact_text(text))  # URL passwords and bearer keys as ***


def _owner() -> str:
    """`<pid>@<host>` in a staging name, so that a later write to the same target knows when it is stale."""
    return f"{os.getpid()}@{re.sub(r'[^A-Za-z0-9]', '_', socket.gethostname())}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale(target: Path) -> None:
    """Remove what a process killed while writing `target` left beside it (kill -9: no cleanup ran): its
    staging dir, or the old result it had set aside, which goes back in place when nothing replaced it."""
    host = _owner().partition("@")[2]
    pattern = re.compile(rf"\.{re.escape(target.name)}\.(tmp|old)-(\d+)@(\w+)(-|$)")
    for path in target.parent.glob(f".{target.name}.*"):
        found = pattern.match(path.name)
        if not found or found[3] != host or _alive(int(found[2])):
            continue  # not ours, another machine's (pids mean nothing here), or still being written
        if found[1] == "old" and not target.exists():
            os.replace(path, target)
        else:
            _remove(path)


def finalize_dir(staging: Path, target: Path, record: dict[str, Any] | None = None) -> Path:
    """Write the artifact record into a fully written `staging` dir, then rename it to `target`."""
    rec = {"kind": target.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}
    write_json_atomic(Path(staging) / ARTIFACT_RECORD, {**rec, **(record or {})})
    os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes 0700 directories; give the mode mkdir would
    aside = target.parent / f".{target.name}.old-{_owner()}"
    with uninterrupted():  # SIGTERM waits for both renames
        if target.exists():  # rename the old one aside first: a crash here never leaves neither
            os.replace(target, aside)
        os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: Path, record: dict[str, Any] | None = None, need: int | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success finalize it as `target`; on error or SIGTERM remove it.
    `need` (bytes, when known) is checked against the free space before anything is written."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target)
    if need and shutil.disk_usage(target.parent).free < need:
        fail(disk_full_message(target, need))
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-{_owner()}-"))
    with staged(tmp, target, need):
        yield tmp
        finalize_dir(tmp, target, record)


def require_complete_model(path: str | Path, what: str = "model") -> Path:
    """Refuse a directory that is not a complete saved model/adapter (e.g. a crashed write)."""
    p = Path(path)
    if not p.is_dir():
        fail(f"{what} directory not found: {p}")
    if p.name.startswith(".") and ".tmp-" in p.name:
        fail(f"{p} is an unfinished write (temporary directory); rerun the step that produces it")
    has_weights = any(p.glob("*.safetensors")) or any(p.glob("*.bin"))
    is_hpml = p.parent.joinpath(RUN_RECORD).exists() or (p / ARTIFACT_RECORD).exists()
    if (p / "config.json").exists() or (p / "adapter_config.json").exists():
        if not has_weights:
            fail(f"{p} has a config but no weight files; it is incomplete, rerun the step that wrote it")
        if p.parent.joinpath("checkpoints").exists() and not is_hpml:
            fail(
                f"{p} belongs to a run that did not finish (no {RUN_RECORD}); resume it with train.resume=auto"
            )
        check_weight_files(p)  # truncated/corrupt weights: one line now, not a traceback at load
        return p
    fail(f"{p} is not a saved {what} (no config.json or adapter_config.json)")


def finished_runs(root: str | Path = "outputs") -> list[Path]:
    """The finished run directories under `root` (those with a run.json), oldest first."""
    runs = [r.parent for r in Path(root).glob(f"*/{RUN_RECORD}")]
    return sorted(runs, key=lambda r: (r / RUN_RECORD).stat().st_mtime)


def latest_finished_run(root: str | Path = "outputs") -> Path | None:
    """The most recently finished run directory under `root` (by its run.json), or None."""
    runs = finished_runs(root)
    return runs[-1] if runs else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A finished run's record; a damaged one (not a JSON object) is one error line, for every command."""
    path = Path(run_dir) / RUN_RECORD
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:  # JSONDecodeError is a ValueError
        fail(f"{path} is not a valid run record ({str(err)[:80]}); restore it or rerun the training")
    if not isinstance(record, dict):
        fail(f"{path} is not a valid run record (a JSON {type(record).__name__}, not an object); restore it")
    return record


def check_output_target(
    path: str | Path,
    what: str = "output directory",
    inputs: Iterable[str | Path | None] = (),
    overwrite: bool | None = None,
) -> Path:
    """The output rule of every command that writes a result, checked before any work:

    - the location is a directory that can be created and written (walking up to the first existing
      ancestor, so the real write at the end of a long job cannot fail on it);
    - it never overlaps one of the command's `inputs` (see `check_not_input`), --overwrite or not;
    - an existing result is replaced only with --overwrite (`overwrite`; None where the caller keeps its own
      rule, as train does for run dirs), and never a training run dir or a folder hpml_ft did not write.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        fail(f"{what} {p} is a file, not a directory; pass a directory path")
    probe = p
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        fail(f"{what} {p} cannot be created: {probe} is a file; pass another path")
    if not os.access(probe, os.W_OK | os.X_OK):
        fail(f"{what} {p} is not writable ({probe} denies writes); pass a writable path")
    check_not_input(p, inputs, what)
    if overwrite is not None and p.is_dir() and any(p.iterdir()):
        if (p / RUN_RECORD).exists():
            fail(f"{what} {p} is a training run directory; write the result elsewhere, e.g. {p / 'results'}")
        if not any((p / name).is_file() for name in (ARTIFACT_RECORD, "results.json")):
            fail(f"{what} {p} exists and holds files hpml_ft did not write; pick a new folder")
        if not overwrite:
            fail(f"{what} {p} already holds a result; pass --overwrite to replace it or pick another folder")
    note_output(p)  # a full disk later is reported at this location
    return p


def check_not_input(target: str | Path, inputs: Iterable[str | Path | None], what: str) -> None:
    """Refuse a target equal to, containing or inside an input of the command: replacing it would delete
    the input (a run training from its own merged/, a model quantized into itself), or writing would change
    it while it is read."""
    out = Path(target).resolve()
    for src in inputs:
        if not src or not Path(src).exists():
            continue  # a hub id or 'embedded': nothing on disk to overlap
        i = Path(src).resolve()
        if out == i or out in i.parents or i in out.parents:
            why = "is" if out == i else "contains" if out in i.parents else "lies inside"
            fail(f"{what} {target} overlaps the input {src} (it {why} it); write somewhere outside it")


# ---------------------------------------------------------------- run directories: lock, states, swap

_LOCKS: dict[str, int] = {}  # lock files held for the life of this process (released by the kernel on exit)
# What a fresh run writes before its first checkpoint; a dir holding only these is a failed start.
# (tracker dirs, loss.png and samples.jsonl are written from the first logging step on: see train/callbacks.py)
_START_FILES = {
    "recipe.yaml",
    "checkpoints",
    "runs",
    "logs",
    "wandb",
    "trackio",
    "profile",
    "loss.png",
    "samples.jsonl",
    ".adapter.tmp",
    ".merged.tmp",
}


def lock_run(output_dir: Path, run_name: str) -> Path:
    """Take an exclusive lock on a run name for this process's life; refuse a second writer.

    The lock file sits beside the run dir (not in it) so that replacing the run dir keeps it. `flock` is
    released by the kernel when the process dies, so a crash or kill -9 never leaves a stale lock.
    """
    import fcntl

    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / f".{run_name}.lock"
    if str(path) in _LOCKS:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 64).decode(errors="replace").strip() or "another process"
        os.close(fd)
        fail(
            f"{output_dir / run_name} is in use by another training ({holder}); wait for it to finish "
            "or pick another train.run_name"
        )
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()}".encode())
    _LOCKS[str(path)] = fd
    return path


def release_run_locks() -> None:
    """Release the run locks this process holds (the run ended; tests run several trainings in one process)."""
    while _LOCKS:
        os.close(_LOCKS.popitem()[1])  # closing the descriptor releases the flock


def run_state(run_dir: Path) -> str:
    """'empty', 'failed_start' (nothing worth keeping), 'unfinished' (has a checkpoint), 'finished', or 'other'."""
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return "empty"
    if (run_dir / RUN_RECORD).exists():
        return "finished"
    if any((run_dir / "checkpoints").glob("checkpoint-*")):
        return "unfinished"
    names = {p.name for p in run_dir.iterdir()}
    return "failed_start" if names <= _START_FILES else "other"


def staging_run_dir(run_dir: Path) -> Path:
    """Where an overwriting run trains until it finishes (the old run stays untouched until then)."""
    return run_dir.parent / f".{run_dir.name}.overwrite" / run_dir.name


def promote_run(staged: Path, target: Path) -> None:
    """Replace `target` by the finished `staged` run: rename the old one aside, rename, then delete the old."""
    aside = target.parent / f".{target.name}.replaced"
    if aside.exists():
        shutil.rmtree(aside)
    if target.exists():
        os.replace(target, aside)
    os.replace(staged, target)
    shutil.rmtree(staged.parent, ignore_errors=True)
    shutil.rmtree(aside, ignore_errors=True)


def recover_replaced(target: Path) -> None:
    """A kill between promote_run's two renames leaves only `.NAME.replaced`: put the old run back."""
    aside = target.parent / f".{target.name}.replaced"
    if not aside.exists():
        return
    state = run_state(target)
    if state == "empty":  # nothing, or an empty dir another rank made first: the old run goes back
        if target.exists():
            target.rmdir()
        os.replace(aside, target)
    elif state == "finished":  # the swap completed: the old copy is no longer needed
        shutil.rmtree(aside, ignore_errors=True)
    # anything else in place: keep both, never delete the only complete copy
