"""Host memory: give freed tensor memory back to the OS, so a CPU run's RSS is what is live, not what was.

glibc serves an allocation above M_MMAP_THRESHOLD (128 KiB at start) with its own mmap and unmaps it on free, but
each time such a block is freed it raises the threshold to that block's size (up to 32 MiB). After a few frees,
tensors of a few MiB come from the heap instead, and a freed one stays in the process whenever anything
allocated after it is still alive. A training step allocates and frees hundreds of such tensors (activations,
recomputed layers, gradients, LM-head tiles), so RSS climbs far above the live tensors: TAT-QA LoRA held ~3.0 GB
between steps with spikes to 4.3 GB, and 1.3-1.4 GB between steps with a 2.7 GB peak once the threshold is pinned
(docs/performance.md, "Host memory on CPU"). Pinning it (mallopt) turns the adjustment off, as setting MALLOC_MMAP_THRESHOLD_ before
start would. The price is a page fault per fresh page of every large tensor: +35% step time on that recipe, so
it is opt-in (`train.release_host_memory`). A user who set that variable (or any glibc tunable) keeps theirs.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>
PINNED_THRESHOLD = 64 * 1024  # bytes: tensors from here up are mmapped and unmapped on free


def pin_mmap_threshold(nbytes: int = PINNED_THRESHOLD) -> bool:
    """Pin glibc's mmap threshold at `nbytes`. True when applied; False off glibc or when the user chose."""
    if sys.platform != "linux" or "MALLOC_MMAP_THRESHOLD_" in os.environ or "GLIBC_TUNABLES" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library: no library search, no subprocess
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, nbytes))
