"""The ingest agent: a thin adapter between the feedback topics and plain functions (no math here).

ingest    feedback-events and the repartition topic (one stream; co-partitioned with the history table) ->
          micro-batches of up to batch_size messages (stream.take_events, batch_seconds) -> only the messages
          that continue their partitions (streams.continuity: Faust can skip offsets at a rebalance) ->
          invalid: DLQ (original bytes, reason in headers); outside its user's home partition (streams.routing):
          re-keyed to the repartition topic (or DLQ, reason wrong_key); valid: de-duplicate by event id -> one
          train-topic message per train partition the micro-batch touches (streams.batching.TrainBatch: the
          events and their users' histories), then the batch's users' new histories into the table

The learner (train topic and item-events -> training -> snapshots) is streams.learning, which runs in its own
process (`sparc learn`) or in a thread of `sparc worker`; serving is streams.serving.

Delivery (at least once; streams.worker's module doc has the whole recovery story):
- feedback: take_events acks a micro-batch's messages only after the agent has handled all of them, and Faust
  commits a feedback offset only after the producer has flushed, so every event below a committed offset has
  its training example in the train topic (or its re-keyed copy in the repartition topic). Forwarding before
  the table update makes a crash between the two re-deliver the batch; a crash after (some of) the (local,
  RocksDB) table writes but before Kafka took the train message is caught by streams.history's re-delivery rule
  (same event id at the same offset: forward again). Either way the event is trained at least once, and the
  user's history holds it once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from streams.batching import encode_train_batches
from streams.history import apply_feedback
from streams.records import Invalid, Source, TrainExample, validate_feedback
from streams.routing import home_partition, train_partition

if TYPE_CHECKING:
    from streams.worker import StreamWorker


def source_of(event: Any) -> Source:
    """Where a Faust event was read. (Built with validation: for this small model that is cheaper than
    model_construct.)"""
    m = event.message
    return Source(topic=m.topic, partition=m.partition, offset=m.offset)


async def handle_feedback(w: StreamWorker, events: Sequence[Any]) -> Counter:
    """A micro-batch of feedback messages (Faust events), in order. Counts what happened to them: "dlq",
    "rekeyed" (sent to the user's home partition through the repartition topic), "duplicate", "redelivered"
    (forwarded again, the history unchanged: see streams.history) and "forwarded".

    The valid, new events leave as one train message per train partition (more if one would be too large)
    before the table is updated (the module doc's delivery rules); a user's later events in the batch see its
    earlier ones."""
    s = w.settings
    now = w.clock()
    outcomes: Counter = Counter()
    examples: dict[int, list[TrainExample]] = {}  # train partition -> its examples, in order
    updated: dict[str, tuple[dict, Any]] = {}  # user -> (table value after the batch, the event that made it)
    for event in events:
        raw, key, source = event.value, event.key, source_of(event)
        result = validate_feedback(raw, max_bytes=s.max_event_bytes, now=now)
        if isinstance(result, Invalid):
            await dead_letter(w, raw, key, result, source)
            outcomes["dlq"] += 1
            continue
        user = result.user_id
        home = home_partition(user, s.partitions)
        if source.partition != home:  # its user's history lives in another partition (streams.routing)
            await off_home(w, raw, key, user, home, source)
            outcomes["rekeyed" if s.on_wrong_key == "repartition" else "dlq"] += 1
            continue
        applied = apply_feedback(
            updated[user][0] if user in updated else w.get_history(user, event),
            result.event_id,
            result.item_id,
            s.max_len,
            s.dedup_window,
            partition=source.partition,
            offset=source.offset,
        )
        if applied is None:
            outcomes["duplicate"] += 1
            continue
        example = TrainExample(event=result, history=applied.history, source=source)
        examples.setdefault(train_partition(home, s.train_topic_partitions), []).append(example)
        if applied.redelivered:
            outcomes["redelivered"] += 1
        else:
            updated[user] = (applied.state, event)
            outcomes["forwarded"] += 1
    for partition, chosen in examples.items():
        for message in encode_train_batches(chosen, s.train_message_bytes):
            await w.outputs.train(message, partition)
    for user, (state, event) in updated.items():
        w.set_history(user, state, event)
    w.metrics.duplicates.inc(outcomes["duplicate"])
    w.metrics.rekeyed.inc(outcomes["rekeyed"])
    w.recovery.redelivered.inc(outcomes["redelivered"])
    w.metrics.event(outcomes["forwarded"])
    return outcomes


async def dead_letter(
    w: StreamWorker, raw: bytes, key: bytes | None, invalid: Invalid, source: Source
) -> None:
    w.metrics.dlq.labels(source.topic, invalid.reason).inc()
    await w.outputs.dead_letter(raw, key, invalid, source)


async def off_home(w: StreamWorker, raw: bytes, key: bytes | None, user: str, home: int, source: Source) -> None:
    """A valid record read outside its user's home partition: to the home partition of the repartition topic,
    keyed by the user (the original bytes), or to the DLQ with reason wrong_key (settings.on_wrong_key)."""
    if w.settings.on_wrong_key == "repartition":
        await w.outputs.repartition(raw, user.encode(), home)
        return
    given = "no key" if key is None else f"key {key[:64]!r}"
    await dead_letter(w, raw, key, Invalid("wrong_key", f"read from partition {source.partition} ({given}); user "
                                                        f"{user!r} belongs in partition {home}"), source)


async def admit(w: StreamWorker, events: Sequence[Any]) -> list[Any]:
    """The events of a micro-batch that continue their partitions (streams.continuity), after seeking back the
    partitions where offsets were not delivered."""
    admitted = w.continuity.admit(events, w.app.consumer_generation_id)
    for why in ("stale", "reread", "held"):
        if n := getattr(admitted, why):
            w.recovery.not_handled.labels(why).inc(n)
    for tp, offset in admitted.seeks.items():
        await w.seek(tp, offset)
    return admitted.events


def register(w: StreamWorker) -> Any:
    """The ingest agent and the events/s ticker on w's Faust app; returns the agent."""
    app, s = w.app, w.settings

    @app.agent(w.topics.feedback, name="ingest", concurrency=1)
    async def ingest(stream):
        async for events in stream.take_events(s.batch_size, within=s.batch_seconds):
            if w.continuity is not None:
                events = await admit(w, events)
            if events:
                await handle_feedback(w, events)

    @app.timer(interval=1.0, name="events-per-second")
    async def tick():
        w.metrics.tick()

    return ingest
