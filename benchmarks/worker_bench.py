"""Benchmark the streaming worker end to end through a real Kafka broker, with the in-process learner beside it.

    python -m benchmarks.worker_bench --out runs/worker_bench.json                        # backlog drain
    python -m benchmarks.worker_bench --rate 800 --limit 32000 --out runs/worker_bench_paced.json   # freshness
    python -m benchmarks.worker_bench --profile-only --out runs/learner_profile.json      # no broker
    python -m benchmarks.worker_bench --limit 60000 --set retrieval_loss=sampled --out runs/worker_bench_sampled.json
    python -m benchmarks.worker_bench --roles --limit 30000 --out runs/wb_roles.json   # ingest / learn as processes

One run = unique topics, consumer group, store and table directory (nothing is shared with another run):
  1. baseline: the same Beauty events (time order, as `sparc produce` sends them) through
     trainer.online.OnlineLearner in this process, no broker, the worker's model, batch size and torch threads:
     events/s (wall and per CPU-second), and what one snapshot publication costs (capture + store put +
     codebook-updates encoding + serving index) in a memory:// store.
  2. the worker: `sparc worker` in a subprocess, Beauty-size model (SPARC_INITIAL_ITEMS=12101, dims as default),
     micro-batch --batch-size (default 1024) / --batch-seconds, a snapshot every --snapshot-every-seconds
     (default 2) and never by step count. Backlog mode (default, --rate 0): the catalogue and `--limit`
     feedback events are produced BEFORE the worker starts, and the worker drains them. Paced mode (--rate R):
     the worker starts first, the catalogue is produced, then the feedback at R events/s (from a thread of this
     process, which therefore competes for the CPU) while the worker runs. The worker is stopped after
     --max-seconds even if it has not finished: rates are then over what it did.
     --roles runs the scale-out roles instead: `sparc learn` (and --serve `sparc serve` replicas) first, then
     --ingest `sparc ingest` replicas, on one file:// or rocksdb:// store; "the worker" below is then the
     learner (its /health, /metrics) and the ingest replicas (their sparc_events_total), CPU summed over every
     process. The JSON's top level has `e2e_events_per_second` and `learner_events_per_second` (the baseline).
  3. measured from the worker's own counters, polled every --poll seconds: /health's watermark (the feedback
     offsets the learner has trained on; all events are valid, so their sum is the events trained), /metrics'
     sparc_events_total (events ingested), steps and snapshots. Rates: trained per second over the steady
     middle (10% -> 90% of the events), from the first trained event, and end to end (from the first ingested
     to the last trained event; the timeline shows how far training overlaps ingest). CPU from /proc per
     thread (the event loop = the main thread; the learner = the busiest other thread while training), and the
     broker's with --broker-pid, per event in the ingest and in the train phase: the figure to compare when
     the machine is shared (other people's jobs stretch the wall clock far more than the CPU count). Once
     training overlaps ingest, each phase's event-loop figure includes the other's work.
  4. freshness, exact: every snapshot on codebook-updates carries its manifest, whose watermark names the
     feedback offsets it has trained on; the harness knows when each (partition, offset) was produced. Per
     snapshot: announce time (the Kafka timestamp of its last record) minus the production time of the newest
     event it includes. Per event: announce time of the FIRST snapshot that includes it minus its production
     time (what a user of the snapshots waits for). p50 / p99 / max of both. In backlog mode this includes the
     time the event waited in the backlog, so it is only meaningful with --rate.

Extra worker settings: --set FIELD=VALUE (any streams.settings.WorkerSettings field, e.g. retrieval_loss=sampled,
dropout=0) applies to the worker (as SPARC_<FIELD>) and to the baseline alike; --env NAME=VALUE only to the
worker's environment (e.g. a SPARC_<FIELD> the baseline must not see; Faust's own variables are not read).
--profile adds a per-phase breakdown of the in-process learner (thread CPU per event in catalogue, encoder,
retrieval loss, backward, Adam, codebook update) at a few batch sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import write_json
from benchmarks.harness import free_port, get
from sparc_stream.cli.allocator import tune_allocator

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = Path("/work/shared/datasets/amazon_beauty")
BEAUTY_ITEMS = 12_101


# ---------------------------------------------------------------------------------------------- pure parts
def percentiles(values: Iterable[float], qs: Sequence[float] = (50, 99)) -> dict[str, float | None]:
    """{"p50": ..., "p99": ..., "max": ..., "n": ...} (linear interpolation); None when there is no value."""
    arr = np.asarray(list(values), dtype=np.float64)
    out: dict[str, float | None] = {f"p{q:g}": (float(np.percentile(arr, q)) if arr.size else None) for q in qs}
    out["max"] = float(arr.max()) if arr.size else None
    out["n"] = int(arr.size)
    return out


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text -> metric name -> sum of its samples over every label set (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name = name_labels.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


def feedback_offsets(watermark: Mapping[str, int], topic: str) -> dict[int, int]:
    """A snapshot's / the worker's watermark {"topic:partition": next offset} -> {partition: next offset} of
    `topic` only (the train topic's position is in there too)."""
    out = {}
    for key, offset in watermark.items():
        name, _, partition = key.rpartition(":")
        if name == topic:
            out[int(partition)] = int(offset)
    return out


@dataclass
class Produced:
    """When each feedback event was produced: per partition, production times (unix s) indexed by offset.
    Fresh topics start at offset 0; an offset never recorded is NaN (not ours)."""

    times: dict[int, np.ndarray] = field(default_factory=dict)

    @classmethod
    def from_records(cls, records: Iterable[tuple[int, int, float]]) -> Produced:
        """(partition, offset, produced_at) triples, in any order."""
        by_part: dict[int, list[tuple[int, float]]] = {}
        for partition, offset, at in records:
            by_part.setdefault(int(partition), []).append((int(offset), float(at)))
        times = {}
        for partition, pairs in by_part.items():
            arr = np.full(max(o for o, _ in pairs) + 1, np.nan)
            for offset, at in pairs:
                arr[offset] = at
            times[partition] = arr
        return cls(times)

    @property
    def total(self) -> int:
        return int(sum(np.isfinite(a).sum() for a in self.times.values()))

    def newest_before(self, next_offsets: Mapping[int, int]) -> float | None:
        """The latest production time among the events below the given next offsets (None: none included)."""
        newest = None
        for partition, upto in next_offsets.items():
            arr = self.times.get(partition)
            if arr is None or upto <= 0:
                continue
            seen = arr[: min(upto, arr.size)]
            seen = seen[np.isfinite(seen)]
            if seen.size:
                newest = float(seen.max()) if newest is None else max(newest, float(seen.max()))
        return newest


@dataclass(frozen=True)
class Announced:
    """A snapshot as codebook-updates delivered it."""

    version: int
    announced_at: float  # unix s: Kafka timestamp of the update's last record
    created_at: float  # unix s: when the worker captured the state (manifest)
    offsets: dict[int, int]  # feedback partition -> next offset the snapshot has trained on
    steps: int | None = None


def freshness(snapshots: Sequence[Announced], produced: Produced) -> dict[str, Any]:
    """Per snapshot: announce time - production time of the newest event it includes (and the same for the
    capture time). Per event: announce time of the first snapshot (in announce order) that includes it -
    its production time; events no snapshot includes are counted, not timed."""
    per_snapshot = []
    for s in sorted(snapshots, key=lambda s: s.announced_at):
        newest = produced.newest_before(s.offsets)
        per_snapshot.append({
            "version": s.version,
            "announced_at": s.announced_at,
            "created_at": s.created_at,
            "steps": s.steps,
            "events": int(sum(s.offsets.values())),
            "newest_event_produced_at": newest,
            "lag_s": None if newest is None else s.announced_at - newest,
            "capture_lag_s": None if newest is None else s.created_at - newest,
            "store_to_announce_s": s.announced_at - s.created_at,
        })
    event_lags: list[np.ndarray] = []
    covered_total = 0
    for partition, times in produced.times.items():
        first_cover = np.full(times.size, np.nan)  # announce time of the first snapshot including the offset
        done = 0
        for s in sorted(snapshots, key=lambda s: s.announced_at):
            upto = min(s.offsets.get(partition, 0), times.size)
            if upto > done:
                first_cover[done:upto] = s.announced_at
                done = upto
        lags = first_cover - times
        lags = lags[np.isfinite(lags)]
        covered_total += lags.size
        event_lags.append(lags)
    lags = np.concatenate(event_lags) if event_lags else np.zeros(0)
    snap_lags = [r["lag_s"] for r in per_snapshot if r["lag_s"] is not None]
    return {
        "per_event_s": percentiles(lags),
        "per_snapshot_newest_event_s": percentiles(snap_lags),
        "events_covered": int(covered_total),
        "events_not_covered": int(produced.total - covered_total),
        "snapshots": per_snapshot,
    }


def rates(timeline: Sequence[Mapping[str, float]], total: int, key: str = "trained") -> dict[str, Any]:
    """Throughput from a timeline of counter samples {"t": seconds, key: count}.

    whole:  (last count - 0) / (time of the last sample - time of the last sample still at 0)
    steady: events between the first samples at >= 10% and >= 90% of `total` / the time between them
    (None when the run did not get that far). `reached`: the last count seen."""
    pts = [(float(r["t"]), float(r[key])) for r in timeline if r.get(key) is not None]
    out: dict[str, Any] = {"reached": int(pts[-1][1]) if pts else 0, "whole": None, "steady": None,
                           "first_at_s": None, "last_at_s": None}
    started = [t for t, c in pts if c > 0]
    if not started:
        return out
    zero_before = max((t for t, c in pts if c <= 0 and t < started[0]), default=started[0])
    last_t, last_c = pts[-1]
    end_t = next((t for t, c in pts if c >= last_c), last_t)  # when the final count was first seen
    out["first_at_s"], out["last_at_s"] = zero_before, end_t
    if end_t > zero_before:
        out["whole"] = last_c / (end_t - zero_before)
    lo = next(((t, c) for t, c in pts if c >= 0.1 * total), None)
    hi = next(((t, c) for t, c in pts if c >= 0.9 * total), None)
    if lo and hi and hi[0] > lo[0]:
        out["steady"] = (hi[1] - lo[1]) / (hi[0] - lo[0])
    return out


def drain_rate(timeline: Sequence[Mapping[str, float]], total: int) -> float | None:
    """End to end: `total` events / (first sample with all of them trained - last sample before any was
    ingested). What a backlog drain costs, ingest and training together."""
    start = max((r["t"] for r in timeline if r.get("ingested", 0) <= 0), default=None)
    done = next((r["t"] for r in timeline if r.get("trained", 0) >= total), None)
    if start is None or done is None or done <= start:
        return None
    return total / (done - start)


def phase_cpu(timeline: Sequence[Mapping[str, float]], total: int, key: str, cpu_keys: Sequence[str],
              lo: float = 0.1, hi: float = 0.9, items: int = 0) -> dict[str, float | None]:
    """CPU microseconds per event of `key` ("ingested" / "trained") between the first samples at >= lo and >= hi
    of `total` (the first one also after `items` catalogue events were consumed, so that their cost is not
    counted), for each CPU counter in `cpu_keys` (seconds), plus the wall seconds of that window. Per CPU second
    rather than per wall second: the machine may be shared, and other jobs stretch the wall clock."""
    a = next((r for r in timeline if r.get(key, 0) >= lo * total and r.get("items", 0) >= items), None)
    b = next((r for r in timeline if r.get(key, 0) >= hi * total), None)
    out: dict[str, float | None] = {k: None for k in cpu_keys}
    out["window_s"] = None
    if a is None or b is None or b[key] <= a[key]:
        return out
    n = b[key] - a[key]
    for k in cpu_keys:
        if a.get(k) is not None and b.get(k) is not None:
            out[k] = 1e6 * (b[k] - a[k]) / n
    out["window_s"] = b["t"] - a["t"]
    return out


# ---------------------------------------------------------------------------------------------- events
def beauty_events(data: Path, limit: int) -> tuple[list[dict], list[dict]]:
    """(item events, the first `limit` feedback events) exactly as `sparc produce --data` sends them."""
    from replay.datasets import load_s3rec
    from sparc_stream.cli.produce import dataset_events

    items, feedback = [], []
    for kind, _key, value in dataset_events(load_s3rec(data)):
        if kind == "item":
            items.append(value)
        else:
            if len(feedback) >= limit:
                break
            feedback.append(value)
    return items, feedback


# ---------------------------------------------------------------------------------------------- baseline
def settings_for(overrides: Mapping[str, str]):
    from streams.settings import WorkerSettings

    return WorkerSettings(**overrides)


def publish_cost(learner, settings, reps: int = 3) -> dict[str, float]:
    """Seconds one snapshot publication costs in-process (memory:// store): capture in the learner, the
    publisher (gate, store put with sha256s, codebook-updates encoding), the serving index build."""
    from streams.index import build_index
    from streams.publisher import Publisher

    publisher = Publisher("memory://", "sparc", settings.gate_thresholds())
    parts: dict[str, list[float]] = {"capture": [], "store_and_encode": [], "index": []}
    try:
        for _ in range(reps):
            t0 = time.perf_counter()
            state, health = learner.snapshot_state(), learner.health()
            t1 = time.perf_counter()
            result = publisher.publish(state, health, {}, time.time())
            t2 = time.perf_counter()
            if result.accepted:
                build_index(state, result.version, result.created_at, settings.top_codes)
            t3 = time.perf_counter()
            parts["capture"].append(t1 - t0)
            parts["store_and_encode"].append(t2 - t1)
            parts["index"].append(t3 - t2)
    finally:
        publisher.close()
    out = {k: float(np.median(v)) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


def in_process(items: list[dict], feedback: Sequence[dict], overrides: Mapping[str, str], *,
               with_publish_cost: bool = True, breakdown: bool = False) -> dict[str, Any]:
    """The events through OnlineLearner, no broker: the worker's model, batch size and torch threads."""
    import torch

    from trainer.online import OnlineLearner, advance_histories

    settings = settings_for(overrides)
    torch.set_num_threads(settings.torch_threads)
    learner = OnlineLearner(settings.sparc_config(), settings.train_config(),
                            catalogue=settings.catalogue_config())
    learner.observe_items(items)
    events = [{**e, "user_id": str(e["user_id"])} for e in feedback]  # as the worker's Feedback record has it
    bs = settings.batch_size
    phases: Counter = Counter()
    undo = _instrument(phases) if breakdown else None
    histories: dict[str, list[int]] = {}
    examples = steps = 0
    try:
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        for start in range(0, len(events), bs):
            batch = events[start : start + bs]
            metrics = learner.learn(batch, histories)
            advance_histories(histories, batch, learner.max_len)
            examples += metrics["examples"]
            steps += "loss" in metrics
        wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    finally:
        if undo:
            undo()
    n = len(events)
    out: dict[str, Any] = {
        "events": n, "examples": examples, "steps": steps, "batch_size": bs,
        "torch_threads": settings.torch_threads, "seconds": wall, "cpu_seconds": cpu,
        "events_per_second": n / wall if wall else None, "events_per_cpu_second": n / cpu if cpu else None,
        "ms_per_step": 1000 * wall / max(steps, 1),
    }
    if breakdown:
        out["cpu_us_per_event"] = {k: 1e6 * v / n for k, v in phases.items()}
        out["cpu_us_per_event"]["total"] = 1e6 * cpu / n
    if with_publish_cost:
        out["publish_cost_s"] = publish_cost(learner, settings)
    return out


def _instrument(acc: Counter) -> Callable[[], None]:
    """Accumulate thread CPU seconds per phase of a training step; returns a function that undoes it."""
    import torch

    from trainer.model import SparcModel

    patched = []

    def wrap(owner: Any, attr: str, name: str) -> None:
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t = time.thread_time()
            try:
                return fn(*a, **k)
            finally:
                acc[name] += time.thread_time() - t

        setattr(owner, attr, timed)
        patched.append((owner, attr, fn))

    wrap(SparcModel, "catalogue", "catalogue_forward")
    wrap(SparcModel, "encode", "encoder_forward")
    wrap(SparcModel, "_retrieval_loss", "retrieval_loss_forward")
    wrap(SparcModel, "loss", "loss_forward_total")
    wrap(SparcModel, "update_codebooks_", "codebook_update")
    wrap(torch.Tensor, "backward", "backward")
    wrap(torch.optim.Adam, "step", "adam")

    def undo() -> None:
        for owner, attr, fn in reversed(patched):
            setattr(owner, attr, fn)

    return undo


# ---------------------------------------------------------------------------------------------- Kafka side
def produce(broker: str, topic: str, records: Sequence[tuple[str, dict]], rate: float = 0.0,
            stop: threading.Event | None = None) -> list[tuple[int, int, float]]:
    """Send (key, value) records as JSON to `topic` (rate 0: as fast as possible); returns (partition, offset,
    produced_at) per record, produced_at = the clock just before send()."""
    from kafka import KafkaProducer

    from sparc_stream.cli.produce import Pacer

    producer = KafkaProducer(bootstrap_servers=broker, linger_ms=20, acks=1, batch_size=256 * 1024)
    futures, stamps = [], []
    pacer = Pacer(rate)
    try:
        for n, (key, value) in enumerate(records, 1):
            if stop is not None and stop.is_set():
                break
            stamps.append(time.time())
            futures.append(producer.send(topic, key=key.encode(), value=json.dumps(value).encode()))
            pacer.wait(n)
        producer.flush()
        out = []
        for fut, at in zip(futures, stamps, strict=True):
            meta = fut.get(timeout=30)
            out.append((meta.partition, meta.offset, at))
        return out
    finally:
        producer.close()


def read_updates(broker: str, topic: str, feedback_topic: str, model: str = "sparc",
                 idle_s: float = 3.0) -> list[Announced]:
    """Every verified update on codebook-updates, with the Kafka timestamp of its completing record."""
    from kafka import KafkaConsumer, TopicPartition

    from codebook_store import Reassembler

    consumer = KafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False, group_id=None,
                             auto_offset_reset="earliest", max_partition_fetch_bytes=8 * 1024 * 1024)
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or ()]
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        end = consumer.end_offsets(parts)
        reassembler, out = Reassembler(), []
        deadline = time.monotonic() + idle_s
        while time.monotonic() < deadline and any(consumer.position(p) < end[p] for p in parts):
            for batch in consumer.poll(timeout_ms=500).values():
                deadline = time.monotonic() + idle_s
                for rec in batch:
                    update = reassembler.accept(rec.key, rec.value, rec.headers)
                    if update is None or update.model != model:
                        continue
                    m = update.manifest
                    out.append(Announced(
                        version=m.version, announced_at=rec.timestamp / 1000.0, created_at=m.created_at,
                        offsets=feedback_offsets(m.watermark.get("kafka", {}), feedback_topic),
                        steps=m.health.get("steps"),
                    ))
        return out
    finally:
        consumer.close()


