"""How memory and speed are measured, in one place for training, bench and quant: current and peak resident
memory, the device's peak, a sampler of the peak while a block runs, and a fresh-process JSON worker (a
configuration measured in its own process, so that its peak memory is its own and a crash loses only it).

torch is imported lazily: the CLIs that import this keep an instant --help."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any


def rss_mib() -> float:
    """Current resident memory of this process (MiB); where /proc is missing, the peak instead."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):
        return peak_rss_mib()


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (MiB; the kernel's high-water mark)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_device_peak() -> None:
    """Start the GPU allocator's peak counter afresh (no-op without CUDA)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_memory() -> dict[str, float]:
    """{cpu_peak_rss_mib, gpu_peak_allocated_mib (with CUDA)}: what metrics.json and the benches record."""
    import torch

    out = {"cpu_peak_rss_mib": round(peak_rss_mib(), 1)}
    if torch.cuda.is_available():
        out["gpu_peak_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


class PeakRSS:
    """Peak resident memory while the block runs (sampled every 5 ms), in MiB: unlike `peak_rss_mib`, a peak
    reached before the block (model loading) does not count."""

    def __enter__(self) -> PeakRSS:
        self.peak, self._stop = rss_mib(), threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._t.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss_mib())


def print_json_line(data: dict[str, Any]) -> None:
    """A worker's result: the last stdout line, read by `run_json_worker`."""
    sys.stdout.flush()
    print(json.dumps(data, default=str))


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM when its parent dies (timeout, Ctrl-C), never runs on orphaned."""
    import ctypes
    import signal

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class WorkerError(RuntimeError):
    """A worker exited non-zero; `last_line` is the last line of its stderr (the reason, usually)."""

    def __init__(self, what: str, stderr: str) -> None:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip()] or ["no output"]
        self.last_line, self.stderr = lines[-1][:300], stderr
        super().__init__(f"{what} failed: {self.last_line}")


def run_json_worker(module_args: list[str], payload: Any, what: str) -> dict[str, Any]:
    """`python -m MODULE ARGS... PAYLOAD.json` in a fresh process; its last stdout line is its JSON result.
    Raises WorkerError (with the worker's stderr) when it fails."""
    with tempfile.TemporaryDirectory(prefix="hpml_worker_") as tmp:
        job = Path(tmp) / "job.json"
        job.write_text(json.dumps(payload))
        done = subprocess.run(
            [sys.executable, "-m", *module_args, str(job)],
            capture_output=True,
            text=True,
            check=False,
            preexec_fn=_die_with_parent,
        )
    if done.returncode != 0:
        raise WorkerError(what, done.stderr)
    return json.loads(done.stdout.strip().splitlines()[-1])
