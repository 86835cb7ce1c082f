"""The Faust process: `sparc ingest` (the ingest agent, its history table and the probes) and `sparc worker`, the
same process with the learner in a thread (streams.learning + streams.learn_loop) and the serving index
(streams.serving) beside it: the three roles composed in one process.

    w = StreamWorker(WorkerSettings(broker="127.0.0.1:39092"))                  # sparc worker
    w = StreamWorker(settings, learn=False, serve=False)                          # sparc ingest
    w.run()                        # blocks until SIGINT/SIGTERM; returns the exit status

Recovery (at-least-once; a stop by SIGTERM and a crash by SIGKILL take the same path):
- The user-history table lives in RocksDB with a Kafka changelog; Faust restores it on start (or promotes a
  standby copy, table_standby_replicas). Its event ids de-duplicate re-read feedback (streams.history, which also
  re-forwards a message read again at the same offset, since its training example may not have reached Kafka
  before the crash). Ingest processes are members of one consumer group: a process that stops answering keeps
  its partitions for session_timeout, then another takes them; with static membership (group_instance_id) a
  process restarted under the same id takes its own back at once, without a rebalance.
- The learner's durable state is the latest snapshot in the store (streams.learning's module doc): a warm
  start restores it and reads every train and item-events partition from the position it has learnt; the rest
  is learnt again. Versions come from the store (one above its highest), so they keep increasing across
  restarts.
- `processed_log` (optional, JSON lines): streams.learning's; streams.processed_log reads it.
- Not recovered: Adam's moments are not in snapshots, so a restarted optimiser starts afresh; events whose
  training example was re-forwarded after a crash may be learnt twice (at least once, not exactly once).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import faust
from faust.streams import _current_event  # the "current event" Faust's tables read (see set_history)

from streams import agents, views
from streams.app import create_app, declare_topics
from streams.continuity import TP, Continuity
from streams.history import decode_state, encode_state, history_of
from streams.learn_loop import LearnLoop
from streams.learning import Learning, RoleFailed
from streams.logs import setup_logging
from streams.metrics import RecoveryMetrics, WorkerMetrics
from streams.outputs import KafkaOutputs, LearnOutputs, Outputs
from streams.roles import apply_process_settings
from streams.serving import Serving
from streams.settings import HISTORY_TABLE, WorkerSettings
from streams.topics import changelog_configs

log = logging.getLogger(__name__)


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
        learn: bool = True,
        serve: bool = True,
        testing: bool = False,
        outputs: Outputs | None = None,
        learn_outputs: LearnOutputs | None = None,
        clock: Callable[[], float] = time.time,
    ):
        """learn/serve: run the learner (a thread) and the serving index in this process too (`sparc worker`);
        both off: `sparc ingest`. testing: memory:// tables, no web server, and the learner's loop is not
        started (tests drive Learning directly)."""
        self.settings, self.clock, self.testing = settings, clock, testing
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
        self.metrics = WorkerMetrics(settings.levels, clock)
        self.metrics.lag_source(self.consumer_lag)
        self.recovery = RecoveryMetrics(self.metrics.registry)
        # Faust's testing app has no consumer to seek and numbers its events across partitions: no check there
        self.continuity = None if testing else Continuity(self.committed_offset, time.monotonic)
        self.outputs = outputs or KafkaOutputs(self.topics.dlq, self.topics.train, self.topics.repartition)
        self.serving = Serving(settings, self.metrics) if serve else None
        self.learning: Learning | None = None
        self.loop: LearnLoop | None = None
        self._learn_outputs = None
        self._stop = threading.Event()
        self._learner_thread: threading.Thread | None = None
        if learn:
            if learn_outputs is None and testing:
                raise ValueError("a testing worker with a learner needs learn_outputs (no broker to send to)")
            if learn_outputs is None:
                from streams.roles import learn_outputs as kafka_learn_outputs

                learn_outputs = self._learn_outputs = kafka_learn_outputs(settings)
            try:
                self.learning = Learning(settings, learn_outputs, metrics=self.metrics, recovery=self.recovery,
                                         serve=self.serving.serve_state if self.serving else None, clock=clock,
                                         role="worker")
            except BaseException:
                self.close()
                raise
            self.loop = LearnLoop(self.learning, settings)
        self.ingest_agent = agents.register(self)
        views.register_faust(self.app, self)

        @self.app.task
        async def _log_start() -> None:
            if self.learning is not None:
                log.info("%s", self.learning.start.message)
                for warning in self.learning.start.warnings:
                    log.warning("%s", warning)

    def committed_offset(self, tp: TP) -> int | None:
        """The offset Faust sought feedback partition `tp` to in this consumer generation (its committed offset;
        None: nothing committed yet, or Faust does not say)."""
        offsets = getattr(self.app.consumer, "_committed_offset", None)  # Faust keeps no public copy
        return None if offsets is None else offsets.get(faust.types.TP(*tp))

    async def seek(self, tp: TP, offset: int) -> None:
        """Read feedback partition `tp` again from `offset` (streams.continuity). A partition this process no
        longer holds is left alone: its next owner reads it from the committed offset."""
        try:
            await self.app.consumer.seek_wait({faust.types.TP(*tp): offset})
        except Exception as exc:  # e.g. the partition was revoked meanwhile
            log.warning("could not seek feedback %s:%d to %d: %s", tp[0], tp[1], offset, exc)
            return
        self.recovery.gap_seeks.inc()

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

    # --- what the views read (streams.views.Node)
    def user_history(self, user_id: str) -> list:
        return history_of(self.history_value(user_id))

    def latest_manifest(self) -> dict | None:
        return self.learning.publisher.latest() if self.learning is not None else None

    def problems(self) -> list[str]:
        reasons = [] if self.tables_recovered() else ["tables are recovering"]
        if self.serving is not None and self.serving.index.current is None:
            reasons.append("no snapshot is served yet")
        return reasons

    def failure(self) -> str | None:
        if self.app.crashed:
            return repr(self.app.crash_reason)
        if self.learning is not None and self.learning.fenced:
            return f"fenced: {self.learning.fenced}"
        if self.loop is not None and self.loop.error is not None:
            return f"the learner stopped: {self.loop.error!r}"
        return None

    def tables_recovered(self) -> bool:
        """Faust has recovered the history table from its changelog and no rebalance is under way."""
        return self.app.tables.recovery.completed.is_set() and not self.app.rebalancing

    def consumer_lag(self) -> dict[tuple[str, int], int]:
        """(topic, partition) -> messages behind the partition's high watermark: the feedback and repartition
        partitions this process is assigned and has fetched from (the consumer runs in Faust's consumer thread:
        read only), and the learner's train and item partitions."""
        s = self.settings
        sources = {s.feedback_topic, s.repartition_topic}
        lag = dict(self.loop.lag) if self.loop is not None else {}
        try:
            consumer = self.app.consumer
            for tp in consumer.assignment():
                if tp.topic not in sources:
                    continue
                end = consumer.highwater(tp)
                read = consumer._read_offset.get(tp)  # the last offset handed to a stream (Faust keeps it)
                if end is not None:
                    lag[(tp.topic, tp.partition)] = max(0, end - (read + 1 if read is not None else 0))
        except Exception:  # not started, between assignments: nothing to report
            pass
        return lag

    # --- lifecycle
    def run(self) -> int:
        """Run the Faust worker in this process (and the learner's loop in a thread) until it is stopped;
        returns its exit status. Logging is streams.logs' (format and level from the settings); in JSON mode
        Faust's start banner is left out. A learner that is fenced or fails stops the process (SIGTERM to
        itself, so Faust shuts down in order) and the failure is raised once Faust has stopped."""
        apply_process_settings(self.settings)
        setup_logging(self.settings.log_format, self.settings.log_level)
        if self.loop is not None:
            self._learner_thread = threading.Thread(target=self._learn, name="sparc-learner", daemon=True)
            self._learner_thread.start()
        worker = faust.Worker(self.app, loglevel=self.settings.log_level, override_logging=False,
                              quiet=self.settings.log_format == "json")
        status = 0
        try:
            worker.execute_from_commandline()
        except SystemExit as exc:
            status = int(exc.code or 0)
        finally:
            self._stop.set()
            if self._learner_thread is not None:
                self._learner_thread.join()
            self.close()
        failure = self.failure() if self.learning is not None else None
        if failure is not None:
            raise RoleFailed(failure)
        return status

    def _learn(self) -> None:
        assert self.loop is not None
        try:
            self.loop.run(self._stop)
        except BaseException:
            log.exception("the learner failed")
        if not self._stop.is_set():  # fenced or failed: stop the whole process
            os.kill(os.getpid(), signal.SIGTERM)

    def close(self) -> None:
        if self.learning is not None:
            self.learning.close()
        if self._learn_outputs is not None:
            self._learn_outputs.close()
            self._learn_outputs = None