def proc_cpu(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) of a process: total, its main thread (the asyncio event loop of a Faust
    worker) and its busiest other thread (the learner, when training dominates)."""
    tick = os.sysconf("SC_CLK_TCK")
    threads = {}
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                fields = task.joinpath("stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            threads[int(task.name)] = (int(fields[11]) + int(fields[12])) / tick
    except OSError:
        return {}
    main = threads.pop(pid, 0.0)
    others = sorted(threads.values(), reverse=True)
    return {"total": main + sum(others), "main_thread": main, "busiest_other_thread": others[0] if others else 0.0,
            "other_threads": sum(others)}


@dataclass
class WorkerRun:
    process: subprocess.Popen
    port: int
    log: Path
    started: float
    name: str = "worker"


def start_process(args, run: str, topics: Mapping[str, str], workdir: Path, overrides: Mapping[str, str],
                  command: str = "worker", name: str = "worker", env_more: Mapping[str, str] = ()) -> WorkerRun:
    """`sparc COMMAND` (worker or a role) in a subprocess with this run's settings as SPARC_* variables."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPARC_")}  # only what this run says
    env.update({f"SPARC_{k.upper()}": str(v) for k, v in overrides.items()})
    env.update(args.worker_env)  # the worker's only (the baseline does not see it)
    env.update({
        "SPARC_BROKER": args.broker, "SPARC_APP_ID": f"wbench-{run}", "SPARC_PARTITIONS": str(args.partitions),
        "SPARC_FEEDBACK_TOPIC": topics["feedback"], "SPARC_ITEM_TOPIC": topics["item"],
        "SPARC_UPDATES_TOPIC": topics["updates"], "SPARC_DLQ_TOPIC": topics["dlq"],
        "SPARC_STORE_URL": args.store or f"rocksdb://{workdir}/snapshots",
        "SPARC_DATA_DIR": str(workdir / name), "SPARC_WEB_PORT": str(port), **dict(env_more),
    })
    launch = f"from sparc_stream.cli.main import main; import sys; sys.exit(main([{command!r}]))"
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-c", launch], env=env, cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT)
    return WorkerRun(process, port, log, time.time(), name)


