"""The worker's agents: thin adapters between topics and plain functions (no math here).

ingest    feedback-events -> micro-batches of up to batch_size messages (stream.take_events, batch_seconds) ->
          invalid: DLQ (original bytes, reason in headers); valid: de-duplicate by event id -> ONE train-topic
          message per micro-batch (streams.batching.TrainBatch: the events and their users' histories), then
          the batch's users' new histories into the table
train     train topic -> one message = one micro-batch -> OnlineLearner.learn in the learner thread; events it
          cannot learn (their item is not in the catalogue: catalogue_full, unknown_item) go to the DLQ as the
          train message carries them (validated JSON), with the train topic's position as their source
catalog   item-events -> validate -> observe_items in the learner thread (new items get rows of the item table;
          items a full catalogue refuses go to the DLQ, reason catalogue_full)
publisher a timer and the train agent: every N steps or T seconds -> health gate -> store -> announce ->
          rebuild the serving index -> swap it in -> commit the train topic's position of that snapshot

The learner runs in ONE thread (training steps, item growth and snapshot capture are serialised there), so the
event loop stays free for Kafka heartbeats and web requests. The event loop's work is per message only where it
must be (validation, the table); the train topic carries one message per micro-batch.

Delivery (at least once; streams.worker's module doc has the whole recovery story):
- feedback: take_events acks a micro-batch's messages only after the agent has handled all of them, and Faust
  commits a feedback offset only after the producer has flushed, so every event below a committed offset has
  its training example in the train topic. Forwarding before the table update makes a crash between the two
  re-deliver the batch; a crash after (some of) the (local, RocksDB) table writes but before Kafka took the
  train message is caught by streams.history's re-delivery rule (same event id at the same offset: forward
  again). Either way the event is trained at least once, and the user's history holds it once.
- train topic: its offsets are never committed by Faust (the topic is declared without acks). The learner's
  durable state is the latest snapshot; once a snapshot is latest, the train position it has seen (its
  watermark) is committed, and a restarted worker warm-starts from that snapshot and skips train messages below
  its watermark. So a crash loses only learning that no snapshot holds, and that is learnt again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from streams.batching import encode_train_batches, learner_input, read_train_batch
from streams.history import apply_feedback
from streams.index import build_index
from streams.records import Invalid, Source, TrainExample, validate_feedback, validate_item

if TYPE_CHECKING:
    from streams.settings import WorkerSettings
    from streams.worker import StreamWorker

log = logging.getLogger(__name__)


def source_of(event: Any) -> Source:
    """Where a Faust event was read. (Built with validation: for this small model that is cheaper than
    model_construct.)"""
    m = event.message
    return Source(topic=m.topic, partition=m.partition, offset=m.offset)


async def handle_feedback(w: StreamWorker, events: Sequence[Any]) -> Counter:
    """A micro-batch of feedback messages (Faust events), in order. Counts what happened to them: "dlq",
    "duplicate", "redelivered" (forwarded again, the history unchanged: see streams.history) and "forwarded".

    The valid, new events leave as one train message (more if it would be too large) before the table is
    updated (the module doc's delivery rules); a user's later events in the batch see its earlier ones."""
    s = w.settings
    now = w.clock()
    outcomes: Counter = Counter()
    examples: list[TrainExample] = []
    updated: dict[str, tuple[dict, Any]] = {}  # user -> (table value after the batch, the event that made it)
    for event in events:
        raw, key, source = event.value, event.key, source_of(event)
        result = validate_feedback(raw, max_bytes=s.max_event_bytes, now=now)
        if isinstance(result, Invalid):
            await dead_letter(w, raw, key, result, source)
            outcomes["dlq"] += 1
            continue
        user = result.user_id
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
        examples.append(TrainExample(event=result, history=applied.history, source=source))
        if applied.redelivered:
            outcomes["redelivered"] += 1
        else:
            updated[user] = (applied.state, event)
            outcomes["forwarded"] += 1
    if examples:
        for message in encode_train_batches(examples, s.train_message_bytes):
            await w.outputs.train(message)
    for user, (state, event) in updated.items():
        w.set_history(user, state, event)
    w.metrics.duplicates.inc(outcomes["duplicate"])
    w.recovery.redelivered.inc(outcomes["redelivered"])
    w.metrics.event(outcomes["forwarded"])
    return outcomes


async def handle_items(w: StreamWorker, messages: Sequence[tuple[bytes, bytes | None, Source]]) -> int:
    """A batch of item-catalogue messages. Returns how many were applied."""
    s = w.settings
    valid = []
    for raw, key, source in messages:
        result = validate_item(raw, max_bytes=s.max_event_bytes, now=w.clock())
        if isinstance(result, Invalid):
            await dead_letter(w, raw, key, result, source)
        else:
            valid.append((result.model_dump(), raw, key, source))
    if not valid:
        return 0
    observed = await w.in_learner(w.learner.observe_items, [item for item, *_ in valid])
    refused = set(observed.refused)
    for item, raw, key, source in valid:
        if item["item_id"] in refused:
            await dead_letter(w, raw, key, not_in_catalogue("catalogue_full", item["item_id"], s), source)
    w.metrics.catalogue_changed(observed)
    applied = sum(1 for item, *_ in valid if item["item_id"] not in refused)
    w.metrics.items.inc(applied)
    return applied


async def handle_train_message(w: StreamWorker, raw: bytes, source: Source) -> dict | None:
    """One train-topic message (a micro-batch): learn it, then publish if a snapshot is due. Returns the
    metrics (None when nothing was learnt). A message below the warm-start snapshot's watermark is skipped:
    that snapshot has learnt it already."""
    if source.offset < w.resume_offset(source):
        w.recovery.skipped.inc()
        return None
    try:
        batch = read_train_batch(raw)
    except ValidationError as exc:  # our own topic: a bug or a foreign writer, never a reason to stop
        log.error("skipping a malformed train message at %s: %s", source, exc.errors(include_url=False)[0]["msg"])
        return None
    if not batch.events:
        return None
    try:
        metrics = await w.in_learner(w.learn, learner_input(batch, [source]), [source])
    except FloatingPointError as exc:  # a non-finite loss or gradient: the step changed nothing
        w.metrics.train_errors.inc()
        log.error("skipped a micro-batch of %d events (dead-lettered, reason train_error): %s", len(batch.events), exc)
        refused = Invalid("train_error", f"the micro-batch it was learnt in was refused: {exc}")
        for event in batch.events:
            await dead_letter(w, event.model_dump_json().encode(), event.user_id.encode(), refused, source)
        return None
    w.metrics.trained(metrics)
    for index, reason in metrics["unlearnt"]:
        event = batch.events[index]
        await dead_letter(w, event.model_dump_json().encode(), event.user_id.encode(),
                          not_in_catalogue(reason, event.item_id, w.settings), source)
    if w.publish_due():
        await publish(w, only_if_due=True)
    return metrics


def not_in_catalogue(reason: str, item: int | str, s: WorkerSettings) -> Invalid:
    """Why an event whose item the learner could not admit is dead-lettered (reason catalogue_full or
    unknown_item)."""
    if reason == "catalogue_full":
        return Invalid(reason, f"item {item!r} is new and the catalogue holds max_items={s.max_items} items "
                               f"(on_catalogue_full={s.on_catalogue_full})")
    return Invalid(reason, f"item {item!r} is not in the catalogue and only item events add items")


async def dead_letter(
    w: StreamWorker, raw: bytes, key: bytes | None, invalid: Invalid, source: Source
) -> None:
    w.metrics.dlq.labels(source.topic, invalid.reason).inc()
    await w.outputs.dead_letter(raw, key, invalid, source)


async def publish(w: StreamWorker, *, only_if_due: bool = False) -> None:
    """Capture a snapshot between training steps, gate and store it; serve and announce it if it passed.
    only_if_due: skip when another caller (the timer, the train agent) has just published."""
    async with w.publish_lock:
        if only_if_due and not w.publish_due():
            return
        started = time.perf_counter()
        state, health, watermark = await w.in_learner(w.capture)
        now = w.clock()
        w.mark_published(state.steps, now)
        w.metrics.health(health)
        try:
            await _store_serve_announce(w, state, health, watermark, now)
        except Exception as exc:  # a store or index failure must not stop training; the next interval tries again
            w.metrics.snapshots.labels("failed").inc()
            again = w.metrics.publish_failed()  # the traceback once per run of failures
            served = w.index.current.version if w.index.current is not None else None
            if again:
                log.error("publishing the snapshot of step %d failed again; v%s stays served: %s", state.steps,
                          served, exc)
            else:
                log.exception("publishing the snapshot of step %d failed; v%s stays served", state.steps, served)
        else:
            w.metrics.publish_succeeded()
        w.metrics.publish_seconds.observe(time.perf_counter() - started)


async def _store_serve_announce(w: StreamWorker, state, health: dict, watermark: dict, now: float) -> None:
    result = await w.in_publisher(w.publisher.publish, state, health, watermark, now)
    w.last_gate = result.reasons
    if not result.accepted:
        w.metrics.snapshots.labels("rejected").inc()
        w.metrics.refused(result.refusals)
        log.warning("snapshot v%d held back by the health gate, latest stays: %s", result.version,
                    "; ".join(result.reasons))
        return
    index = await w.in_publisher(
        build_index, state, result.version, result.created_at, w.settings.top_codes, "faiss", w.index.current
    )  # derived incrementally from the index served now (only changed items move), then swapped whole
    w.index.swap(index)
    w.metrics.served(index.version, index.created_at, index.num_items)
    await w.outputs.announce(result.version, result.messages)
    w.metrics.snapshots.labels("published").inc()
    log.info("snapshot v%d published (step %d, %d items)", result.version, state.steps, index.num_items)
    await w.commit_position(watermark)


@dataclass(frozen=True)
class Agents:
    ingest: Any
    train: Any
    catalog: Any


def register(w: StreamWorker) -> Agents:
    app, s = w.app, w.settings

    @app.agent(w.topics.feedback, name="ingest", concurrency=1)
    async def ingest(stream):
        async for events in stream.take_events(s.batch_size, within=s.batch_seconds):
            await handle_feedback(w, events)

    @app.agent(w.topics.train, name="train", concurrency=1)
    async def train(stream):
        async for event in stream.events():
            await handle_train_message(w, event.value, source_of(event))

    @app.agent(w.topics.items, name="catalog", concurrency=1)
    async def catalog(stream):
        async for events in stream.take_events(1024, within=s.batch_seconds):
            await handle_items(w, [(e.value, e.key, source_of(e)) for e in events])

    @app.timer(interval=min(1.0, s.snapshot_every_seconds), name="publisher")
    async def publisher():
        w.metrics.tick()
        if w.publish_due():
            await publish(w, only_if_due=True)

    return Agents(ingest=ingest, train=train, catalog=catalog)
