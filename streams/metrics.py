"""The worker's Prometheus metrics, in a registry of its own (one per worker; tests build many).

Besides the worker's counters and gauges: latency histograms (retrieve by HTTP status, a training step, a
snapshot's publication), the consumer lag of every partition the worker reads (`sparc_consumer_lag`, computed at
scrape time from the callable given to `lag_source`), the process and garbage-collector metrics of
prometheus_client (process_*, python_gc_*, python_info) and `sparc_build_info` (versions).
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Mapping
from importlib import metadata

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE  # noqa: N811
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# seconds: an in-memory retrieval is ~1 ms, a training step 10 ms - 1 s, a publication up to seconds
RETRIEVE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
STEP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
PUBLISH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

Lag = Mapping[tuple[str, int], int]  # (topic, partition) -> messages behind the partition's end


def build_versions() -> dict[str, str]:
    def version(dist: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return "unknown"

    return {"version": version("sparc-stream"), "python": platform.python_version(), "torch": version("torch"),
            "faust": version("faust-streaming"), "aiokafka": version("aiokafka")}


class _LagCollector(Collector):
    def __init__(self, source: Callable[[], Lag]) -> None:
        self.source = source

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily("sparc_consumer_lag", "messages behind the end of each partition the worker "
                                   "reads (its high watermark less the next offset it will read)",
                                   labels=["topic", "partition"])
        for (topic, partition), lag in sorted(self.source().items()):
            family.add_metric([topic, str(partition)], lag)
        yield family


class WorkerMetrics:
    def __init__(self, levels: int, clock=time.time):
        self.clock = clock
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        GCCollector(registry=r)
        PlatformCollector(registry=r)
        Info("sparc_build", "versions of this worker and its main libraries", registry=r).info(build_versions())
        self.retrieve_seconds = Histogram(
            "sparc_retrieve_seconds", "GET /retrieve latency by HTTP status", ["status"], buckets=RETRIEVE_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "sparc_train_step_seconds", "time of one training step (a micro-batch) in the learner thread",
            buckets=STEP_BUCKETS, registry=r,
        )
        self.publish_seconds = Histogram(
            "sparc_publish_seconds", "time to publish a snapshot: capture, gate, store, index, announce",
            buckets=PUBLISH_BUCKETS, registry=r,
        )
        self.events = Counter("sparc_events", "valid, de-duplicated feedback events", registry=r)
        self.duplicates = Counter(
            "sparc_duplicate_events", "feedback events dropped as duplicates", registry=r
        )
        self.rekeyed = Counter(
            "sparc_rekeyed_events", "feedback records read outside their user's partition and re-keyed through "
            "the repartition topic (streams.routing)", registry=r,
        )
        self.dlq = Counter(
            "sparc_dlq_messages", "messages sent to the dead-letter topic", ["topic", "reason"], registry=r
        )
        self.items = Counter("sparc_item_events", "valid item-catalogue events applied", registry=r)
        self.evictions = Counter(
            "sparc_catalogue_evictions", "items evicted from a full catalogue (their rows reused)", registry=r
        )
        self.history_dropped = Counter(
            "sparc_history_items_dropped", "history items left out of training inputs (not in the catalogue)",
            registry=r,
        )
        self.steps = Counter("sparc_train_steps", "training steps", registry=r)
        self.examples = Counter(
            "sparc_train_examples", "training examples (events with a history)", registry=r
        )
        self.train_errors = Counter(
            "sparc_train_errors", "micro-batches skipped (a non-finite loss or gradient; their events dead-lettered)",
            registry=r,
        )
        self.snapshots = Counter("sparc_snapshots", "snapshots stored", ["outcome"], registry=r)
        self.publish_failing = Gauge(
            "sparc_publish_failing", "1 while the last publish failed (the store full or unwritable, the index): "
            "the version served before stays served and ages; 0 once a publish succeeds (alert on it)", registry=r,
        )
        self.gate_refusals = Counter(
            "sparc_gate_refusals", "health-gate refusals of snapshots, by reason (one snapshot may have several)",
            ["reason"], registry=r,
        )
        self.events_per_second = Gauge(
            "sparc_events_per_second", "valid events per second (recent window)", registry=r
        )
        self.loss = Gauge("sparc_train_loss", "loss of the last training step", registry=r)
        self.catalogue = Gauge("sparc_catalogue_items", "items in the model's item table", registry=r)
        self.utilisation = Gauge(
            "sparc_codebook_utilisation", "share of codewords in use", ["level"], registry=r
        )
        self.perplexity = Gauge(
            "sparc_codebook_perplexity", "perplexity of code usage", ["level"], registry=r
        )
        self.collisions = Gauge("sparc_codebook_collision_rate", "items sharing their full code", registry=r)
        self.version = Gauge(
            "sparc_snapshot_version", "snapshot version the index serves (-1: none)", registry=r
        )
        self.age = Gauge("sparc_snapshot_age_seconds", "age of the served snapshot", registry=r)
        self.index_size = Gauge("sparc_index_items", "items in the serving index", registry=r)
        self.version.set(-1)
        self._levels = levels
        self._publish_failing = False
        self._served_at: float | None = None
        self._events_seen = 0
        self._window = (clock(), 0)
        self.age.set_function(lambda: 0.0 if self._served_at is None else self.clock() - self._served_at)

    # --- updates
    def publish_failed(self) -> bool:
        """Raise the publish alarm; returns whether it was raised already (a failure in a row)."""
        again = self._publish_failing
        self._publish_failing = True
        self.publish_failing.set(1)
        return again

    def publish_succeeded(self) -> None:
        self._publish_failing = False
        self.publish_failing.set(0)

    def event(self, n: int = 1) -> None:
        self.events.inc(n)
        self._events_seen += n

    def tick(self) -> None:
        """Refresh events/s over the time since the last tick."""
        now = self.clock()
        then, seen = self._window
        if now > then:
            self.events_per_second.set((self._events_seen - seen) / (now - then))
            self._window = (now, self._events_seen)

    def trained(self, metrics: dict) -> None:
        if "loss" in metrics:
            self.steps.inc()
            self.loss.set(metrics["loss"])
        self.examples.inc(metrics.get("examples", 0))
        self.history_dropped.inc(metrics.get("history_dropped", 0))
        self.evictions.inc(metrics.get("evicted", 0))

    def catalogue_changed(self, observed) -> None:
        """An item batch was applied (trainer.online.Observed)."""
        self.evictions.inc(len(observed.evicted))

    def refused(self, refusals) -> None:
        """The gate held a snapshot back (streams.gate.Refusal, one per reason)."""
        for refusal in refusals:
            self.gate_refusals.labels(refusal.reason).inc()

    def health(self, health: dict) -> None:
        self.catalogue.set(health.get("items", 0))
        for level in range(1, self._levels + 1):
            self.utilisation.labels(str(level)).set(health.get(f"level{level}_utilisation", 0.0))
            self.perplexity.labels(str(level)).set(health.get(f"level{level}_perplexity", 0.0))
        self.collisions.set(health.get("collision_rate", 0.0))

    def served(self, version: int, created_at: float, items: int) -> None:
        self.version.set(version)
        self._served_at = created_at
        self.index_size.set(items)

    def lag_source(self, source: Callable[[], Lag]) -> None:
        """Report `source()` as sparc_consumer_lag at every scrape."""
        self.registry.register(_LagCollector(source))

    def render(self) -> bytes:
        return generate_latest(self.registry)


__all__ = ["CONTENT_TYPE", "RecoveryMetrics", "WorkerMetrics"]


class RecoveryMetrics:
    """Counters of the recovery path, in the worker's registry (WorkerMetrics.registry)."""

    def __init__(self, registry) -> None:
        self.redelivered = Counter(
            "sparc_redelivered_events",
            "feedback messages read again at an offset already applied (forwarded again, history unchanged)",
            registry=registry,
        )
        self.skipped = Counter(
            "sparc_resume_skipped_messages",
            "train messages skipped because the warm-start snapshot has learnt them",
            registry=registry,
        )
        self.learnt = Counter(
            "sparc_learnt_events", "events handed to the learner (re-learnt ones after a restart count again)",
            registry=registry,
        )
        self.not_handled = Counter(
            "sparc_ingest_not_handled_events",
            "feedback messages the ingest agent did not handle (streams.continuity): stale (an older consumer "
            "generation), reread (handled already) or held (above a gap; they come again after a seek)",
            ["why"],
            registry=registry,
        )
        self.gap_seeks = Counter(
            "sparc_ingest_gap_seeks", "seeks back to an offset that was not delivered (streams.continuity)",
            registry=registry,
        )
        self.warm_version = Gauge(
            "sparc_warm_start_version", "snapshot version the learner started from (-1: a fresh model)",
            registry=registry,
        )