@dataclass
class Deployment:
    """The processes of one run: `sparc worker` alone, or the roles (ingest replicas, a learner, serve replicas).
    The learner (the worker) answers /health and /snapshots/latest; ingest (the worker) counts events."""

    learner: WorkerRun
    ingest: list[WorkerRun]
    serve: list[WorkerRun] = field(default_factory=list)

    @property
    def processes(self) -> list[WorkerRun]:
        return list({id(p): p for p in (self.learner, *self.ingest, *self.serve)}.values())

    @property
    def started(self) -> float:
        return min(p.started for p in self.processes)

    def alive(self) -> bool:
        return all(p.process.poll() is None for p in self.processes)

    def stop(self) -> dict[str, int | str]:
        return {p.name: stop_worker(p) for p in self.processes}

    def tails(self, lines: int = 15) -> dict[str, str]:
        return {p.name: _tail(p.log, lines) for p in self.processes}


def deploy(args, run: str, topics: Mapping[str, str], workdir: Path, overrides: Mapping[str, str]) -> Deployment:
    """Start the worker, or the roles: the learner and serve replicas first (ready when they answer /livez), then
    the ingest replicas, so that the drain is timed from ingest's start as it is in the worker (whose learner
    thread also starts before Faust)."""
    if not args.roles:
        worker = start_process(args, run, topics, workdir, overrides)
        return Deployment(worker, [worker])
    learner = start_process(args, run, topics, workdir, overrides, "learn", "learn")
    serve = [start_process(args, run, topics, workdir, overrides, "serve", f"serve-{n}") for n in range(args.serve)]
    deadline = time.time() + 120
    while time.time() < deadline and not all(get(p.port, "/livez")[0] == 200 for p in (learner, *serve)):
        if any(p.process.poll() is not None for p in (learner, *serve)):
            break
        time.sleep(0.2)
    ingest = [start_process(args, run, topics, workdir, overrides, "ingest", f"ingest-{n}",
                            {"SPARC_GROUP_INSTANCE_ID": f"ingest-{n}"}) for n in range(args.ingest)]
    return Deployment(learner, ingest, serve)


