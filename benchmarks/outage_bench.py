"""How a worker goes through a broker outage under load: the lines, bytes and levels it logs while the broker is
away, the seconds until it ingests, trains and publishes again, and the events lost.

    SPARC_KAFKA_PORT=39392 SPARC_KAFKA_CONTROLLER_PORT=39393 SPARC_KAFKA_DIR=/tmp/kafka-x \\
        python -m benchmarks.outage_bench --broker 127.0.0.1:39392 --out runs/outage_bench.json

The broker is deploy/kafka/broker.sh's, with the SPARC_KAFKA_* environment of this process (it must be running);
the fault suite's outage scenario (benchmarks/faults/outage.py) runs `outage_run` on a broker of its own.
One run = a harness.Deployment (unique topics, consumer group, store and table directory, a processed log):
  1. `sparc worker` starts in a subprocess (a small model here, the worker's defaults in the fault suite;
     --log-format/--log-level given with --worker-flag); a thread of this process produces the synthetic stream's
     feedback at --rate events/s for the whole run, recording what Kafka acknowledged;
  2. --warmup seconds after the worker's first training step, the broker is stopped with `broker.sh stop
     --keep-data`; --outage seconds later it is started again;
  3. from the moment it answers again: the seconds until the worker ingests (sparc_events_total grows), trains
     (sparc_train_steps_total grows) and serves a new snapshot (sparc_snapshot_version grows);
  4. --after seconds after it is back, the worker's log is cut. Counted: the lines and bytes the worker wrote from
     the broker's stop to that cut, per level, and the five most frequent lines (digits masked);
  5. the producer stops; lost = acknowledged events that the latest snapshot has not learnt once it has caught up
     (harness.Deployment.audit, a bounded wait), with the events learnt twice.
No timing is asserted anywhere: this reports what happened.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.harness import (
    TINY_MODEL,
    Deployment,
    PacedProducer,
    broker_sh,
    feedback_events,
    json_messages,
    poll_until,
    synthetic,
)
from sparc_stream.cli.allocator import tune_allocator

LEVELS = ("CRITICAL", "ERROR", "WARNING", "INFO", "DEBUG")
_LEVEL = re.compile(r"\b(CRITICAL|ERROR|WARNING|WARN|INFO|DEBUG)\b")


def line_level(line: str) -> str | None:
    """The level a log line states (JSON lines: their "level"; text: the first level word), None for a
    continuation line (a traceback's)."""
    if line.startswith("{"):
        try:
            return str(json.loads(line).get("level", "")).upper() or None
        except ValueError:
            pass
    found = _LEVEL.search(line[:80])
    if found is None:
        return None
    return "WARNING" if found.group(1) == "WARN" else found.group(1)


def summarise(text: str) -> dict:
    """Lines, bytes, lines per level and the most frequent lines (digits masked) of a piece of log."""
    lines = text.splitlines()
    levels: Counter = Counter()
    shapes: Counter = Counter()
    for line in lines:
        levels[line_level(line) or "continuation"] += 1
        shapes[re.sub(r"\d+", "N", line)[:160]] += 1
    return {"lines": len(lines), "bytes": len(text.encode()), "levels": dict(levels),
            "top_lines": [{"count": n, "line": s} for s, n in shapes.most_common(5)]}


def outage_run(bootstrap: str, stop_broker: Callable[[], None], start_broker: Callable[[], None], workdir: Path, *,
               rate: float, warmup: float, outage: float, after: float, settings: dict[str, str],
               worker_flags: Sequence[str] = (), catch_up_s: float = 300.0,
               say: Callable[[str], None] = print) -> dict:
    """One outage under load (module doc) on a deployment of its own under `workdir`: the figures, lost events
    and the seconds to resume included. `stop_broker` / `start_broker` stop the broker keeping its data and start
    it again (returning once it answers)."""
    d = Deployment(bootstrap, workdir, "outage", settings=settings)
    d.flags += list(worker_flags)
    d.create_topics()
    stream = synthetic(0, int(rate * (warmup + outage + after + 120)))
    producer = PacedProducer(bootstrap, d.topics["feedback"], json_messages(feedback_events(stream)), rate,
                             max_block_ms=1000, reconnect_backoff_max_ms=1000)
    w = d.worker()
    alive = lambda: w.process.poll() is None  # noqa: E731
    out: dict = {"rate": rate, "outage_s": outage, "after_s": after, "worker_flags": list(worker_flags)}
    try:
        w.start()
        out["log"] = str(w.log)
        producer.start()
        trained = poll_until(lambda: w.metric("sparc_train_steps_total") >= 1, 240, alive)
        if trained is None:
            raise RuntimeError(f"the worker did not train within 240 s; its log: {w.log}")
        time.sleep(warmup)
        cut = w.log.stat().st_size
        out["events_before_outage"] = w.metric("sparc_events_total")
        say(f"stopping the broker for {outage:.0f} s")
        stopped = time.time()
        stop_broker()
        time.sleep(max(0.0, stopped + outage - time.time()))
        start_broker()
        back = time.time()
        out["broker_away_s"] = round(back - stopped, 1)
        say(f"the broker answers again after {back - stopped:.0f} s")
        events, steps, version = (w.metric(m) for m in ("sparc_events_total", "sparc_train_steps_total",
                                                         "sparc_snapshot_version"))
        waits = {"ingest": lambda: w.metric("sparc_events_total") > events,
                 "training": lambda: w.metric("sparc_train_steps_total") > steps,
                 "publishing": lambda: w.metric("sparc_snapshot_version") > version}
        for what, probe in waits.items():
            at = poll_until(probe, max(1.0, back + after - time.time()), alive)
            out[f"{what}_resumed_after_s"] = None if at is None else round(at - back, 2)
        time.sleep(max(0.0, back + after - time.time()))
        out.update(summarise(w.log.read_bytes()[cut:].decode(errors="replace")))
        out["events_after"] = w.metric("sparc_events_total")
        out["recovered"] = out["events_after"] > out["events_before_outage"]
        out["worker_alive"] = alive()
        producer.finish()
        wanted = {ident for ident, *_ in producer.acked}
        out["sent"], out["producer_failed"] = producer.sent, producer.failed
        caught = d.wait_learnt(wanted, w.port, catch_up_s, alive)
        out["caught_up"] = caught is not None
        out.update(d.audit(wanted, w.port))
    finally:
        producer.finish(30)
        w.stop_quietly()
        try:
            d.delete_topics()
        except Exception as exc:  # cleanup only
            out["cleanup_error"] = str(exc)
    return out


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--broker", required=True, help="the broker.sh broker's bootstrap address")
    p.add_argument("--rate", type=float, default=400.0, help="feedback events per second (default 400)")
    p.add_argument("--warmup", type=float, default=20.0, help="seconds before the outage (default 20)")
    p.add_argument("--outage", type=float, default=20.0, help="seconds the broker is away (default 20)")
    p.add_argument("--after", type=float, default=20.0,
                   help="seconds counted after the broker is back (default 20)")
    p.add_argument("--worker-flag", action="append", default=[], metavar="FLAG",
                   help="extra `sparc worker` flag, e.g. --worker-flag=--log-format=json (repeatable)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k.startswith("SPARC_KAFKA_")}  # the broker.sh broker's
    result = outage_run(
        args.broker, lambda: broker_sh("stop", "--keep-data", env={**os.environ, **env}),
        lambda: broker_sh("start", env={**os.environ, **env}, tries=10), Path(tempfile.mkdtemp(prefix="outage-bench-")),
        rate=args.rate, warmup=args.warmup, outage=args.outage, after=args.after,
        settings={**TINY_MODEL, "SPARC_SNAPSHOT_EVERY_SECONDS": "5"}, worker_flags=args.worker_flag)
    print(f"outage of {args.outage:.0f} s: {result.get('lines')} lines, {result.get('bytes')} bytes, "
          f"levels {result.get('levels')}, recovered={result.get('recovered')}, lost {result.get('lost')} of "
          f"{result.get('events')} acknowledged")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
