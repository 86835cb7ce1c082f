"""A micro-batch of train-topic examples -> what OnlineLearner.learn takes, plus the input watermark.

Each example carries the history its user had before the event (the ingest agent read it from the table).
The learner wants histories as of the START of the batch and derives the rest from the batch's own earlier
events, so the history of a user's FIRST example in the batch is the one passed on. Both views agree because
one user's examples arrive in order (one feedback partition per user, one train partition).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from streams.records import Source, TrainExample


@dataclass(frozen=True)
class LearnerInput:
    events: list[dict]  # {"event_id", "user_id", "item_id", "timestamp", ...} in arrival order
    histories: dict[str, list[int]]  # user -> history before the user's first event in the batch
    watermark: dict[str, int]  # "topic:partition" -> next offset to read (last offset in the batch + 1)


def split_examples(examples: Sequence[TrainExample], read_at: Sequence[Source] = ()) -> LearnerInput:
    """`read_at`: where the examples themselves were read (the train topic); it joins the watermark, which
    then names both the feedback positions the examples came from and the train-topic position."""
    events, histories, watermark = [], {}, {}
    for ex in examples:
        events.append(ex.event.model_dump())
        histories.setdefault(ex.event.user_id, list(ex.history))
        _advance(watermark, ex.source)
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