def sample(d: Deployment, topic: str, broker_pid: int | None = None) -> dict[str, Any] | None:
    """The learner's and ingest's counters and the processes' CPU now (and the broker's, given its process id).
    CPU: with the worker, its event loop is the main thread and the learner its busiest other thread; with the
    roles, the ingest processes' main threads and the learner process's busiest thread (its loop)."""
    status, body = get(d.learner.port, "/health")
    if status not in (200, 503):  # 503: starting (no snapshot served yet), the counters are there all the same
        return None
    health = json.loads(body)
    metrics = parse_metrics(get(d.learner.port, "/metrics")[1].decode(errors="replace"))
    ingested = 0
    for p in d.ingest:
        text = get(p.port, "/metrics")[1].decode(errors="replace")
        ingested += int(parse_metrics(text).get("sparc_events_total", 0))
    cpu = {p.name: proc_cpu(p.process.pid) for p in d.processes}
    learner = cpu.get(d.learner.name, {})
    served = [health.get("served_version", health.get("published_version"))]
    for p in d.serve:
        st, b = get(p.port, "/readyz")
        served.append(json.loads(b).get("served_version") if st else None)
    return {
        "t": time.time() - d.started,
        "trained": sum(feedback_offsets(health.get("watermark", {}), topic).values()),
        "ingested": ingested,
        "items": int(metrics.get("sparc_item_events_total", 0)),
        "steps": int(metrics.get("sparc_train_steps_total", 0)),
        "examples": int(metrics.get("sparc_train_examples_total", 0)),
        "snapshots": int(metrics.get("sparc_snapshots_total", 0)),
        "served_version": served[0],
        "replica_versions": served[1:],
        "cpu_s": sum(c.get("total", 0.0) for c in cpu.values()),
        "cpu_main_s": sum(cpu.get(p.name, {}).get("main_thread", 0.0) for p in d.ingest),
        "cpu_other_s": learner.get("other_threads"),
        "cpu_busiest_other_s": learner.get("busiest_other_thread"),
        "cpu_by_process_s": {name: c.get("total") for name, c in cpu.items()},
        "cpu_broker_s": proc_cpu(broker_pid).get("total") if broker_pid else None,
    }


