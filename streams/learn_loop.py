"""The learner's Kafka side: read the train topic and item-events by assignment, train in rounds, publish in a
thread of its own, commit what snapshots have learnt. It drives streams.learning.Learning.

    loop = LearnLoop(learning, settings)
    loop.run(stop)          # in a thread of its own until `stop` (a threading.Event) is set or the learner is fenced

Assignment, not a consumer group: this rank reads the train partitions p with p mod world_size == rank (all of
them with one learner) and rank 0 reads every item-events partition, each from the warm-start snapshot's
position (streams.learning), else from the learn group's committed offset, else from its start. No rebalance
can move a partition in the middle of a step, and a learner never waits for a group: a restarted learner reads
again as soon as it has restored its snapshot, and ingest failures do not reach it.

Rounds. Every round, every rank: polls (for at most round_seconds when it has nothing buffered) until it holds
a micro-batch (batch_size events, whole messages) or the poll comes back; takes up to batch_size events of
messages from its buffer; then all ranks exchange one small vector (stop?, publish?, item events, events) and
call the same collectives: observe_items when any rank has item events, learn_step when any has events, and
when rank 0 decided to publish, a gather of every rank's watermark, after which rank 0 captures the snapshot
and hands it to the publisher thread. So the ranks move at the slowest one's pace and never wait on an idle
partition longer than round_seconds; with one learner the exchange is local and costs nothing.

Publishing runs beside training (the store's put, the announcement on codebook-updates, an in-process index
build), one at a time; its result comes back to this thread, which commits the snapshot's train and item
positions (a kafka-python consumer belongs to one thread). A snapshot due by time waits for the publication in
flight to end; one due by step count (snapshot_every_steps) waits for it, so that every N-th step is captured.
A stop (SIGTERM) ends the loop at the next round, which publishes what was learnt since the last snapshot (steps
or item events) and learns nothing more (what it had read is read again by the next learner); a fenced learner
leaves without publishing.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from codebook_store import FencedError
from streams.batching import merge_watermarks
from streams.learning import Learning, TrainMessage
from streams.settings import WorkerSettings

log = logging.getLogger(__name__)

MAX_POLL_RECORDS = 64  # train messages hold up to a micro-batch each: this bounds what one poll buffers


class Solo:
    """The collectives of a group of one (a single learner): local."""

    rank, world_size = 0, 1

    def gather_ints(self, values: list[int]) -> torch.Tensor:
        return torch.tensor([list(values)], dtype=torch.long)

    def gather_json(self, value: Any) -> list:
        return [value]


def assigned_train_partitions(settings: WorkerSettings) -> list[int]:
    """The train partitions this rank reads: p mod world_size == rank."""
    return [p for p in range(settings.train_topic_partitions) if p % settings.world_size == settings.rank]


def learn_consumer(settings: WorkerSettings) -> KafkaConsumer:
    """A consumer with no group membership (assignment) that commits under the learn group."""
    return KafkaConsumer(
        **settings.kafka_connection().kafka_python(),
        client_id=f"{settings.app_id}-learn-{settings.rank}",
        group_id=settings.learn_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=max(1 << 20, settings.train_message_bytes + (64 << 10)),
        fetch_max_wait_ms=max(10, int(settings.round_seconds * 1000)),
    )


class LearnLoop:
    def __init__(self, learning: Learning, settings: WorkerSettings,
                 consumer_factory: Callable[[WorkerSettings], Any] = learn_consumer):
        self.learning, self.settings, self.consumer_factory = learning, settings, consumer_factory
        parallel = getattr(learning.learner, "parallel", None)
        self.group = parallel if parallel is not None else Solo()
        self.lag: dict[tuple[str, int], int] = {}  # (topic, partition) -> records behind its end (metrics)
        self.assigned: list[TopicPartition] = []
        self.error: BaseException | None = None  # what ended the loop, when not a stop

    # ------------------------------------------------------------------ run
    def run(self, stop: threading.Event) -> None:
        """Learn until `stop` is set (then publish once more) or this learner is fenced; an unexpected error is
        kept in `error` and raised."""
        consumer = self.consumer_factory(self.settings)
        pool = ThreadPoolExecutor(1, thread_name_prefix="sparc-publisher")
        pending: Future | None = None
        try:
            self._assign(consumer)
            buffer = Buffer()
            items: list[Any] = []
            while True:
                stopping = stop.is_set()
                if not stopping:
                    self._poll(consumer, buffer, items)
                step = buffer.take(self.settings.batch_size)
                due = self.learning.publish_due() if self.group.rank == 0 else None
                if pending is not None and (pending.done() or stopping or due == "steps"):
                    pending = self._finish(consumer, pending)
                publish = self.group.rank == 0 and pending is None and self.learning.fenced is None and (
                    due is not None or (stopping and self.learning.unpublished()))
                flags = self.group.gather_ints([int(stopping or self.learning.fenced is not None), int(publish),
                                                len(items), sum(m.events for m in step)])
                ending = bool(flags[:, 0].any())  # the last round: no more learning (what is taken is read again)
                if not ending and int(flags[:, 2].sum()):
                    self.learning.observe_items(items)
                    items = []
                if not ending and int(flags[:, 3].sum()):
                    self.learning.learn_step(step)
                if int(flags[0, 1]):
                    pending = self._capture(pool)
                if ending:
                    break
            if pending is not None:
                self._finish(consumer, pending)
        except BaseException as exc:
            self.error = exc
            raise
        finally:
            pool.shutdown(wait=True)
            consumer.close()

    def _assign(self, consumer: Any) -> None:
        s = self.settings
        parts = [TopicPartition(s.train_topic, p) for p in assigned_train_partitions(s)]
        if self.group.rank == 0:
            parts += [TopicPartition(s.item_topic, p) for p in range(s.partitions)]
        consumer.assign(parts)
        for tp in parts:
            start = self.learning.resume_offset(f"{tp.topic}:{tp.partition}")
            if start is None:
                committed = consumer.committed(tp)
                start = committed if committed is not None else None
            if start is None:
                consumer.seek_to_beginning(tp)
            else:
                consumer.seek(tp, start)
        self.assigned = parts

    def _poll(self, consumer: Any, buffer: Buffer, items: list[Any]) -> None:
        """Fill the buffer up to a micro-batch: wait up to round_seconds when nothing is buffered."""
        if buffer.events >= self.settings.batch_size:
            return
        waiting = not buffer.events and not items
        polled = consumer.poll(timeout_ms=int(self.settings.round_seconds * 1000) if waiting else 0,
                               max_records=MAX_POLL_RECORDS)
        for tp, records in polled.items():
            if tp.topic == self.settings.item_topic:
                items.extend(records)
            else:
                buffer.add(tp.partition, self.learning.parse(records))
        if polled:
            self._measure_lag(consumer)

    def _capture(self, pool: ThreadPoolExecutor) -> Future | None:
        """Every rank's watermark (a collective), merged; rank 0 captures and hands the snapshot to the publisher
        thread."""
        merged: dict[str, int] = {}
        for marks in self.group.gather_json(self.learning.watermark):
            merge_watermarks(merged, marks)
        if self.group.rank != 0:
            return None
        captured = self.learning.capture(merged)
        return pool.submit(lambda: (self.learning.publish(captured), captured.watermark))

    def _finish(self, consumer: Any, pending: Future) -> None:
        """Wait for a publication; commit the positions of a snapshot that became latest."""
        try:
            result, watermark = pending.result()
        except FencedError as exc:
            log.error("fenced: %s", exc)
            return None
        if result is not None and result.accepted:
            self._commit(consumer, watermark)
        return None

    def _commit(self, consumer: Any, watermark: dict[str, int]) -> None:
        """Commit a snapshot's train and item-events positions under the learn group (best effort: a failed
        commit only makes a learner without a snapshot position read more)."""
        s = self.settings
        offsets = {}
        for key, offset in watermark.items():
            topic, _, partition = key.rpartition(":")
            if topic in (s.train_topic, s.item_topic):
                offsets[TopicPartition(topic, int(partition))] = OffsetAndMetadata(int(offset), "", -1)
        if not offsets:
            return
        try:
            consumer.commit(offsets)
        except Exception as exc:  # a broker hiccup: the next snapshot commits again
            log.warning("could not commit the learnt positions: %r", exc)

    def _measure_lag(self, consumer: Any) -> None:
        lag = {}
        for tp in self.assigned:
            end = consumer.highwater(tp)
            if end is not None:
                lag[(tp.topic, tp.partition)] = max(0, end - consumer.position(tp))
        self.lag = lag


class Buffer:
    """Train messages read but not learnt yet, per partition in read order. A step takes whole messages from the
    partitions in turn (the partition after the last one served first), so a partition with a deep backlog
    cannot hold the others' fresh messages back."""

    def __init__(self) -> None:
        self.queues: dict[int, deque[TrainMessage]] = {}
        self.events = 0
        self._next = 0  # the partition a step starts with

    def add(self, partition: int, messages: list[TrainMessage]) -> None:
        self.queues.setdefault(partition, deque()).extend(messages)
        self.events += sum(m.events for m in messages)

    def take(self, batch_size: int) -> list[TrainMessage]:
        """The messages of one step: up to batch_size events (at least one message), partitions in turn."""
        step: list[TrainMessage] = []
        events = 0
        order = sorted(self.queues, key=lambda p: (p < self._next, p))
        while True:
            took = False
            for partition in order:
                queue = self.queues[partition]
                if queue and (not step or events + queue[0].events <= batch_size):
                    message = queue.popleft()
                    step.append(message)
                    events += message.events
                    self._next, took = partition + 1, True
            if not took:
                break
        self.events -= events
        return step
