"""Failover and replica convergence of the scale-out roles through a real Kafka broker.

    python -m benchmarks.roles_bench --out runs/roles_failover.json
    python -m benchmarks.roles_bench --session-timeout 45 --out runs/roles_failover_45s.json   # a slow group

One run = unique topics, groups, store and state directories. It starts 2 `sparc ingest` replicas (static
membership: --group-instance-id ingest-0/1; SPARC_SESSION_TIMEOUT --session-timeout), 1 `sparc learn` (with a
processed log) and --serve `sparc serve` replicas, produces the Beauty catalogue, then --events feedback events
at --rate events/s, and SIGKILLs ingest-0 once --kill-at of them are produced (nothing restarts it). Then it
waits until the latest snapshot has learnt every event and every serve replica answers from it (or
--max-seconds).

Measured, from the processes' own endpoints polled every --poll seconds:
  - loss: produced event ids minus those the latest snapshot has learnt (streams.processed_log over the
    learner's processed log, below the snapshot's train watermark). 0 is the contract (at least once).
  - failover: the killed replica's feedback partitions (its sparc_consumer_lag labels just before the kill);
    per feedback partition, the seconds from the kill until the learner's watermark includes the first event
    produced after the kill ("trains again": in the dead replica's partitions, only a replica that took them
    over can forward it), beside the longest gap between advances before the kill (the normal cadence of
    micro-batches and steps).
  - replicas: for every snapshot version, when each serve replica first answered with it (/readyz's
    served_version); the spread between the first and the last replica, beside the publish interval.
  - what each process needs: its peak resident memory (VmRSS) and the bytes in its state directory (and the
    store's) at the end.
Timing numbers depend on the machine's load: the JSON keeps the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from benchmarks.common import write_json
from benchmarks.harness import get as http_get
from benchmarks.worker_bench import (
    BEAUTY,
    BEAUTY_ITEMS,
    beauty_events,
    feedback_offsets,
    percentiles,
    produce,
    start_process,
    stop_worker,
)
from sparc_stream.cli.allocator import tune_allocator
from streams.processed_log import learnt_event_ids, read_processed_log, train_positions


# ---------------------------------------------------------------------------------------------- pure parts
def partitions_of(metrics_text: str, topic: str) -> list[int]:
    """The partitions of `topic` an ingest replica reports a consumer lag for (its assignment)."""
    out = set()
    for line in metrics_text.splitlines():
        if line.startswith("sparc_consumer_lag{") and f'topic="{topic}"' in line:
            out.add(int(line.split('partition="', 1)[1].split('"', 1)[0]))
    return sorted(out)


def rss_mb(pid: int) -> float | None:
    """Resident memory of a process now (MB; None once it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def dir_mb(path: Path) -> float:
    """Bytes under a directory, in MB (0 when it does not exist)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6 if path.exists() else 0.0


def train_again(timeline: list[tuple[float, dict[int, int]]], killed_at: float,
                first_after: dict[int, int]) -> dict[int, dict[str, Any]]:
    """Per feedback partition: seconds from `killed_at` until the learner has learnt the first event produced
    after the kill (offset `first_after[p]`; None: not in the timeline). Events produced after the kill in the
    dead replica's partitions can only be learnt once another replica holds them; what it had forwarded before
    dying does not count. Beside it, the longest gap between two advances of the learnt offset before the kill."""
    before = [(t, o) for t, o in timeline if t <= killed_at]
    out = {}
    for p in sorted({p for _, o in timeline for p in o} | set(first_after)):
        first = first_after.get(p)
        learnt = None if first is None else next(
            (t for t, o in timeline if t > killed_at and o.get(p, 0) > first), None)
        moves = [t for (t, o), (_, prev) in zip(before[1:], before, strict=False) if o.get(p, 0) > prev.get(p, 0)]
        gaps = [b - a for a, b in zip(moves, moves[1:], strict=False)]
        out[p] = {"trains_again_after_s": None if learnt is None else learnt - killed_at,
                  "longest_gap_before_kill_s": max(gaps) if gaps else None}
    return out


def replica_spread(first_seen: dict[str, dict[int, float]]) -> dict[str, Any]:
    """first_seen: replica -> version -> when it first answered with it. Per version every replica answered
    with: last replica's time - first replica's."""
    replicas = list(first_seen)
    common = set.intersection(*(set(v) for v in first_seen.values())) if replicas else set()
    spread = {v: max(first_seen[r][v] for r in replicas) - min(first_seen[r][v] for r in replicas)
              for v in sorted(common)}
    return {"versions_answered_by_every_replica": len(spread), "spread_s": percentiles(spread.values()),
            "per_version_s": spread}


# ---------------------------------------------------------------------------------------------- the run
def run(args) -> dict[str, Any]:
    from kafka import KafkaAdminClient

    from streams.settings import WorkerSettings
    from streams.topics import ensure_topics

    run_id = f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
    topics = {name: f"wbench-{run_id}-{name}" for name in ("feedback", "item", "updates", "dlq")}
    app_id = f"wbench-{run_id}"
    workdir = Path(tempfile.mkdtemp(prefix=f"roles-bench-{run_id}-"))
    processed = workdir / "processed.jsonl"
    overrides = {"initial_items": str(BEAUTY_ITEMS), "batch_size": str(args.batch_size),
                 "batch_seconds": str(args.batch_seconds), "snapshot_every_steps": "1000000",
                 "snapshot_every_seconds": str(args.snapshot_every_seconds),
                 "session_timeout": str(args.session_timeout)}
    ensure_topics(WorkerSettings(broker=args.broker, app_id=app_id, partitions=args.partitions,
                                 feedback_topic=topics["feedback"], item_topic=topics["item"],
                                 updates_topic=topics["updates"], dlq_topic=topics["dlq"]))
    spawn = SimpleNamespace(broker=args.broker, store=f"file://{workdir}/store", partitions=args.partitions,
                            worker_env={"SPARC_PROCESSED_LOG": str(processed)})

    def start(command: str, name: str, env: dict | None = None):
        return start_process(spawn, run_id, topics, workdir, overrides, command, name, env or {})

    items, feedback = beauty_events(args.data, args.events)
    learn = start("learn", "learn")
    serve = [start("serve", f"serve-{n}") for n in range(args.serve)]
    ingest = [start("ingest", f"ingest-{n}", {"SPARC_GROUP_INSTANCE_ID": f"ingest-{n}"}) for n in range(2)]
    everyone = [learn, *serve, *ingest]
    out: dict[str, Any] = {"run": run_id, "topics": topics, "events": len(feedback)}
    timeline: list[tuple[float, dict[int, int]]] = []
    first_seen: dict[str, dict[int, float]] = {r.name: {} for r in serve}
    peak_rss: dict[str, float] = {}
    produced: list = []
    t0 = time.time()
    try:
        deadline = t0 + args.max_seconds
        while time.time() < deadline and not all(http_get(p.port, "/readyz")[0] == 200 for p in ingest):
            if any(p.process.poll() is not None for p in everyone):
                raise RuntimeError(f"a process exited while starting: {[(p.name, p.process.poll()) for p in everyone]}")
            time.sleep(0.5)
        produce(args.broker, topics["item"], [(str(v["item_id"]), v) for v in items])
        stop = threading.Event()
        producer = threading.Thread(target=lambda: produced.extend(produce(
            args.broker, topics["feedback"], [(str(v["user_id"]), v) for v in feedback], args.rate, stop)),
            daemon=True)
        producer.start()
        produce_started = time.time()
        kill_after_s = args.kill_at * len(feedback) / args.rate
        killed_at = None
        killed_partitions: list[int] = []
        wanted = {e["event_id"] for e in feedback}
        missing: set[str] | None = None
        next_check = 0.0
        while time.time() < deadline:
            now = time.time()
            status, body = http_get(learn.port, "/health")
            if status in (200, 503):
                timeline.append((now, feedback_offsets(json.loads(body).get("watermark", {}), topics["feedback"])))
            for r in serve:
                st, b = http_get(r.port, "/readyz")
                version = json.loads(b).get("served_version") if st else None
                if version is not None:
                    first_seen[r.name].setdefault(version, now)
            for p in everyone:
                if (rss := rss_mb(p.process.pid)) is not None:
                    peak_rss[p.name] = max(rss, peak_rss.get(p.name, 0.0))
            if killed_at is None and now - produce_started >= kill_after_s:
                killed_partitions = partitions_of(http_get(ingest[0].port, "/metrics")[1].decode(), topics["feedback"])
                ingest[0].process.send_signal(signal.SIGKILL)
                killed_at = time.time()
                print(f"SIGKILL ingest-0 at {killed_at - produce_started:.1f} s (partitions {killed_partitions})",
                      flush=True)
            if not producer.is_alive() and now >= next_check:
                next_check = now + 2.0
                st, b = http_get(learn.port, "/snapshots/latest")
                if st == 200:
                    upto = train_positions(json.loads(b)["watermark"]["kafka"], app_id)
                    missing = wanted - set(learnt_event_ids(read_processed_log(processed), upto))
                    if not missing and all(max(seen, default=-1) >= json.loads(b)["version"]
                                           for seen in first_seen.values()):
                        break  # every event learnt, and every serve replica answers from that snapshot
            time.sleep(args.poll)
        stop.set()
        producer.join(timeout=60)
    finally:
        out["exit"] = {p.name: stop_worker(p) if p.process.poll() is None else p.process.returncode
                       for p in everyone}
        out["log_tails"] = {p.name: p.log.read_text(errors="replace").splitlines()[-8:] for p in everyone}
    out["events_produced"] = len(produced)
    out["events_lost"] = None if missing is None else len(missing)
    out["lost_examples"] = sorted(missing)[:10] if missing else []
    out["learnt_and_served_after_s"] = None if missing else timeline[-1][0] - produce_started
    out["killed_at_s"] = None if killed_at is None else killed_at - produce_started
    out["killed_partitions"] = killed_partitions
    if killed_at is not None:
        first_after: dict[int, int] = {}
        for partition, offset, at in produced:
            if at > killed_at:
                first_after[partition] = min(offset, first_after.get(partition, offset))
        per = train_again(timeline, killed_at, first_after)
        out["per_partition"] = per
        theirs = [per[p]["trains_again_after_s"] for p in killed_partitions if p in per]
        out["killed_partitions_train_again_after_s"] = (max(theirs) if theirs and None not in theirs else None)
    out["replicas"] = replica_spread(first_seen)
    out["peak_rss_mb"] = peak_rss
    out["disk_mb"] = {p.name: dir_mb(workdir / p.name) for p in everyone}
    out["disk_mb"]["store"] = dir_mb(workdir / "store")
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            with KafkaAdminClient(bootstrap_servers=args.broker) as admin:
                admin.delete_topics([t for t in admin.list_topics() if run_id in t])
        except Exception as exc:  # cleanup only
            out["cleanup_error"] = str(exc)
    return out


def main(argv: list[str] | None = None) -> int:
    tune_allocator()
    p = argparse.ArgumentParser(prog="python -m benchmarks.roles_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    p.add_argument("--broker", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:39092"),
                   help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:39092)")
    p.add_argument("--data", type=Path, default=BEAUTY, help="S3-Rec dataset folder (default Amazon Beauty)")
    p.add_argument("--events", type=int, default=30_000, help="feedback events, first N in time order")
    p.add_argument("--rate", type=float, default=800.0, help="feedback events per second (default 800)")
    p.add_argument("--kill-at", type=float, default=0.4, help="SIGKILL ingest-0 once this share is produced")
    p.add_argument("--session-timeout", type=float, default=10.0, help="SPARC_SESSION_TIMEOUT (default 10)")
    p.add_argument("--serve", type=int, default=2, help="serve replicas (default 2)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=1024, help="SPARC_BATCH_SIZE")
    p.add_argument("--batch-seconds", type=float, default=1.0, help="SPARC_BATCH_SECONDS")
    p.add_argument("--snapshot-every-seconds", type=float, default=2.0, help="SPARC_SNAPSHOT_EVERY_SECONDS")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between samples (default 0.1)")
    p.add_argument("--max-seconds", type=float, default=300.0, help="give up after this long")
    p.add_argument("--keep", action="store_true", help="keep the run's topics and temp dir")
    args = p.parse_args(argv)
    if not 0 < args.kill_at < 1 or args.rate <= 0:
        p.error("--kill-at must be in (0, 1) and --rate > 0")
    result: dict[str, Any] = {
        "benchmark": "scale-out roles: an ingest replica SIGKILLed under load; serve replicas' convergence",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": os.getloadavg()},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "command": " ".join(["python -m benchmarks.roles_bench", *(argv if argv is not None else sys.argv[1:])]),
        "publish_interval_s": args.snapshot_every_seconds,
    }
    result.update(run(args))
    result["machine"]["loadavg_after"] = os.getloadavg()
    spread, answered = result["replicas"]["spread_s"], result["replicas"]["versions_answered_by_every_replica"]
    print(f"lost {result['events_lost']} of {result['events_produced']} events; killed replica's partitions "
          f"{result['killed_partitions']} train again after {result.get('killed_partitions_train_again_after_s')} s "
          f"(session timeout {args.session_timeout} s); serve replicas: {answered} versions, spread "
          f"p50 {spread['p50']} p99 {spread['p99']} max {spread['max']} s "
          f"(publish interval {args.snapshot_every_seconds} s)")
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