def latest_covers(d: Deployment, topic: str, total: int) -> int | None:
    """The version of the store's latest snapshot if it has trained on `total` events of `topic`, else None."""
    status, body = get(d.learner.port, "/snapshots/latest")
    if status != 200:
        return None
    latest = json.loads(body)
    seen = sum(feedback_offsets(latest.get("watermark", {}).get("kafka", {}), topic).values())
    return int(latest["version"]) if seen >= total else None


def stop_worker(w: WorkerRun) -> int | str:
    if w.process.poll() is not None:
        return w.process.returncode
    w.process.send_signal(signal.SIGTERM)
    try:
        return w.process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        w.process.kill()
        w.process.wait()
        return "killed after 60 s"


def kafka_run(args, items: list[dict], feedback: list[dict], overrides: Mapping[str, str]) -> dict[str, Any]:
    from kafka import KafkaAdminClient

    from streams.topics import ensure_topics

    run = f"{time.strftime('%H%M%S')}-{uuid.uuid4().hex[:6]}"
    topics = {name: f"wbench-{run}-{name}" for name in ("feedback", "item", "updates", "dlq")}
    workdir = Path(tempfile.mkdtemp(prefix=f"worker-bench-{run}-"))
    settings = settings_for({**overrides, "broker": args.broker, "app_id": f"wbench-{run}",
                             "partitions": str(args.partitions), "feedback_topic": topics["feedback"],
                             "item_topic": topics["item"], "updates_topic": topics["updates"],
                             "dlq_topic": topics["dlq"]})
    ensure_topics(settings)
    item_records = [(str(v["item_id"]), v) for v in items]
    feedback_records = [(str(v["user_id"]), v) for v in feedback]
    produced: list[tuple[int, int, float]] = []
    timeline: list[dict] = []
    producer_thread = None
    stop_producing = threading.Event()
    out: dict[str, Any] = {"run": run, "topics": topics, "workdir": str(workdir)}
    t_produce = time.perf_counter()
    if not args.rate:  # backlog: everything in Kafka before the worker starts
        produce(args.broker, topics["item"], item_records)
        produced = produce(args.broker, topics["feedback"], feedback_records)
        out["produce_seconds"] = time.perf_counter() - t_produce
        print(f"produced {len(item_records)} items + {len(produced)} feedback events in "
              f"{out['produce_seconds']:.1f} s (backlog)", flush=True)
    w = deploy(args, run, topics, workdir, overrides)
    try:
        deadline = w.started + args.max_seconds
        ready = None
        while time.time() < deadline and w.alive():
            if (ready := sample(w, topics["feedback"])) is not None:
                break
            time.sleep(0.5)
        if ready is None:
            raise RuntimeError(f"the learner did not answer /health ({w.tails()})")
        out["web_ready_after_s"] = time.time() - w.started
        if args.rate:
            produce(args.broker, topics["item"], item_records)
            while time.time() < deadline and (s := sample(w, topics["feedback"])) and s["items"] < len(items):
                time.sleep(0.5)
            out["catalogue_consumed_after_s"] = time.time() - w.started

            def paced() -> None:
                produced.extend(produce(args.broker, topics["feedback"], feedback_records, args.rate, stop_producing))

            producer_thread = threading.Thread(target=paced, name="paced-producer", daemon=True)
            out["feedback_started_at_s"] = time.time() - w.started
            producer_thread.start()
        total = len(feedback_records)
        grace_until = covered = None
        while time.time() < deadline and w.alive():
            s = sample(w, topics["feedback"], args.broker_pid)
            if s is not None:
                timeline.append(s)
                if s["trained"] >= total and grace_until is None:
                    # then wait (a while) for a served snapshot that includes every event
                    grace_until = time.time() + settings.snapshot_every_seconds + 10
                if grace_until and (time.time() >= grace_until or covered is not None
                                    and (s["served_version"] or -1) >= covered):
                    time.sleep(1.0)  # the announcement follows the index swap
                    break
                if grace_until and covered is None:
                    covered = latest_covers(w, topics["feedback"], total)
            time.sleep(args.poll)
        stop_producing.set()
        if producer_thread is not None:
            producer_thread.join(timeout=120)
    finally:
        out["exit"] = w.stop()
        out["log_tails"] = w.tails()
    announced = read_updates(args.broker, topics["updates"], topics["feedback"])
    prod = Produced.from_records(produced)
    out["events_produced"] = prod.total
    out["timeline"] = timeline
    out["trained"] = rates(timeline, total, "trained")
    out["ingested"] = rates(timeline, total, "ingested")
    out["end_to_end_events_per_second"] = drain_rate(timeline, total)
    last = timeline[-1] if timeline else {}
    trained = last.get("trained", 0)
    out["cpu"] = {
        "worker_cpu_s": last.get("cpu_s"), "event_loop_thread_cpu_s": last.get("cpu_main_s"),
        "other_threads_cpu_s": last.get("cpu_other_s"), "busiest_other_thread_cpu_s": last.get("cpu_busiest_other_s"),
        "worker_cpu_us_per_trained_event": 1e6 * last["cpu_s"] / trained if trained and last.get("cpu_s") else None,
    }
    if args.broker_pid and timeline and timeline[0].get("cpu_broker_s") is not None:
        out["cpu"]["broker_cpu_s"] = last["cpu_broker_s"] - timeline[0]["cpu_broker_s"]
    cpu_keys = ("cpu_s", "cpu_main_s", "cpu_busiest_other_s", "cpu_broker_s")
    out["cpu_us_per_event"] = {  # main = the event loop thread; busiest other = the learner while training
        "ingest_phase": phase_cpu(timeline, total, "ingested", cpu_keys, items=len(items)),
        "train_phase": phase_cpu(timeline, total, "trained", cpu_keys),
    }
    out["steps"], out["snapshots_published"] = last.get("steps"), len(announced)
    out["freshness"] = freshness(announced, prod)
    out["freshness"]["mode"] = ("paced: production to announcement" if args.rate else
                                "backlog: includes the time events waited in the backlog (not a freshness figure)")
    if args.rate and timeline:
        out["achieved_produce_rate"] = _achieved_rate(produced)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
        try:
            with KafkaAdminClient(bootstrap_servers=args.broker) as admin:
                admin.delete_topics([t for t in admin.list_topics() if run in t])
        except Exception as exc:  # cleanup only
            out["cleanup_error"] = str(exc)
    return out


