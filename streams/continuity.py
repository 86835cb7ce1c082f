"""Continuity of the feedback stream: every offset of a partition this replica holds is handled, in order, once.

Why: Faust re-reads a partition from its committed offset after every rebalance, and drops messages fetched in
an older consumer generation. Around a rebalance that delivery can skip offsets: a message fetched before the
rebalance is dropped as stale while its re-fetch is dropped as "already read" (Faust's consumer moves its read
offset past a message whose delivery was interrupted). Measured here: an ingest replica that took over after
another's SIGKILL skipped a few consecutive offsets of its own partitions at the rebalance (5 of 1,800 events in
tests/test_roles_kafka.py, about one run in four), and nothing noticed. The history table cannot see an event
that never arrives, so the check lives here, before it.

`Continuity.admit` is given each micro-batch of the ingest agent, in order, and says which events to handle and
where to seek. Per (topic, partition), within the current consumer generation:

- an event of an older generation is stale: not handled (Faust re-reads its partition from the committed offset);
- the first event of a generation starts the partition's run if its offset is at most the committed offset
  Faust sought to (or nothing was ever committed);
- afterwards the expected offset is the last handled + 1: an event below it was handled already (a re-read: not
  handled again), an event above it is a GAP: not handled, and the partition is sought back to the expected
  offset, so the missing events, then the held-back ones, arrive again in order;
- a gap that `seeks` seeks, `retry_s` apart, do not close (offsets that hold no record: a transactional
  producer's commit markers, or records deleted by retention) is accepted with a warning: the partition is
  sought to the lowest offset seen above the gap and continues from there. (So a feedback topic written by a
  transactional producer costs a pause of seeks x retry_s per marker: write feedback without transactions.)

Events that are not handled are still acknowledged by Faust's take_events when the batch ends; Faust commits
only consecutive acknowledged offsets, so the seek re-delivers them before their offsets can be committed (one
exception, in Faust's bookkeeping: a gap of exactly one offset at the head of the acknowledged ones can be
committed over; the re-read follows within a batch, so only a crash in that window can lose that one event).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

TP = tuple[str, int]


@dataclass
class _Waiting:
    """A partition sought back to its expected offset after a gap, until that offset arrives (the expected offset
    is the one sought: every change of it after a gap also replaces or clears this)."""

    since: float  # when the last seek was made
    seeks: int  # seeks made to the expected offset
    lowest_above: int  # the lowest offset seen above the expected one


@dataclass
class Admitted:
    """What to do with one micro-batch: the events to handle, in order, and the seeks to make first."""

    events: list[Any]
    seeks: dict[TP, int] = field(default_factory=dict)
    stale: int = 0  # events of an older consumer generation
    reread: int = 0  # events below the expected offset (handled already)
    held: int = 0  # events above a gap (they come again after the seek)


class Continuity:
    """See the module doc. `committed(tp)`: the offset Faust sought the partition to in this generation (None:
    nothing committed); `clock`: monotonic seconds; `gaps_accepted`: gaps taken to hold no record."""

    def __init__(self, committed: Callable[[TP], int | None], clock: Callable[[], float], retry_s: float = 3.0,
                 seeks: int = 3):
        self.committed, self.clock, self.retry_s, self.seeks = committed, clock, retry_s, seeks
        self.generation: int | None = None
        self.expected: dict[TP, int] = {}
        self.waiting: dict[TP, _Waiting] = {}
        self.gaps_accepted = 0

    def admit(self, events: Sequence[Any], generation: int | None) -> Admitted:
        if generation != self.generation:  # a rebalance: every partition starts again from its committed offset
            self.generation, self.expected, self.waiting = generation, {}, {}
        out = Admitted(events=[])
        for event in events:
            message = event.message
            if generation is not None and message.generation_id is not None and message.generation_id != generation:
                out.stale += 1
                continue
            tp, offset = (message.topic, message.partition), message.offset
            verdict = self._verdict(tp, offset)
            if verdict == "handle":
                self.expected[tp] = offset + 1
                out.events.append(event)
            elif verdict == "reread":
                out.reread += 1
            else:
                out.held += 1
                seek = self._gap(tp, offset)
                if seek is not None:
                    out.seeks[tp] = seek
        return out

    def _verdict(self, tp: TP, offset: int) -> str:
        expected = self.expected.get(tp)
        if expected is None:  # the partition's first event in this generation
            committed = self.committed(tp)
            if committed is None or offset <= committed:
                return "handle"
            expected = self.expected[tp] = committed
        if offset == expected:
            self.waiting.pop(tp, None)
            return "handle"
        return "reread" if offset < expected else "gap"

    def _gap(self, tp: TP, offset: int) -> int | None:
        """The offset to seek `tp` to after seeing `offset` above the expected one (None: no new seek)."""
        now, expected = self.clock(), self.expected[tp]
        waiting = self.waiting.get(tp)
        if waiting is None:
            log.warning("feedback %s:%d: offset %d arrived while %d was expected (%d not delivered); seeking back "
                        "to %d", tp[0], tp[1], offset, expected, offset - expected, expected)
            self.waiting[tp] = _Waiting(now, 1, offset)
            return expected
        waiting.lowest_above = min(waiting.lowest_above, offset)
        if now - waiting.since < self.retry_s:
            return None
        if waiting.seeks < self.seeks:  # a seek can be undone by a fetch in flight: try again
            waiting.since, waiting.seeks = now, waiting.seeks + 1
            return expected
        log.warning("feedback %s:%d: offsets %d..%d were not delivered after %d seeks: taken to hold no record "
                    "(transaction markers or deleted records); continuing from %d", tp[0], tp[1], expected,
                    waiting.lowest_above - 1, waiting.seeks, waiting.lowest_above)
        self.gaps_accepted += 1
        self.expected[tp] = waiting.lowest_above
        self.waiting[tp] = _Waiting(now, 1, waiting.lowest_above)
        return waiting.lowest_above
