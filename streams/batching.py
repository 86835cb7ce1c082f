"""Micro-batches between the ingest agent, the train topic and the learner.

The ingest agent reads up to `batch_size` feedback messages at a time and forwards the valid, de-duplicated ones
as ONE train-topic message, a TrainBatch: the events in arrival order, each user's history before its first
event in the batch, and the feedback positions the batch covers. That is what OnlineLearner.learn takes (it
derives a user's later inputs from the batch's own earlier events), so the train agent learns one message as one
step. Both views of a user's history agree because one user's events arrive in order (one feedback partition
per user, and ingest keeps the table's value of the batch's users until the batch is forwarded).

A micro-batch whose message would exceed `max_bytes` (Kafka refuses large messages: about 1 MB by default) is
split into consecutive messages. Ingest sends one message per train partition a micro-batch touches (a user's in
one partition: streams.routing); the learner joins consecutive messages into steps of up to batch_size events
(`learner_input` of several messages).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict

from streams.records import Feedback, Source, TrainExample


@dataclass(frozen=True)
class LearnerInput:
    events: list[dict]  # {"event_id", "user_id", "item_id", "timestamp", ...} in arrival order
    histories: dict[str, list[int | str]]  # user -> history before the user's first event in the batch
    watermark: dict[str, int]  # "topic:partition" -> next offset to read (last offset in the batch + 1)


class TrainBatch(BaseModel):
    """One message of the internal train topic: a micro-batch of valid, de-duplicated feedback events.

    events     : in arrival order
    histories  : user -> the user's items (external ids) before its first event in the batch, oldest first (at
                 most max_len)
    watermark  : feedback "topic:partition" -> next offset (the batch's last offset there + 1)
    """

    model_config = ConfigDict(frozen=True)

    events: list[Feedback]
    histories: dict[str, list[int | str]]
    watermark: dict[str, int]


def train_batch(examples: Sequence[TrainExample]) -> TrainBatch:
    """The train message of some examples: the history of each user's first example is the one kept."""
    histories: dict[str, list[int | str]] = {}
    last: dict[tuple[str, int], int] = {}  # (topic, partition) -> highest offset
    for ex in examples:
        if ex.event.user_id not in histories:
            histories[ex.event.user_id] = list(ex.history)
        source = ex.source
        where = (source.topic, source.partition)
        last[where] = max(last.get(where, -1), source.offset)
    watermark = {f"{topic}:{partition}": offset + 1 for (topic, partition), offset in last.items()}
    return TrainBatch.model_construct(events=[ex.event for ex in examples], histories=histories, watermark=watermark)


def encode_train_batches(examples: Sequence[TrainExample], max_bytes: int) -> list[bytes]:
    """The train message(s) of a micro-batch: one, unless its encoding exceeds `max_bytes`; then the examples are
    halved (in order) until every part fits, or is a single example."""
    raw = train_batch(examples).model_dump_json().encode()
    if len(raw) <= max_bytes or len(examples) <= 1:
        return [raw]
    half = len(examples) // 2
    return [*encode_train_batches(examples[:half], max_bytes), *encode_train_batches(examples[half:], max_bytes)]


def read_train_batch(raw: bytes) -> TrainBatch:
    """Parse a train-topic message, with the checks ingest applied; raises ValidationError."""
    return TrainBatch.model_validate_json(raw)


def learner_input(batches: Sequence[TrainBatch], read_at: Sequence[Source] = ()) -> LearnerInput:
    """What OnlineLearner.learn takes for one step on train messages in the order they were read: their events
    concatenated, each user's history from the first message that holds the user (a user's messages are in one
    train partition, in order, so the later ones continue the earlier: the learner derives the user's later
    inputs from the step's own events), and their watermarks merged. `read_at` (where the messages were read:
    the train topic) joins the watermark, which then names both the feedback positions the events came from
    and the train positions."""
    watermark: dict[str, int] = {}
    histories: dict[str, list[int | str]] = {}
    events = []
    for batch in batches:
        merge_watermarks(watermark, batch.watermark)
        for user, items in batch.histories.items():
            histories.setdefault(user, list(items))
        events.extend(event.model_dump() for event in batch.events)
    for source in read_at:
        _advance(watermark, source)
    return LearnerInput(events=events, histories=histories, watermark=watermark)


def _advance(watermark: dict[str, int], source: Source) -> None:
    key = f"{source.topic}:{source.partition}"
    watermark[key] = max(watermark.get(key, 0), source.offset + 1)


def merge_watermarks(into: dict[str, int], more: dict[str, int]) -> None:
    """Keep the highest next-offset per topic:partition."""
    for key, offset in more.items():
        into[key] = max(into.get(key, 0), offset)
