"""The learner: item events and train messages in, gated and versioned snapshots out; the one writer of a model's
snapshots. `sparc learn` runs it in a process of its own, `sparc worker` in a thread beside Faust; either way
streams.learn_loop reads its topics and calls it. No Kafka client here.

    learning = Learning(settings, outputs)    # claims the model in the store (fencing), warm-starts
    learning.observe_items(records)           # item-events records -> the vocabulary (invalid ones: DLQ)
    learning.learn_step(records)              # train-topic records -> one training step
    if learning.publish_due():
        learning.publish(learning.capture())  # gate -> store -> codebook-updates -> `serve` callback

Records are what a Kafka consumer yields (anything with topic, partition, offset, key and value).

Fencing: rank 0 claims the model in the store at start (Publisher.claim: the store's writer epoch goes up by one),
so a learner started later fences this one: its next put raises codebook_store.FencedError, nothing is stored,
and `publish` re-raises it (the loop stops the learner with that line). A restarted learner therefore takes over
at once, and a stale one (a paused process, a second replica by mistake) can never write a version.

Recovery (at least once; streams.worker's module doc has the whole story): the durable state is the latest
snapshot. A warm start restores its weights, steps and vocabulary, and its watermark: the next offset of every
train and item-events partition it has learnt (and the feedback positions its examples came from). The loop reads
each partition from there (`resume`); records below it are skipped. After a snapshot becomes latest its train and
item positions are committed under the learn group (settings.learn_group): where a learner without a position
in its snapshot starts, and what lag monitors read.

Data-parallel ranks (settings.world_size > 1; trainer.distributed): every rank builds a DataParallelLearner,
restores the version rank 0 chose, and calls observe_items and learn_step in the same rounds (the loop decides
them together); rank 0 alone reads item-events, captures and publishes, with every rank's watermark merged.

`processed_log` (optional, JSON lines) records each learnt step ({"step", "read": {"topic:partition": [first,
end)}, "event_ids", "at"}) and each start ({"start": {"version", "steps", "resume", ...}}). The events a
snapshot has learnt are those of the steps whose every read span ends at or below its watermark, less the steps
a later start discarded (those reading at or above its resume position); streams.processed_log.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from codebook_store import FencedError
from streams.batching import TrainBatch, learner_input, merge_watermarks, read_train_batch
from streams.metrics import RecoveryMetrics, WorkerMetrics
from streams.outputs import LearnOutputs
from streams.publisher import IncompatibleSnapshotError, Published, Publisher
from streams.records import Invalid, Source, validate_item
from streams.settings import WorkerSettings
from trainer.online import LearnerState, OnlineLearner

log = logging.getLogger(__name__)

Serve = Callable[[LearnerState, int, float], None]  # (state, version, created_at): a snapshot to serve in-process


class RoleFailed(Exception):
    """A role's process stopped for good: its learner fenced by another, or a part failed (one line)."""


@dataclass(frozen=True)
class Captured:
    """A snapshot's content, taken between two steps."""

    state: LearnerState
    health: dict
    watermark: dict[str, int]
    at: float


@dataclass
class TrainMessage:
    """A parsed train-topic record and where it was read."""

    batch: TrainBatch
    source: Source

    @property
    def events(self) -> int:
        return len(self.batch.events)


def source_of(record: Any) -> Source:
    return Source(topic=record.topic, partition=record.partition, offset=record.offset)


@dataclass
class StartInfo:
    """What the learner says once it runs (logged by the caller: logging is set up then)."""

    message: str = "warm start off: a fresh model"
    warnings: list[str] = field(default_factory=list)


