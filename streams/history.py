"""Per-user state kept in the worker's history table: the last items (the model's input) and recent event ids
(de-duplication under at-least-once delivery). Plain functions over the table's values (dicts; stored as JSON
bytes: encode_state / decode_state).

Table value: {"items": [item, ...] oldest first, at most max_len; "recent": [event_id, ...] at most `window`}
and, when the caller says where each event was read (the worker does; replay does not), "offsets": the feedback
offsets of the `recent` events (aligned with it) and "partition": the partition they were read from.

Re-delivery: the worker writes a user's new value only after the event's training example was forwarded, but
the forward is not acknowledged by Kafka at that moment, and the table's local RocksDB store keeps a write that
Kafka never saw. After a crash the same message is read again, the table already holds its event id, and its
training example may be lost. So a known event id read again AT THE SAME partition and offset is a re-delivery:
`apply_feedback` returns it with `redelivered=True`, the value unchanged and the history the event had (it is
forwarded again: trained at least once, possibly twice). The same event id at another offset is a duplicate sent
twice by a producer, and is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pydantic_core import from_json, to_json

from trainer.online import append_history


def encode_state(state: Mapping) -> bytes:
    """A table value as the table stores it (and its changelog carries it): JSON, as Faust's json codec wrote it
    before (a changelog of either restores into either), encoded by pydantic-core rather than Python's json,
    twice as cheap per write; the table is declared with the raw serializer so that Faust does not encode again."""
    return to_json(state)


def decode_state(raw: bytes | None) -> dict | None:
    """The table value of `encode_state` (or of Faust's json codec); None stays None (an unknown user)."""
    return None if raw is None else from_json(raw)


@dataclass(frozen=True)
class Applied:
    """The user's new table value, and the history BEFORE the event (the training input). `redelivered`: the
    event was applied already (the value is unchanged; see the module doc)."""

    state: dict
    history: list[int]
    redelivered: bool = False


def history_of(state: Mapping | None) -> list[int]:
    """The items in a table value (an unknown user has none)."""
    return list(state["items"]) if state else []


def apply_feedback(
    state: Mapping | None,
    event_id: str,
    item_id: int,
    max_len: int,
    window: int,
    *,
    partition: int | None = None,
    offset: int | None = None,
) -> Applied | None:
    """Add one event to a user's state; None when `event_id` is among the user's last `window` event ids (unless
    it is a re-delivery of the same message: partition and offset given and equal to those recorded)."""
    recent = list(state["recent"]) if state else []
    if event_id in recent:
        return _redelivery(state, recent, event_id, partition, offset)
    before = history_of(state)
    new = {"items": append_history(before, item_id, max_len), "recent": [*recent, event_id][-window:]}
    if offset is not None:
        offsets = _offsets(state, len(recent))
        new["offsets"] = [*offsets, offset][-window:]
        new["partition"] = partition
    return Applied(state=new, history=before)


def _offsets(state: Mapping | None, n: int) -> list[int | None]:
    """The offsets aligned with the `n` recent ids (None where a value written without them has none)."""
    offsets = list(state.get("offsets", [])) if state else []
    return [None] * (n - len(offsets)) + offsets[-n:] if n else []


def _redelivery(
    state: Mapping, recent: list[str], event_id: str, partition: int | None, offset: int | None
) -> Applied | None:
    if offset is None or state.get("partition") != partition:
        return None
    index = len(recent) - 1 - recent[::-1].index(event_id)
    if _offsets(state, len(recent))[index] != offset:
        return None
    items = history_of(state)
    later = len(recent) - 1 - index  # events accepted after this one; each appended one item
    return Applied(state=dict(state), history=items[: max(0, len(items) - 1 - later)], redelivered=True)
