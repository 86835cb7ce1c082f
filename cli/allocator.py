"""The memory allocator setting every `sparc` process (and every benchmark) applies at start.

glibc's malloc serves requests above a threshold with mmap (returned to the system on free) and the rest from
heaps it rarely gives back. The threshold starts at 128 KiB and, by default, rises to the largest block freed
so far (up to 32 MiB): after a few large tensors are freed, tensors of several MiB come from the heaps, which
fragment and keep growing. Measured here: a full-Beauty replay grew to ~3 GB RSS; with the threshold fixed at
64 KiB it stayed at ~750 MB (benchmarks/soak.py measures the worker's loop both ways; README, "Memory").

`tune_allocator()` fixes the threshold with mallopt(M_MMAP_THRESHOLD) -- what the MALLOC_MMAP_THRESHOLD_
environment variable does, without a re-exec -- unless that variable is set (the operator's value wins, glibc
applied it at start). It affects allocations made after the call, so entry points call it first.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

MMAP_THRESHOLD = 65_536  # bytes: blocks at least this large are mmap'ed and returned to the system when freed
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (glibc malloc.h)
ENV_VAR = "MALLOC_MMAP_THRESHOLD_"


def tune_allocator(threshold: int = MMAP_THRESHOLD) -> str:
    """Fix glibc's mmap threshold at `threshold` bytes. Returns what happened: "set", "env" (the operator set
    MALLOC_MMAP_THRESHOLD_; left alone) or "unsupported" (not glibc, e.g. musl or macOS: nothing to do)."""
    if ENV_VAR in os.environ:
        return "env"
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return "unsupported"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return "set" if mallopt(M_MMAP_THRESHOLD, threshold) == 1 else "unsupported"
