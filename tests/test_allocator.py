"""Freed tensor memory goes back to the OS once glibc's mmap threshold is pinned (hpml_ft.system.allocator)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from hpml_ft.system.allocator import pin_mmap_threshold

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="glibc allocator behaviour")

# A freed 8 MiB tensor raises glibc's dynamic threshold to 8 MiB; then 100 x 4 MiB tensors come from the heap,
# each followed by a small tensor that stays alive, so freeing the big ones leaves holes glibc cannot trim.
SCRIPT = """
import sys, torch
from hpml_ft.system.allocator import pin_mmap_threshold
if sys.argv[1] == "pin":
    assert pin_mmap_threshold()
def rss_mib():
    line = next(x for x in open("/proc/self/status") if x.startswith("VmRSS"))
    return int(line.split()[1]) // 1024
torch.empty(8 << 20, dtype=torch.uint8).fill_(1)
base = rss_mib()
big, small = [], []
for _ in range(100):
    big.append(torch.ones(1 << 20))
    small.append(torch.ones(1 << 14))
del big
print(rss_mib() - base)
"""


def retained_mib(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True
    )
    return int(out.stdout.strip().splitlines()[-1])


def test_pinned_threshold_returns_freed_tensors_to_the_os():
    kept = retained_mib("default")
    pinned = retained_mib("pin")
    assert kept > 200, f"control: glibc's default should keep the freed 400 MiB, kept {kept} MiB"
    assert pinned < 50, f"pinned threshold still keeps {pinned} MiB of freed tensors"


def test_a_user_setting_wins(monkeypatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert pin_mmap_threshold() is False
