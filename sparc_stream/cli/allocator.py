"""The memory setting every `sparc` process (and every benchmark) applies at start: a heap trimmer.

glibc's malloc serves blocks below its mmap threshold from heaps it rarely gives back, and raises that threshold
to the largest block freed (up to 32 MiB): tensors of a few MiB, allocated and freed every training step, come
from the heaps, which fragment, and RSS creeps up. Two fixes were measured on the worker's loop over the full
Beauty stream (benchmarks/soak.py; README, "Memory"):
  - MALLOC_MMAP_THRESHOLD_=65536 (every block of 64 KiB or more mmap'ed, unmapped when freed): RSS ~180 MB
    lower, but every step's tensors then cost fresh zeroed pages: 138 M page faults instead of 12 M, and the
    process used 1.9x the CPU time (a Beauty replay too). Too dear to set by default.
  - malloc_trim(0) from time to time: glibc hands the free pages inside its heaps back to the system. This module
    does that from a daemon thread every TRIM_SECONDS; it costs a few percent of CPU (README has the numbers).

`tune_allocator()` starts that thread once per process (a ctypes call releases the GIL, so it runs beside the
learner). It does nothing where malloc is not glibc's (musl, macOS). An operator who wants the mmap threshold
instead sets MALLOC_MMAP_THRESHOLD_ in the environment; glibc applies it at start, and the trimmer still runs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time

TRIM_SECONDS = 1.0

_started = threading.Lock()
_thread: threading.Thread | None = None


def _malloc_trim():
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def tune_allocator(seconds: float = TRIM_SECONDS) -> str:
    """Start the heap trimmer (module doc) unless it runs already. Returns "trimming" (started or running) or
    "unsupported" (no glibc malloc_trim here)."""
    global _thread
    trim = _malloc_trim()
    if trim is None:
        return "unsupported"
    with _started:
        if _thread is None:

            def run() -> None:
                while True:
                    time.sleep(seconds)
                    trim(0)

            _thread = threading.Thread(target=run, name="malloc-trim", daemon=True)
            _thread.start()
    return "trimming"
