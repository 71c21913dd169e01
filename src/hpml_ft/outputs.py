"""Run directories: atomic writes, completion records, finding finished runs.

Every artifact (adapter, merged model, consolidated model) is written into a hidden temporary directory and
renamed into place only when complete, carrying `hpml_ft.json` (what it is, the recipe, versions, metrics).
A run directory is finished when its `run.json` exists; it is written last.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hpml_ft.errors import fail
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


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2, default=str)
        f.write("\n")
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def finalize_dir(staging: Path, target: Path, record: dict[str, Any] | None = None) -> Path:
    """Write the artifact record into a fully written `staging` dir, then rename it to `target`."""
    rec = {"kind": target.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "versions": versions()}
    write_json_atomic(Path(staging) / ARTIFACT_RECORD, {**rec, **(record or {})})
    os.chmod(staging, 0o755)  # mkdtemp makes 0700 directories; artifacts are meant to be shared
    aside = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():  # rename the old one aside first: a crash here never leaves neither
        os.replace(target, aside)
    os.replace(staging, target)
    shutil.rmtree(aside, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: Path, record: dict[str, Any] | None = None) -> Iterator[Path]:
    """Yield a temp dir beside `target`; on success finalize it as `target`, on error remove it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        yield tmp
        finalize_dir(tmp, target, record)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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


def latest_finished_run(root: str | Path = "outputs") -> Path | None:
    """The most recently finished run directory under `root` (by its run.json), or None."""
    runs = [r.parent for r in Path(root).glob(f"*/{RUN_RECORD}")]
    return max(runs, key=lambda r: (r / RUN_RECORD).stat().st_mtime) if runs else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN_RECORD).read_text())


def check_output_target(path: str | Path, what: str = "output directory") -> Path:
    """Refuse, before any work, an output location that is a file or cannot be created/written.

    Walks up to the first existing ancestor: that must be a writable directory, so the real write at the end
    of a long job cannot fail on the location.
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
    return p


# ---------------------------------------------------------------- run directories: lock, states, swap

_LOCKS: dict[str, int] = {}  # lock files held for the life of this process (released by the kernel on exit)
# What a fresh run writes before its first checkpoint; a dir holding only these is a failed start.
# (tracker dirs, loss.png and samples.jsonl are written from the first logging step on: see callbacks.py)
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
    if aside.exists() and not target.exists():
        os.replace(aside, target)
    elif aside.exists():
        shutil.rmtree(aside, ignore_errors=True)
