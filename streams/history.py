"""Per-user state kept in the worker's history table: the last items (the model's input) and recent event ids
(de-duplication under at-least-once delivery). Plain functions over the table's JSON values.

Table value: {"items": [item, ...] oldest first, at most max_len; "recent": [event_id, ...] at most `window`}.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from trainer.online import append_history


@dataclass(frozen=True)
class Applied:
    """The user's new table value, and the history BEFORE the event (the training input)."""

    state: dict
    history: list[int]


def history_of(state: Mapping | None) -> list[int]:
    """The items in a table value (an unknown user has none)."""
    return list(state["items"]) if state else []


def apply_feedback(
    state: Mapping | None, event_id: str, item_id: int, max_len: int, window: int
) -> Applied | None:
    """Add one event to a user's state; None when `event_id` is among the user's last `window` event ids."""
    recent = list(state["recent"]) if state else []
    if event_id in recent:
        return None
    before = history_of(state)
    new = {"items": append_history(before, item_id, max_len), "recent": [*recent, event_id][-window:]}
    return Applied(state=new, history=before)