def _achieved_rate(produced: Sequence[tuple[int, int, float]]) -> float | None:
    if len(produced) < 2:
        return None
    times = sorted(at for _, _, at in produced)
    return (len(times) - 1) / (times[-1] - times[0]) if times[-1] > times[0] else None


def _tail(log: Path, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ---------------------------------------------------------------------------------------------- reporting
def _fmt(x: Any, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(result: dict[str, Any]) -> None:
    base, k = result.get("baseline"), result.get("kafka")
    who = "roles" if result.get("settings", {}).get("roles") else "worker"
    print()
    if "deployment" in result:
        share = result.get("e2e_share_of_learner")
        print(f"deployment: {result['deployment']}; end to end {_fmt(result['e2e_events_per_second'])} events/s = "
              f"{_fmt(None if share is None else 100 * share)}% of the in-process learner's")
    print(f"{'path':<40} {'events':>8} {'events/s':>9} {'ev/CPU-s':>9} {'steps':>6} {'snapshots':>9}"
          "   (worker ev/CPU-s: all its processes, whole run)")
    if base:
        print(f"{'in-process OnlineLearner (no broker)':<40} {base['events']:>8} {_fmt(base['events_per_second']):>9} "
              f"{_fmt(base['events_per_cpu_second']):>9} {base['steps']:>6} {'-':>9}")
    if k:
        tr = k["trained"]
        cpu_us = k["cpu"]["worker_cpu_us_per_trained_event"]
        print(f"{who + ', trained (steady 10-90%)':<40} {tr['reached']:>8} {_fmt(tr['steady']):>9} "
              f"{_fmt(1e6 / cpu_us if cpu_us else None):>9} {_fmt(k['steps'], 'd'):>6} {k['snapshots_published']:>9}")
        print(f"{who + ', trained (from first trained)':<40} {tr['reached']:>8} {_fmt(tr['whole']):>9}")
        print(f"{who + ', end to end (first ingest -> all)':<40} {tr['reached']:>8} "
              f"{_fmt(k['end_to_end_events_per_second']):>9}")
        print(f"{who + ', ingested (ingest agent)':<40} {k['ingested']['reached']:>8} "
              f"{_fmt(k['ingested']['steady']):>9}")
        f = k["freshness"]
        pe, ps = f["per_event_s"], f["per_snapshot_newest_event_s"]
        print(f"freshness ({f['mode']}): per event p50 {_fmt(pe['p50'], '.2f')} s, p99 {_fmt(pe['p99'], '.2f')} s, "
              f"max {_fmt(pe['max'], '.2f')} s over {pe['n']} events ({f['events_not_covered']} in no snapshot); "
              f"newest event per snapshot p50 {_fmt(ps['p50'], '.2f')} s, p99 {_fmt(ps['p99'], '.2f')} s")
        c = k["cpu"]
        print(f"{who} CPU: {_fmt(c['worker_cpu_s'], '.1f')} s total, event loop thread "
              f"{_fmt(c['event_loop_thread_cpu_s'], '.1f')} s, other threads {_fmt(c['other_threads_cpu_s'], '.1f')} s "
              f"(busiest {_fmt(c['busiest_other_thread_cpu_s'], '.1f')} s)")
        ip, tp = k["cpu_us_per_event"]["ingest_phase"], k["cpu_us_per_event"]["train_phase"]
        print(f"CPU us per event: ingest phase (10-90% ingested) event loop {_fmt(ip['cpu_main_s'])}, process "
              f"{_fmt(ip['cpu_s'])}, broker {_fmt(ip['cpu_broker_s'])}; train phase (10-90% trained) learner "
              f"{_fmt(tp['cpu_busiest_other_s'])}, event loop {_fmt(tp['cpu_main_s'])}, process {_fmt(tp['cpu_s'])}, "
              f"broker {_fmt(tp['cpu_broker_s'])}")
        if "achieved_produce_rate" in k:
            print(f"paced producer: asked {result['settings']['rate']:.0f}/s, achieved "
                  f"{_fmt(k['achieved_produce_rate'])}/s")
    for row in result.get("profile", []):
        us = row["cpu_us_per_event"]
        print(f"profile bs {row['batch_size']:>5}: {row['events_per_second']:7.0f} ev/s wall, "
              f"{row['events_per_cpu_second']:7.0f} ev/CPU-s; CPU us/event " +
              ", ".join(f"{name} {v:.0f}" for name, v in us.items()))


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(prog="python -m benchmarks.worker_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    p.add_argument("--broker", default=os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:39092"),
                   help="Kafka bootstrap servers (default: KAFKA_BOOTSTRAP_SERVERS or 127.0.0.1:39092)")
    p.add_argument("--data", type=Path, default=BEAUTY, help="S3-Rec dataset folder (default Amazon Beauty)")
    p.add_argument("--limit", type=int, default=100_000, help="feedback events, first N in time order")
    p.add_argument("--rate", type=float, default=0.0, help="0: backlog drain (default); R: paced at R events/s")
    p.add_argument("--batch-size", type=int, default=1024, help="worker micro-batch (SPARC_BATCH_SIZE)")
    p.add_argument("--batch-seconds", type=float, default=1.0, help="SPARC_BATCH_SECONDS")
    p.add_argument("--snapshot-every-steps", type=int, default=1_000_000, help="SPARC_SNAPSHOT_EVERY_STEPS")
    p.add_argument("--snapshot-every-seconds", type=float, default=2.0,
                   help="SPARC_SNAPSHOT_EVERY_SECONDS (default 2: p99 freshness under 10 s needs it at ~800/s here)")
    p.add_argument("--partitions", type=int, default=4)
    p.add_argument("--roles", action="store_true", help="run the roles as separate processes (`sparc ingest` x "
                   "--ingest, `sparc learn`, `sparc serve` x --serve) instead of the one-process `sparc worker`")
    p.add_argument("--ingest", type=int, default=1, help="ingest replicas with --roles (default 1)")
    p.add_argument("--serve", type=int, default=0, help="serve replicas with --roles (default 0: they do not "
                   "take part in the measures, and on a small machine they take CPU from the others)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="another WorkerSettings field for the worker and the baseline (repeatable)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment of the worker process only, e.g. SPARC_LOG_LEVEL=WARNING (repeatable)")
    p.add_argument("--store", help="codebook store URL (default rocksdb:// in the run's temp dir)")
    p.add_argument("--broker-pid", type=int, help="the broker's process id: its CPU per event is reported beside "
                   "the worker's (it shares the machine)")
    p.add_argument("--max-seconds", type=float, default=150.0, help="stop the worker after this long")
    p.add_argument("--poll", type=float, default=0.5, help="seconds between counter samples")
    p.add_argument("--baseline-events", type=int, default=20_000,
                   help="the in-process baseline runs the first N of the same events (0: skip)")
    p.add_argument("--profile", default="", help="batch sizes for the per-phase learner profile, e.g. 64,256,1024")
    p.add_argument("--profile-events", type=int, default=8192, help="events per profiled batch size")
    p.add_argument("--profile-only", action="store_true", help="no broker: baseline and --profile only")
    p.add_argument("--keep", action="store_true", help="keep the run's topics and temp dir")
    args = p.parse_args(argv)
    if args.profile_only and not args.profile:
        args.profile = "64,256,1024"

    overrides = {"initial_items": str(BEAUTY_ITEMS), "batch_size": str(args.batch_size),
                 "batch_seconds": str(args.batch_seconds), "snapshot_every_steps": str(args.snapshot_every_steps),
                 "snapshot_every_seconds": str(args.snapshot_every_seconds)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set wants FIELD=VALUE, got {item!r}")
        overrides[key.strip().lower()] = value.strip()
    settings_for(overrides)  # fail early on a bad setting
    args.worker_env = {}
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--env wants NAME=VALUE, got {item!r}")
        args.worker_env[key.strip()] = value.strip()

    load0 = os.getloadavg()
    items, feedback = beauty_events(args.data, args.limit)
    result: dict[str, Any] = {
        "benchmark": "worker end to end through Kafka vs the in-process learner",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": platform.python_version(), "loadavg_before": load0},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "worker_overrides": overrides,
        "command": " ".join(["python -m benchmarks.worker_bench", *(argv if argv is not None else sys.argv[1:])]),
    }
    if args.baseline_events:
        n = min(args.baseline_events, len(feedback))
        result["baseline"] = in_process(items, feedback[:n], overrides)
        b = result["baseline"]
        print(f"in-process: {b['events']} events {b['seconds']:.1f} s, {b['events_per_second']:.0f} ev/s "
              f"({b['events_per_cpu_second']:.0f} per CPU-s), {b['ms_per_step']:.0f} ms/step; one publication "
              f"{b['publish_cost_s']['total']:.2f} s", flush=True)
    if args.profile:
        result["profile"] = []
        for bs in [int(x) for x in args.profile.split(",") if x.strip()]:
            row = in_process(items, feedback[: args.profile_events], {**overrides, "batch_size": str(bs)},
                             with_publish_cost=False, breakdown=True)
            result["profile"].append(row)
            print(f"profile bs {bs}: {row['events_per_second']:.0f} ev/s", flush=True)
    if not args.profile_only:
        result["kafka"] = kafka_run(args, items, feedback, overrides)
        result["deployment"] = (f"roles: {args.ingest} x sparc ingest, sparc learn, {args.serve} x sparc serve"
                                if args.roles else "sparc worker (one process)")
        result["e2e_events_per_second"] = result["kafka"]["end_to_end_events_per_second"]
        if result.get("baseline"):
            result["learner_events_per_second"] = result["baseline"]["events_per_second"]
            if result["e2e_events_per_second"]:
                result["e2e_share_of_learner"] = result["e2e_events_per_second"] / result["learner_events_per_second"]
    result["machine"]["loadavg_after"] = os.getloadavg()
    print_table(result)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
