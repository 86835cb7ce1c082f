"""One worker process: the Faust app, its topics and history table, the online learner, the snapshot
publisher, the serving index and the metrics, wired together (agents.py and views.py hold the per-event and
per-request logic).

    w = StreamWorker(WorkerSettings(broker="127.0.0.1:39092"))
    w.run()                        # blocks until SIGINT/SIGTERM; returns the exit status

Recovery (at-least-once; a stop by SIGTERM and a crash by SIGKILL take the same path):
- The user-history table lives in RocksDB with a Kafka changelog; Faust restores it on start. Its event ids
  de-duplicate re-read feedback (streams.history, which also re-forwards a message read again at the same
  offset, since its training example may not have reached Kafka before the crash).
- The learner's durable state is the latest snapshot in the store. With warm_start (the default) a worker
  starts from it: weights, step count and watermark (the input it has learnt). Train messages below that
  watermark are skipped; the rest of the train topic is learnt again. Faust never commits the train topic;
  the worker commits a snapshot's train position once the snapshot is latest (commit_position), so a restart
  reads from about there. A warm start from a snapshot without a train position of this app (one from
  `sparc train`, or none at all) reads the train topic from the committed position, or from its start.
- Versions come from the store (one above its highest), so they keep increasing across restarts.
- `processed_log` (optional, JSON lines) records each learnt micro-batch ({"step", "read": {"topic:partition":
  [first, end)}, "event_ids"}) and each start ({"start": {"version", "steps", "resume", ...}}). The events a
  snapshot has learnt are those of the batches that end at or below its train watermark, less the batches a
  later start discarded (those at or above its resume position); tests/worker_harness.learnt_event_ids.
- Not recovered: Adam's moments are not in snapshots, so a restarted optimiser starts afresh; events whose
  training example was re-forwarded after a crash may be learnt twice (at least once, not exactly once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import faust
import torch
from faust.streams import _current_event  # the "current event" Faust's tables read (see set_history)
from faust.types import TP

from streams import agents, views
from streams.app import create_app, declare_topics
from streams.batching import LearnerInput, merge_watermarks
from streams.history import decode_state, encode_state
from streams.index import IndexHolder, build_index
from streams.logs import setup_logging
from streams.metrics import RecoveryMetrics, WorkerMetrics
from streams.outputs import KafkaOutputs, Outputs
from streams.publisher import IncompatibleSnapshotError, Publisher
from streams.records import Source
from streams.settings import HISTORY_TABLE, WorkerSettings
from streams.topics import changelog_configs
from trainer.online import LearnerState, OnlineLearner

log = logging.getLogger(__name__)


def apply_process_settings(settings: WorkerSettings) -> None:
    """The settings that hold for the whole process, so set only by a process that runs a worker: torch's
    intra-op threads and the GIL switch interval (WorkerSettings.switch_interval says why)."""
    torch.set_num_threads(settings.torch_threads)
    sys.setswitchinterval(settings.switch_interval)


class _Processing:
    """Make `event` Faust's current event (the one its tables take the partition from) for the block; a class
    rather than @contextmanager, which costs a generator per use (this runs for every feedback event)."""

    __slots__ = ("event", "token")

    def __init__(self, event: Any):
        self.event = event

    def __enter__(self) -> None:
        self.token = _current_event.set(weakref.ref(self.event))

    def __exit__(self, *exc: object) -> None:
        _current_event.reset(self.token)


class StreamWorker:
    def __init__(
        self,
        settings: WorkerSettings,
        *,
        testing: bool = False,
        outputs: Outputs | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.settings, self.clock = settings, clock
        self.app = create_app(settings, testing=testing)
        self.topics = declare_topics(self.app, settings)
        self.history = self.app.Table(
            HISTORY_TABLE,
            default=None,
            partitions=settings.partitions,
            value_type=bytes,  # Faust's raw serializer: JSON bytes of streams.history.encode_state (get_history)
            help="per user: last items and recent event ids (streams.history)",
            extra_topic_configs=changelog_configs(settings),
        )
        self.learner = OnlineLearner(settings.sparc_config(), settings.train_config(), settings.device,
                                     settings.catalogue_config())
        self.publisher = Publisher(settings.store_url, settings.model_name, settings.gate_thresholds(),
                                   full_codes_every=settings.full_codes_every,
                                   announce_weights=settings.announce_weights, signing_key=settings.signing_key)
        self.index = IndexHolder()
        self.metrics = WorkerMetrics(settings.levels, clock)
        self.metrics.lag_source(self.consumer_lag)
        self.recovery = RecoveryMetrics(self.metrics.registry)
        self.outputs = outputs or KafkaOutputs(self.topics.dlq, self.topics.train, self.topics.updates)
        self.testing = testing
        self.watermark: dict[str, int] = {}  # input the learner has trained on; written in the learner thread
        self.resume: dict[str, int] = {}  # "topic:partition" -> first offset the warm-start snapshot has not learnt
        self.warm_version: int | None = None
        self.start_message = "warm start off: a fresh model"  # logged once the app runs (logging is set up then)
        self.start_warnings: list[str] = []  # ... as warnings
        self.last_gate: list[str] = []  # reasons the last snapshot was held back (empty: it passed)
        self.publish_lock = asyncio.Lock()
        self._published = (0, clock())  # (steps, time) of the last snapshot capture
        self._learner_pool = ThreadPoolExecutor(1, thread_name_prefix="sparc-learner")
        self._publisher_pool = ThreadPoolExecutor(1, thread_name_prefix="sparc-publisher")
        self._processed = None
        self._processed_lock = threading.Lock()
        try:
            if settings.warm_start:
                self._warm_start()
            self.recovery.warm_version.set(-1 if self.warm_version is None else self.warm_version)
            if settings.processed_log is not None:
                settings.processed_log.parent.mkdir(parents=True, exist_ok=True)
                self._processed = settings.processed_log.open("a", encoding="utf-8")
            self._log_processed({
                "start": {"version": self.warm_version, "steps": self.learner.steps, "resume": dict(self.resume),
                          "pid": os.getpid(), "at": clock()},
            })
        except BaseException:
            self.close()
            raise
        self.agents = agents.register(self)
        views.register(self)

        @self.app.task
        async def _log_start() -> None:
            log.info("%s", self.start_message)
            for warning in self.start_warnings:
                log.warning("%s", warning)

    def _warm_start(self) -> None:
        """Continue from the store's latest snapshot, if any (see the module doc); serve it at once."""
        found = self.publisher.warm_start(self.settings.sparc_config(), self.settings.on_corrupt)
        if found is None:
            self.start_message = f"warm start: no snapshot of {self.settings.model_name!r} in the store; a fresh model"
            return
        snapshot = found.snapshot
        steps = int(snapshot.health.get("steps", 0))
        try:
            bridged = self.learner.restore(snapshot.config, snapshot.weights, steps, snapshot.item_ids)
        except ValueError as exc:  # e.g. more items than this worker's max_items
            raise IncompatibleSnapshotError(
                f"cannot warm-start from {snapshot.model} v{snapshot.version}: {exc} (change the worker's settings "
                "to fit it, or start with --no-warm-start)", [str(exc)]) from None
        kafka = {k: int(v) for k, v in snapshot.watermark.get("kafka", {}).items()}
        self.watermark = dict(kafka)
        self.resume = dict(kafka)
        self.warm_version = snapshot.version
        self._published = (steps, self.clock())
        index = build_index(self.learner.snapshot_state(), snapshot.version, snapshot.created_at,
                            self.settings.top_codes)
        self.index.swap(index)
        self.metrics.served(index.version, index.created_at, index.num_items)
        position = kafka.get(f"{self.settings.train_topic}:0", "none of this app: the committed one")
        self.start_message = (f"warm start from {snapshot.model} v{snapshot.version} (step {steps}, "
                              f"{self.learner.num_items} items, train position {position})")
        if bridged:
            own = ", ".join(f"{k}={getattr(self.learner.model.cfg, k)!r}" for k in bridged)
            theirs = ", ".join(f"{k}={snapshot.config.get(k)!r}" for k in bridged)
            self.start_message += f"; learning goes on with this worker's {own} (the snapshot's: {theirs})"
        if found.passed_over:
            self.start_warnings.append(
                f"the latest snapshot failed verification, so the worker fell back to v{snapshot.version} (the "
                f"newest that verifies) and rolled latest back to it; passed over: {'; '.join(found.passed_over)}")

    def get_history(self, user: str, event: Any) -> dict | None:
        """A user's history-table value (None: unknown user), read for feedback `event` (a Faust event).

        One lookup in the store of the event's partition: `Table.get` looks twice (contains, then get) and, with
        no current event (the body of a take_events micro-batch has none), in every partition's store. The
        table is keyed like the feedback topic, so the event's partition is the user's."""
        with _Processing(event):
            return decode_state(self.history.data.get(user))

    def history_value(self, user: str) -> dict | None:
        """A user's history-table value outside stream processing (the web views): looked up in the stores of
        every partition this worker holds."""
        return decode_state(self.history.get(user))

    def set_history(self, user: str, state: dict, event: Any) -> None:
        """Write a user's history-table value (streams.history) that feedback `event` (a Faust event) produced.

        Faust's table takes the partition of a write (its changelog partition, and with RocksDB its store) from
        the stream's current event, which the body of a take_events micro-batch does not have: the write is
        made as if `event` were being processed, as a per-event agent would have made it."""
        with _Processing(event):
            self.history[user] = encode_state(state)

    def resume_offset(self, source: Source) -> int:
        """The first offset of `source`'s topic-partition that the warm-start snapshot has not learnt."""
        return self.resume.get(f"{source.topic}:{source.partition}", 0)

    # --- the learner thread: everything that reads or changes the model
    async def in_learner(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._learner_pool, fn, *args)

    async def in_publisher(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._publisher_pool, fn, *args)

    def learn(self, inp: LearnerInput, read_at: Sequence[Source] = ()) -> dict:
        """One micro-batch (in the learner thread); `read_at`: where its messages were read, for the log."""
        with self.metrics.step_seconds.time():
            metrics = self.learner.learn(inp.events, inp.histories)
        watermark = dict(self.watermark)
        merge_watermarks(watermark, inp.watermark)
        self.watermark = watermark  # swapped whole: readers on the event loop never see it half-updated
        self.recovery.learnt.inc(len(inp.events))
        if self._processed is not None:
            read: dict[str, list[int]] = {}  # "topic:partition" -> [first offset, last offset + 1]
            for source in read_at:
                span = read.setdefault(f"{source.topic}:{source.partition}", [source.offset, source.offset + 1])
                span[0], span[1] = min(span[0], source.offset), max(span[1], source.offset + 1)
            self._log_processed({"step": self.learner.steps, "read": read,
                                 "event_ids": [e["event_id"] for e in inp.events]})
        return metrics

    def _log_processed(self, record: dict) -> None:
        if self._processed is None:
            return
        with self._processed_lock:
            self._processed.write(json.dumps(record) + "\n")
            self._processed.flush()

    async def commit_position(self, watermark: dict[str, int]) -> None:
        """Commit the train-topic position of a snapshot that became latest (the group resumes there). Best
        effort: a failed commit only makes a restart read more, and skip it (resume_offset)."""
        key = f"{self.settings.train_topic}:0"
        if self.testing or key not in watermark:
            return
        tp = TP(self.settings.train_topic, 0)
        try:
            # Consumer.commit() commits acked offsets only, and the train topic is not acked (streams.app): the
            # transport-level commit takes the offsets as given, for partitions this worker is assigned.
            await self.app.consumer._commit({tp: int(watermark[key])})
        except Exception as exc:  # a rebalance, a broker hiccup: the next snapshot commits again
            log.warning("could not commit the train position %d: %r", watermark[key], exc)

    def capture(self) -> tuple[LearnerState, dict, dict[str, int]]:
        state, health = self.learner.capture()
        return state, health, dict(self.watermark)

    # --- what the probes and metrics read
    def tables_recovered(self) -> bool:
        """Faust has recovered the history table from its changelog and no rebalance is under way."""
        return self.app.tables.recovery.completed.is_set() and not self.app.rebalancing

    def consumer_lag(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> messages behind the partition's high watermark, for the source topics this
        worker is assigned and has fetched from (the consumer runs in Faust's consumer thread: read only)."""
        s = self.settings
        sources = {s.feedback_topic, s.item_topic, s.train_topic}
        try:
            consumer = self.app.consumer
            lag = {}
            for tp in consumer.assignment():
                if tp.topic not in sources:
                    continue
                end = consumer.highwater(tp)
                read = consumer._read_offset.get(tp)  # the last offset handed to a stream (Faust keeps it)
                if end is not None:
                    lag[(tp.topic, tp.partition)] = max(0, end - (read + 1 if read is not None else 0))
            return lag
        except Exception:  # not started, between assignments: nothing to report
            return {}

    # --- publishing schedule
    def publish_due(self) -> bool:
        steps, at = self._published
        new_steps = self.learner.steps - steps
        s = self.settings
        return new_steps >= s.snapshot_every_steps or (
            new_steps > 0 and self.clock() - at >= s.snapshot_every_seconds
        )

    def mark_published(self, steps: int, at: float) -> None:
        self._published = (steps, at)

    # --- lifecycle
    def run(self) -> int:
        """Run the Faust worker in this process until it is stopped; returns its exit status. Logging is
        streams.logs' (format and level from the settings); in JSON mode Faust's start banner is left out."""
        apply_process_settings(self.settings)
        setup_logging(self.settings.log_format, self.settings.log_level)
        worker = faust.Worker(self.app, loglevel=self.settings.log_level, override_logging=False,
                              quiet=self.settings.log_format == "json")
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            self.close()
        return 0

    def close(self) -> None:
        self._learner_pool.shutdown(wait=True)
        self._publisher_pool.shutdown(wait=True)
        self.publisher.close()
        if self._processed is not None:
            with self._processed_lock:
                self._processed.close()
                self._processed = None
