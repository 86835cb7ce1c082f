"""What a scenario of the fault suite gets: a `Context` (its broker, directory, deadline, options, and where its
figures go) and the worker settings every scenario starts from.

A scenario runs in a process of its own (benchmarks/fault_suite.py starts it), against the suite's private broker,
with a directory of its own and a deadline. Every wait it makes is bounded by `ctx.bound(seconds)`, so it ends by
its deadline; `ctx.record(...)` writes the figures so far to disk at once, so a scenario that crashes or is killed
at its deadline still reports what it measured.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.harness import PrivateBroker

ROLES = ("learn", "ingest", "serve")  # the scale-out roles' commands (`sparc learn`, ...)

# Every scenario's worker: the worker's defaults (model, batch size), but snapshots every 2 s (as worker_bench's
# freshness runs) so that versions come often enough to count, and INFO logs. Every version is kept (no
# retention): the audits check that each announced version is in the store.
WORKER_SETTINGS = {"SPARC_SNAPSHOT_EVERY_SECONDS": "2", "SPARC_LOG_LEVEL": "INFO", "SPARC_KEEP_VERSIONS": "0"}


@dataclass
class Options:
    """The suite's knobs a scenario reads (fault_suite's command line)."""

    seed: int = 0
    rate: float = 200.0  # feedback events/s of the load under which faults are injected
    kills: int = 20
    kill_window_s: float = 12.0  # a kill lands U(0.5, this) s after the process works (2/3 of it after a start)
    roles: str = ",".join(ROLES)  # the roles sigkill_roles kills, in this order
    outage_s: float = 20.0
    outage_watch_s: float = 60.0  # watching the worker after the broker is back
    malformed: int = 10_000
    heavy_user_events: int = 100_000
    phase_events: int = 12_800  # the malformed scenario's control/before/after workloads
    soak_minutes: float = 60.0
    soak_rate: float = 300.0


# --quick: every scenario at a small count, for the suite's own end-to-end test (tests/test_fault_suite.py); its
# figures say that each fault is survived, not how well (no time or rate is meaningful at these counts)
QUICK = {"rate": 100.0, "kills": 2, "kill_window_s": 3.0, "outage_s": 4.0, "outage_watch_s": 15.0, "malformed": 360,
         "heavy_user_events": 640, "phase_events": 640, "soak_minutes": 1.0, "soak_rate": 50.0}


@dataclass
class Context:
    broker: PrivateBroker
    bootstrap: str
    workdir: Path
    deadline: float  # time.monotonic() by which the scenario must have returned
    options: Options
    out: Path  # the scenario's figures so far, as JSON
    name: str = "scenario"
    figures: dict[str, Any] = field(default_factory=dict)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def bound(self, seconds: float) -> float:
        """`seconds`, or less when the deadline is nearer (at least 1 s, so a wait still looks once)."""
        return max(1.0, min(seconds, self.left()))

    def say(self, message: str) -> None:
        print(f"[{self.name}] {message}", flush=True)

    def record(self, **figures: Any) -> None:
        self.figures.update(figures)
        self.out.write_text(json.dumps(self.figures, indent=2, default=str) + "\n")
