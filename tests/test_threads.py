"""CPU threads: cores / local processes, also when a launcher exported OMP_NUM_THREADS=1; a user's value stays."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from hpml_ft.system.threads import available_cores, resolve_threads

LAUNCHED = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no"}


def test_launcher_value_is_replaced_by_cores_over_local_processes():
    env = {**LAUNCHED, "OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}
    n, why = resolve_threads(None, env, parent={"PATH": "/bin"}, cores=16)  # the user's env: no OMP
    assert n == 8 and "launcher" in why


def test_user_value_is_left_alone_under_a_launcher():
    env = {**LAUNCHED, "OMP_NUM_THREADS": "1"}
    assert resolve_threads(None, env, parent={"OMP_NUM_THREADS": "1"}, cores=16)[0] == 1
    assert resolve_threads(None, {"OMP_NUM_THREADS": "3"}, parent=None, cores=16)[0] == 3  # plain python


def test_config_wins_and_auto_without_launcher():
    env = {**LAUNCHED, "OMP_NUM_THREADS": "1"}
    assert resolve_threads(5, env, parent={"OMP_NUM_THREADS": "1"}, cores=16) == (5, "train.cpu_threads")
    assert resolve_threads(None, {}, parent={}, cores=6)[0] == 6


def test_without_proc_a_launcher_default_of_one_is_replaced():
    env = {**LAUNCHED, "OMP_NUM_THREADS": "1"}
    assert resolve_threads(None, env, parent=None, cores=4)[0] == 4


def test_available_cores_are_the_ones_this_process_may_run_on(monkeypatch):
    """taskset / a cgroup cpuset: the affinity mask counts, not the machine's cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 7}, raising=False)
    assert available_cores() == 3


# A launcher process that does what `accelerate launch` does: copy its environment, add OMP_NUM_THREADS=1
# (only when absent) and the ACCELERATE_* variables, and start the script as its child. The script owns
# FAKE_CORES cores: its sched_getaffinity answers that many, neither 1 (the launcher's value) nor this machine's
# core count, so a one-core machine cannot pass it by chance.
FAKE_CORES = (os.cpu_count() or 1) + 3
CHILD = (
    f"import os; os.sched_getaffinity = lambda pid: set(range({FAKE_CORES})); "
    "from hpml_ft.system.threads import apply_cpu_threads; import torch; apply_cpu_threads(); "
    "print('N', torch.get_num_threads())"
)
LAUNCHER = textwrap.dedent(
    f"""
    import os, subprocess, sys
    env = os.environ.copy()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(ACCELERATE_USE_CPU="True", ACCELERATE_MIXED_PRECISION="no")
    sys.exit(subprocess.run([sys.executable, "-c", {CHILD!r}], env=env).returncode)
    """
)


def _launched(user_env: dict[str, str]) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"} | user_env
    out = subprocess.run(
        [sys.executable, "-c", LAUNCHER], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    return int(out.split("N ")[-1]), out


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads the launcher's env from /proc")
def test_simulated_accelerate_launch_uses_every_core():
    n, log = _launched({})
    assert n == FAKE_CORES, log  # every core it owns: not 1, not the machine's count
    assert f"CPU threads: {FAKE_CORES} per process" in log and "launcher" in log  # the log says how many, why


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads the launcher's env from /proc")
def test_simulated_accelerate_launch_keeps_a_user_value():
    assert _launched({"OMP_NUM_THREADS": "1"})[0] == 1
