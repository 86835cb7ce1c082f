"""sparc_stream/cli/allocator.py: the heap trimmer every entry point starts (its effect is measured by
benchmarks/soak.py)."""

from __future__ import annotations

import threading

from sparc_stream.cli import allocator


def test_the_trimmer_runs_once_per_process_in_a_daemon_thread():
    first, again = allocator.tune_allocator(), allocator.tune_allocator()
    assert first == again == "trimming"  # this machine's malloc is glibc's
    trimmers = [t for t in threading.enumerate() if t.name == "malloc-trim"]
    assert len(trimmers) == 1 and trimmers[0].daemon and trimmers[0].is_alive()
