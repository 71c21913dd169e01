"""CPU threads: use every core this process owns (cores / local processes), also under `accelerate launch`.

`accelerate launch` (and `torchrun` with several processes) export OMP_NUM_THREADS=1 to the script when the
user did not set it, so torch would train on one core. They leave no marker, but they pass the script a
modified copy of their own environment: the launcher's environment (our parent process, /proc/PPID/environ)
is what the user exported. OMP_NUM_THREADS present in ours and absent in the parent's = set by the launcher,
and replaced here. Precedence: `train.cpu_threads` > OMP_NUM_THREADS the user set > auto.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

LAUNCHER_MARKERS = (
    "ACCELERATE_USE_CPU",
    "ACCELERATE_MIXED_PRECISION",
    "TORCHELASTIC_RUN_ID",
    "LOCAL_WORLD_SIZE",
)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # cores this process may run on (taskset, cgroups cpusets)
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def parent_environ(pid: int | None = None) -> dict[str, str] | None:
    """The launcher's environment (Linux /proc); None where it cannot be read."""
    try:
        raw = open(f"/proc/{pid or os.getppid()}/environ", "rb").read()  # noqa: SIM115
    except OSError:
        return None
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def local_processes(env: Mapping[str, str]) -> int:
    for key in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if env.get(key, "").isdigit() and int(env[key]) > 0:
            return int(env[key])
    return 1


def launcher_set_omp(env: Mapping[str, str], parent: Mapping[str, str] | None) -> bool:
    """True when OMP_NUM_THREADS was exported by a launcher, not by the user."""
    if "OMP_NUM_THREADS" not in env or not any(k in env for k in LAUNCHER_MARKERS):
        return False
    if parent is not None:
        return "OMP_NUM_THREADS" not in parent
    return env["OMP_NUM_THREADS"] == "1"  # no /proc: a launcher's default value is 1


def resolve_threads(
    configured: int | None,
    env: Mapping[str, str],
    parent: Mapping[str, str] | None,
    cores: int,
) -> tuple[int, str]:
    """(threads, why) for this process."""
    if configured:
        return configured, "train.cpu_threads"
    omp = env.get("OMP_NUM_THREADS", "")
    if omp.isdigit() and int(omp) > 0 and not launcher_set_omp(env, parent):
        return int(omp), "OMP_NUM_THREADS set by the user"
    n = local_processes(env)
    why = f"{cores} cores / {n} local process{'es' if n > 1 else ''}"
    if omp and launcher_set_omp(env, parent):
        why += f"; replaced OMP_NUM_THREADS={omp} set by the launcher"
    return max(1, cores // n), why


def apply_cpu_threads(configured: int | None = None, log: bool = True) -> int:
    """torch.set_num_threads for CPU work (a no-op on CUDA machines, where the GPU does the work)."""
    import torch

    if torch.cuda.is_available() and not configured:
        return torch.get_num_threads()
    n, why = resolve_threads(configured, os.environ, parent_environ(), available_cores())
    torch.set_num_threads(n)
    if log and int(os.environ.get("RANK", "0")) == 0:
        print(f"[hpml_ft] CPU threads: {n} per process ({why})")
    return n
