"""Crash safety: SIGKILL a writer process at random moments; no reader ever sees a partial snapshot."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from codebook_store import open_store

ROUNDS = 12
KEEP_LAST = 4

# Waits for a line on stdin, then puts ~3 MB snapshots with increasing versions forever, pruning now and
# then; prints "writing", then "begin v" / "end v" around each put.
WRITER = f"""
import sys, time
import torch
from codebook_store import Snapshot, open_store

torch.set_num_threads(1)
url, seed = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()  # imported; wait for "go" (the previous writer is dead by then)
store = open_store(url)
g = torch.Generator().manual_seed(seed)
print("writing", flush=True)
while True:
    versions = store.versions()
    version = versions[-1] + 1 if versions else 1
    n = 20_000
    snapshot = Snapshot(
        model="sparc", version=version, parent=versions[-1] if versions else None, created_at=time.time(),
        watermark={{"replay": version}}, config={{"seed": seed}},
        codebooks=torch.randn(3, 16, 8, generator=g),
        item_codes=torch.randint(0, 16, (n + 1, 3), generator=g),
        weights={{"item_embedding": torch.randn(n + 1, 32, generator=g)}}, health={{}},
    )
    print("begin", version, flush=True)
    store.put(snapshot)
    print("end", version, flush=True)
    if version % 3 == 0:
        store.prune(keep_last={KEEP_LAST})
"""


def spawn_writer(url: str, seed: int) -> subprocess.Popen:
    """Start a writer; it imports torch (the slow part) while the previous round runs."""
    return subprocess.Popen(
        [sys.executable, "-c", WRITER, url, str(seed)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def let_go(
    proc: subprocess.Popen,
) -> tuple[threading.Thread, list[tuple[str, int]], threading.Event, list[float]]:
    """Start the writer; a thread collects its (event, version) lines, flags each "begin" of a put and records
    how long each put took as seen from here (begin line to end line)."""
    proc.stdin.write("go\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if line.strip() != "writing":
        proc.kill()
        pytest.fail(f"writer did not start: {line!r} {proc.stderr.read()}")
    events: list[tuple[str, int]] = []
    durations: list[float] = []
    began = threading.Event()

    def collect() -> None:
        start = 0.0
        for line in proc.stdout:
            if not line.endswith("\n"):  # the last line, torn by the SIGKILL
                break
            kind, _, version = line.strip().partition(" ")
            events.append((kind, int(version)))
            if kind == "begin":
                start = time.monotonic()
                began.set()
            else:
                durations.append(time.monotonic() - start)

    thread = threading.Thread(target=collect, daemon=True)
    thread.start()
    return thread, events, began, durations


def read_while_writing(url: str, seconds: float) -> int:
    """Poll latest() from this (another) process; every answer must verify. Returns the reads done (>= 1)."""
    reads = 0
    deadline = time.monotonic() + seconds
    with open_store(url, read_only=True) as reader:
        while reads == 0 or time.monotonic() < deadline:
            reader.latest()  # a complete snapshot or None; verifies every checksum or raises
            reads += 1
    return reads


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["file", "rocksdb"])
def test_killing_the_writer_never_exposes_a_partial_snapshot(backend: str, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/store" if backend == "file" else f"rocksdb://{tmp_path}/store"
    rng = random.Random(2024)
    interrupted = reads = 0
    upcoming = spawn_writer(url, 0)
    try:
        for round_ in range(ROUNDS):
            proc, upcoming = upcoming, (spawn_writer(url, round_ + 1) if round_ + 1 < ROUNDS else None)
            collector, events, began, durations = let_go(proc)
            try:
                reads += read_while_writing(url, rng.uniform(0.05, 0.6))
                if round_ % 2:  # every other round: aim the kill into a put, within its first half
                    began.clear()
                    began.wait(timeout=30)
                    typical = sorted(durations)[len(durations) // 2] if durations else 0.04  # this round's median
                    time.sleep(rng.uniform(0.0, 0.5 * typical))
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
            collector.join(timeout=30)
            if events and events[-1][0] == "begin":
                interrupted += 1  # killed while a put was in flight
            ended = [v for kind, v in events if kind == "end"]

            with open_store(url) as store:  # what a restarted worker sees
                versions = store.versions()
                for version in versions:
                    assert store.get(version).version == version  # every listed version verifies
                latest = store.latest()
                if versions:
                    assert latest is not None and latest.version in versions
                if ended:  # a put that returned is durable and made latest
                    assert ended[-1] in versions and latest.version >= ended[-1]
                assert all(info.version in versions for info in store.list())
    finally:
        if upcoming is not None:  # a failed round leaves the next writer waiting
            upcoming.kill()
            upcoming.wait(timeout=30)

    assert interrupted >= ROUNDS // 4, f"only {interrupted} kills landed inside a put; the test proved little"
    print(f"{backend}: {interrupted}/{ROUNDS} kills inside a put, {reads} verified concurrent reads")
    assert reads >= ROUNDS
    with open_store(url) as store:
        store.prune(keep_last=KEEP_LAST)
        for version in store.versions():
            store.get(version)
        if backend == "file":
            assert not [
                p for p in (tmp_path / "store" / "sparc").iterdir() if p.name.startswith((".staging", ".trash"))
            ]
        else:
            prefix = b"b/sparc/"
            attempts = {tuple(k[len(prefix) :].split(b"/")[:2]) for k in store._scan(prefix)}
            assert sorted(int(v) for v, _ in attempts) == store.versions()  # orphans of killed puts are gone
