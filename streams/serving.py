"""Serving: the index of the snapshot served now, and where a user's history comes from.

    serving = Serving(settings, metrics)
    serving.serve_state(state, version, created_at)      # a new snapshot -> a new index, swapped in whole
    serving.index.current.retrieve(history, k, explore)  # what /retrieve calls (streams.views)

In `sparc worker` the learner hands every snapshot over in-process (streams.learning's `serve`) and histories come
from the worker's own history table. In `sparc serve` (M replicas, none of them a learner):
- `StoreFollower` (a thread) checks the store's latest version every follow_seconds and serves each new one:
  the store (file:// on shared storage, or rocksdb:// on the learner's machine, opened read-only) is where a
  snapshot is complete and verified, and latest moves only to versions the health gate passed;
- `ChangelogHistory` (a thread) keeps a read-only copy of the history table: it reads every partition of the
  table's changelog (compacted, written by ingest; Faust's json key, our raw value) from its start, by
  assignment, into a RocksDB of its own (rocksdict), holding each user's items only. A replica is ready once it
  has read to the end offsets the changelog had when it started. This is Kafka's global-table pattern: no
  request routing between replicas (Faust's table_route has open bugs with several workers), and every
  replica answers every user. Histories lag ingest by the changelog's delivery (one micro-batch, about).
- `POST /retrieve` takes the recent items in the body and needs no history at all.
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from streams.history import decode_state, history_of
from streams.index import IndexHolder, ServingIndex, build_index
from streams.metrics import WorkerMetrics
from streams.settings import WorkerSettings
from trainer.online import LearnerState

log = logging.getLogger(__name__)


class Serving:
    """The served index (IndexHolder: one reference, swapped whole) and the serving metrics."""

    def __init__(self, settings: WorkerSettings, metrics: WorkerMetrics):
        self.settings, self.metrics = settings, metrics
        self.index = IndexHolder()

    def serve_state(self, state: LearnerState | Any, version: int, created_at: float) -> ServingIndex:
        """Build the index of a snapshot (the learner's state, or a stored codebook_store.Snapshot: its config,
        weights and item ids) incrementally from the one served now when it can, and swap it in."""
        index = build_index(state, version, created_at, self.settings.top_codes, "faiss", self.index.current)
        self.index.swap(index)
        self.metrics.served(index.version, index.created_at, index.num_items)
        return index

    def health_fields(self) -> dict:
        served = self.index.current
        return {
            "served_version": None if served is None else served.version,
            "snapshot_age_seconds": None if served is None else time.time() - served.created_at,
        }


class StoreFollower:
    """Serves every new latest snapshot of the model from the store (run it in a thread: `run(stop)`). The store
    is opened read-only once it exists (a replica may start before the learner has written anything)."""

    def __init__(self, settings: WorkerSettings, serving: Serving):
        self.settings, self.serving = settings, serving
        self.store = None
        self.last_problem: str | None = None

    def open(self):
        """The store, read-only, or None while it does not exist yet."""
        from codebook_store import StoreUnavailableError, open_store

        if self.store is None:
            try:
                self.store = open_store(self.settings.store_url, read_only=True)
            except StoreUnavailableError:
                return None
        return self.store

    def check(self) -> int | None:
        """Serve the store's latest version if it is newer than the one served; returns the version served."""
        if self.open() is None:
            return None
        served = self.serving.index.current
        latest = self.store.latest_version(model=self.settings.model_name)
        if latest is None or (served is not None and latest <= served.version):
            return None
        snapshot = self.store.get(latest, model=self.settings.model_name)
        self.serving.serve_state(snapshot, snapshot.version, snapshot.created_at)
        log.info("serving snapshot v%d (%d items)", snapshot.version, self.serving.index.current.num_items)
        return latest

    def run(self, stop: threading.Event) -> None:
        from codebook_store import CodebookStoreError

        try:
            while not stop.is_set():
                try:
                    self.check()
                    self.last_problem = None
                except (CodebookStoreError, ValueError) as exc:  # a bad version: keep serving the one we have
                    if str(exc) != self.last_problem:
                        log.warning("cannot serve the store's latest snapshot: %s", exc)
                    self.last_problem = str(exc)
                stop.wait(self.settings.follow_seconds)
        finally:
            if self.store is not None:
                self.store.close()


class ChangelogHistory:
    """A read-only copy of the history table, from its changelog (module doc). `items(user)` any time;
    `run(stop)` in a thread of its own."""

    def __init__(self, settings: WorkerSettings, directory: Path,
                 consumer_factory: Callable[..., Any] | None = None):
        from rocksdict import Options, Rdict

        self.settings = settings
        shutil.rmtree(directory, ignore_errors=True)  # a fresh copy each start: the changelog is the truth
        directory.mkdir(parents=True, exist_ok=True)
        self.db = Rdict(str(directory), Options(raw_mode=True))
        self.consumer_factory = consumer_factory or self._consumer
        self.caught_up = threading.Event()  # read to the end offsets the changelog had at start
        self.applied = 0

    def _consumer(self) -> KafkaConsumer:
        return KafkaConsumer(**self.settings.kafka_connection().kafka_python(),
                             client_id=f"{self.settings.app_id}-serve-history", group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest")

    def items(self, user: str) -> list:
        raw = self.db.get(user.encode())
        return [] if raw is None else json.loads(raw)

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        """One changelog record: the table's key (Faust's json codec: a JSON string) and value (ours, or None:
        the user was deleted)."""
        if key is None:
            return
        user = json.loads(key)
        if not isinstance(user, str):
            return
        if value is None:
            self.db.delete(user.encode())
        else:
            self.db[user.encode()] = json.dumps(history_of(decode_state(value))).encode()
        self.applied += 1

    def run(self, stop: threading.Event) -> None:
        topic = self.settings.changelog_topic
        consumer = self.consumer_factory()
        try:
            while not consumer.partitions_for_topic(topic):  # ingest (Faust) creates it when it first starts
                if stop.wait(1.0):
                    return
            parts = [TopicPartition(topic, p) for p in range(self.settings.partitions)]
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            end = consumer.end_offsets(parts)
            while not stop.is_set():
                for records in consumer.poll(timeout_ms=200, max_records=2000).values():
                    for record in records:
                        self.apply(record.key, record.value)
                if not self.caught_up.is_set() and all(consumer.position(tp) >= end[tp] for tp in parts):
                    self.caught_up.set()
                    log.info("history copy caught up with %s (%d records)", topic, self.applied)
        finally:
            consumer.close()
            self.db.close()