class Learning:
    def __init__(
        self,
        settings: WorkerSettings,
        outputs: LearnOutputs,
        *,
        metrics: WorkerMetrics | None = None,
        recovery: RecoveryMetrics | None = None,
        serve: Serve | None = None,
        clock: Callable[[], float] = time.time,
        role: str = "learn",
    ):
        """`serve`: called with every snapshot this learner starts from or publishes (the one-process worker
        builds its serving index there). With settings.world_size > 1 the process group must be joined
        (trainer.distributed.init_group) before this is built: building and restoring are collectives."""
        self.settings, self.outputs, self.clock, self.serve = settings, outputs, clock, serve
        self.metrics = metrics or WorkerMetrics(settings.levels, clock)
        self.recovery = recovery or RecoveryMetrics(self.metrics.registry)
        s = settings
        self.rank, self.world_size = s.rank, s.world_size
        if s.world_size > 1:
            from trainer.distributed import DataParallelLearner

            self.learner: OnlineLearner = DataParallelLearner(s.sparc_config(), s.train_config(), s.device,
                                                              catalogue=s.catalogue_config())
        else:
            self.learner = OnlineLearner(s.sparc_config(), s.train_config(), s.device, s.catalogue_config())
        self.publisher: Publisher | None = None
        self.watermark: dict[str, int] = {}  # input learnt so far; swapped whole (readers on other threads)
        self.resume: dict[str, int] = {}  # "topic:partition" -> first offset the warm-start snapshot has not learnt
        self.warm_version: int | None = None
        self.published_version: int | None = None
        self.last_gate: list[str] = []  # reasons the last snapshot was held back (empty: it passed)
        self.fenced: str | None = None  # why this learner may no longer publish
        self.epoch: int | None = None  # rank 0's writer epoch in the store
        self.start = StartInfo()
        self._published = (0, clock())  # (steps, time) of the last capture
        self._captured: dict[str, int] = {}  # the watermark at the last capture
        self._processed = None
        self._processed_lock = threading.Lock()
        try:
            if self.rank == 0:  # the other ranks open the store read-only once rank 0 has (it may create it)
                self.publisher = self._open_publisher()
                self.epoch = self.publisher.claim(f"{role} rank 0 on {socket.gethostname()} pid {os.getpid()}")
            self._warm_start(s.warm_start)
            self.recovery.warm_version.set(-1 if self.warm_version is None else self.warm_version)
            if s.processed_log is not None:
                s.processed_log.parent.mkdir(parents=True, exist_ok=True)
                self._processed = s.processed_log.open("a", encoding="utf-8")
            self._log_processed({"start": {"version": self.warm_version, "steps": self.learner.steps,
                                           "resume": dict(self.resume), "rank": self.rank, "pid": os.getpid(),
                                           "at": clock()}})
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------------ start
    def _open_publisher(self) -> Publisher:
        """The store, as rank 0 writes it (creating it if need be) or another rank reads it (read-only)."""
        s = self.settings
        return Publisher(s.store_url, s.model_name, s.gate_thresholds(), full_codes_every=s.full_codes_every,
                         announce_weights=s.announce_weights, signing_key=s.signing_key, read_only=self.rank > 0,
                         keep_versions=s.keep_versions)

    def _warm_start(self, enabled: bool) -> None:
        """Continue from the store's latest snapshot, if any (see the module doc); serve it at once. Ranks agree on
        the version: rank 0's choice (-1: none) is gathered first; then the other ranks open the store."""
        found = None
        if self.rank == 0 and enabled:
            assert self.publisher is not None
            found = self.publisher.warm_start(self.settings.sparc_config(), self.settings.on_corrupt)
        if self.world_size > 1:
            chosen = int(self.learner.parallel.gather_ints([found.snapshot.version if found else -1])[0, 0])
            if self.rank > 0:
                self.publisher = self._open_publisher()
                if chosen >= 0:
                    found = self.publisher.warm_start(self.settings.sparc_config(), version=chosen)
        if found is None:
            if enabled:
                self.start.message = (f"warm start: no snapshot of {self.settings.model_name!r} in the store; a "
                                      "fresh model")
            return
        snapshot = found.snapshot
        steps = int(snapshot.health.get("steps", 0))
        try:
            bridged = self.learner.restore(snapshot.config, snapshot.weights, steps, snapshot.item_ids)
        except ValueError as exc:  # e.g. more items than this learner's max_items
            raise IncompatibleSnapshotError(
                f"cannot warm-start from {snapshot.model} v{snapshot.version}: {exc} (change the learner's settings "
                "to fit it, or start with --no-warm-start)", [str(exc)]) from None
        kafka = {k: int(v) for k, v in snapshot.watermark.get("kafka", {}).items()}
        self.watermark, self.resume, self._captured = dict(kafka), dict(kafka), dict(kafka)
        self.warm_version = snapshot.version
        self._published = (steps, self.clock())
        if self.serve is not None:
            self.serve(self.learner.snapshot_state(), snapshot.version, snapshot.created_at)
        train = sorted(k for k in kafka if k.startswith(f"{self.settings.train_topic}:"))
        position = ", ".join(f"{k}={kafka[k]}" for k in train) or "none of this app: the committed ones"
        self.start.message = (f"warm start from {snapshot.model} v{snapshot.version} (step {steps}, "
                              f"{self.learner.num_items} items, train positions {position})")
        if bridged:
            own = ", ".join(f"{k}={getattr(self.learner.model.cfg, k)!r}" for k in bridged)
            theirs = ", ".join(f"{k}={snapshot.config.get(k)!r}" for k in bridged)
            self.start.message += f"; learning goes on with this learner's {own} (the snapshot's: {theirs})"
        if found.passed_over:
            self.start.warnings.append(
                f"the latest snapshot failed verification, so the learner fell back to v{snapshot.version} (the "
                f"newest that verifies) and rolled latest back to it; passed over: {'; '.join(found.passed_over)}")

    def resume_offset(self, key: str) -> int | None:
        """The first offset of "topic:partition" the warm-start snapshot has not learnt (None: it names none)."""
        return self.resume.get(key)

    # ------------------------------------------------------------------ input
    def parse(self, records: Iterable[Any]) -> list[TrainMessage]:
        """Train-topic records -> messages to learn, without those the warm-start snapshot has learnt (counted)
        and malformed ones (logged: our own topic, so a bug or a foreign writer, never a reason to stop)."""
        out = []
        for record in records:
            source = source_of(record)
            if source.offset < self.resume.get(f"{source.topic}:{source.partition}", 0):
                self.recovery.skipped.inc()
                continue
            try:
                out.append(TrainMessage(read_train_batch(record.value), source))
            except ValidationError as exc:
                log.error("skipping a malformed train message at %s: %s", source,
                          exc.errors(include_url=False)[0]["msg"])
        return out

    def observe_items(self, records: Sequence[Any]) -> int:
        """Item-events records (in read order) into the learner's vocabulary; invalid ones and those a full
        catalogue refuses go to the DLQ. A collective with several ranks (every rank calls it, rank > 0 with
        none). Returns how many were applied."""
        s, valid = self.settings, []
        positions: dict[str, int] = {}
        for record in records:
            source = source_of(record)
            merge_watermarks(positions, {f"{source.topic}:{source.partition}": source.offset + 1})
            result = validate_item(record.value, max_bytes=s.max_event_bytes, now=self.clock())
            if isinstance(result, Invalid):
                self._dead_letter(record.value, record.key, result, source)
            else:
                valid.append((result.model_dump(), record, source))
        observed = self.learner.observe_items([item for item, *_ in valid])
        refused = set(observed.refused)
        for item, record, source in valid:
            if item["item_id"] in refused:
                self._dead_letter(record.value, record.key, not_in_catalogue("catalogue_full", item["item_id"], s),
                                  source)
        self.metrics.catalogue_changed(observed)
        applied = sum(1 for item, *_ in valid if item["item_id"] not in refused)
        self.metrics.items.inc(applied)
        watermark = dict(self.watermark)
        merge_watermarks(watermark, positions)
        self.watermark = watermark
        return applied

    def learn_step(self, messages: Sequence[TrainMessage]) -> dict | None:
        """One training step on train messages (in read order); a collective with several ranks (every rank
        calls it in the same rounds, possibly with none). Events the learner cannot admit go to the DLQ as
        the train message carries them. Returns the step's metrics (None: non-finite loss, skipped)."""
        read_at = [m.source for m in messages]
        inp = learner_input([m.batch for m in messages], read_at)
        try:
            with self.metrics.step_seconds.time():
                metrics = self.learner.learn(inp.events, inp.histories)
        except FloatingPointError as exc:  # a non-finite loss or gradient: the step changed nothing
            self.metrics.train_errors.inc()
            log.error("skipped a step of %d events (dead-lettered, reason train_error): %s", len(inp.events), exc)
            refused = Invalid("train_error", f"the micro-batch it was learnt in was refused: {exc}")
            for m in messages:
                for event in m.batch.events:
                    self._dead_letter(event.model_dump_json().encode(), event.user_id.encode(), refused, m.source)
            return None
        watermark = dict(self.watermark)
        merge_watermarks(watermark, inp.watermark)
        self.watermark = watermark
        self.recovery.learnt.inc(len(inp.events))
        self.metrics.trained(metrics)
        if self._processed is not None and inp.events:
            read: dict[str, list[int]] = {}  # "topic:partition" -> [first offset, last offset + 1]
            for source in read_at:
                span = read.setdefault(f"{source.topic}:{source.partition}", [source.offset, source.offset + 1])
                span[0], span[1] = min(span[0], source.offset), max(span[1], source.offset + 1)
            self._log_processed({"step": self.learner.steps, "read": read, "at": self.clock(),
                                 "event_ids": [e["event_id"] for e in inp.events]})
        if metrics["unlearnt"]:
            events = [(event, m.source) for m in messages for event in m.batch.events]
            for index, reason in metrics["unlearnt"]:
                event, source = events[index]
                self._dead_letter(event.model_dump_json().encode(), event.user_id.encode(),
                                  not_in_catalogue(reason, event.item_id, self.settings), source)
        return metrics

    def _dead_letter(self, raw: bytes, key: bytes | None, invalid: Invalid, source: Source) -> None:
        self.metrics.dlq.labels(source.topic, invalid.reason).inc()
        self.outputs.dead_letter(raw, key, invalid, source)

    # ------------------------------------------------------------------ output
    def publish_due(self) -> str | None:
        """Why a snapshot is due now: "steps" (snapshot_every_steps since the last capture: a promise the loop
        keeps even if it must wait for the publication before), "seconds" (snapshot_every_seconds with steps
        taken), or None."""
        steps, at = self._published
        new_steps = self.learner.steps - steps
        s = self.settings
        if new_steps >= s.snapshot_every_steps:
            return "steps"
        if new_steps > 0 and self.clock() - at >= s.snapshot_every_seconds:
            return "seconds"
        return None

    def unpublished(self) -> bool:
        """Whether anything was learnt since the last capture: steps taken, or item events applied."""
        return self.learner.steps > self._published[0] or self.watermark != self._captured

    def capture(self, watermark: dict[str, int] | None = None) -> Captured:
        """The snapshot's content now (between steps, in the learner's thread); `watermark`: every rank's, merged
        (default: this learner's)."""
        state, health = self.learner.capture()
        now = self.clock()
        self._published, self._captured = (state.steps, now), dict(self.watermark)
        return Captured(state, health, dict(self.watermark if watermark is None else watermark), now)

    def publish(self, captured: Captured) -> Published | None:
        """Gate, store and, if it passed, serve and announce a captured snapshot (any thread; one at a time).
        Returns what the store did (None: it failed, logged; the next interval tries again). Raises FencedError
        when another learner has claimed the model."""
        assert self.publisher is not None and self.rank == 0, "rank 0 publishes"
        started = time.perf_counter()
        try:
            return self._publish(captured)
        finally:
            self.metrics.publish_seconds.observe(time.perf_counter() - started)

    def _publish(self, captured: Captured) -> Published | None:
        state = captured.state
        self.metrics.health(captured.health)
        try:
            result = self.publisher.publish(state, captured.health, captured.watermark, captured.at)
        except FencedError as exc:
            self.fenced = str(exc)
            self.metrics.snapshots.labels("fenced").inc()
            raise
        except Exception as exc:  # a store failure (e.g. its disk full) must not stop training; the next interval
            self.metrics.snapshots.labels("failed").inc()  # tries again, and the version served before stays
            if self.metrics.publish_failed():  # the alarm was up already: one line, the traceback was logged once
                log.error("storing the snapshot of step %d failed again; v%s stays latest: %s", state.steps,
                          self.published_version, exc)
            else:
                log.exception("storing the snapshot of step %d failed; v%s stays latest", state.steps,
                              self.published_version)
            return None
        self.metrics.publish_succeeded()
        self.last_gate = result.reasons
        if not result.accepted:
            self.metrics.snapshots.labels("rejected").inc()
            self.metrics.refused(result.refusals)
            log.warning("snapshot v%d held back by the health gate, latest stays: %s", result.version,
                        "; ".join(result.reasons))
            return result
        try:
            if self.serve is not None:
                self.serve(state, result.version, result.created_at)
            self.outputs.announce(result.version, result.messages)
        except Exception:  # stored and latest: readers of the store have it; the next one is announced again
            self.metrics.snapshots.labels("failed").inc()
            self.metrics.publish_failed()
            log.exception("serving or announcing snapshot v%d failed", result.version)
            return result
        self.published_version = result.version
        self.metrics.snapshots.labels("published").inc()
        log.info("snapshot v%d published (step %d, %d items)", result.version, state.steps, state.num_items)
        return result

    def health_fields(self) -> dict:
        return {
            "steps": self.learner.steps,
            "items": self.learner.num_items,
            "rank": self.rank,
            "world_size": self.world_size,
            "published_version": self.published_version,
            "last_gate": self.last_gate,
            "fenced": self.fenced,
            "watermark": dict(self.watermark),
        }

    # ------------------------------------------------------------------ lifecycle
    def _log_processed(self, record: dict) -> None:
        if self._processed is None:
            return
        with self._processed_lock:
            self._processed.write(json.dumps(record) + "\n")
            self._processed.flush()

    def close(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        with self._processed_lock:
            if self._processed is not None:
                self._processed.close()
                self._processed = None


def not_in_catalogue(reason: str, item: int | str, s: WorkerSettings) -> Invalid:
    """Why an event whose item the learner could not admit is dead-lettered (reason catalogue_full or
    unknown_item)."""
    if reason == "catalogue_full":
        return Invalid(reason, f"item {item!r} is new and the catalogue holds max_items={s.max_items} items "
                               f"(on_catalogue_full={s.on_catalogue_full})")
    return Invalid(reason, f"item {item!r} is not in the catalogue and only item events add items")
