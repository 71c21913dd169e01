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
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
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
        return p
    fail(f"{p} is not a saved {what} (no config.json or adapter_config.json)")


def latest_finished_run(root: str | Path = "outputs") -> Path | None:
    """The most recently finished run directory under `root` (by its run.json), or None."""
    runs = [r.parent for r in Path(root).glob(f"*/{RUN_RECORD}")]
    return max(runs, key=lambda r: (r / RUN_RECORD).stat().st_mtime) if runs else None


def read_run(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / RUN_RECORD).read_text())
