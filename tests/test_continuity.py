"""streams.continuity: the ingest agent handles every offset of its partitions, in order, once, even when Faust's
delivery around a rebalance skips some (the defect: tests/test_roles_kafka.py lost 5 of 1,800 events when an
ingest replica took over after another's SIGKILL; its own partitions skipped offsets 478-479 and 492-494)."""

from __future__ import annotations

from types import SimpleNamespace

from streams.continuity import Continuity

TOPIC = "feedback"


def ev(offset: int, partition: int = 3, generation: int | None = 3, topic: str = TOPIC):
    return SimpleNamespace(message=SimpleNamespace(topic=topic, partition=partition, offset=offset,
                                                   generation_id=generation))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def offsets(admitted) -> list[int]:
    return [e.message.offset for e in admitted.events]


def make(committed: dict | None = None, clock=None) -> Continuity:
    committed = committed or {}
    return Continuity(lambda tp: committed.get(tp), clock or Clock(), retry_s=3.0, seeks=3)


def test_a_contiguous_stream_is_handled_whole_and_in_order():
    c = make({(TOPIC, 3): 10})
    a = c.admit([ev(10), ev(11), ev(0, partition=1), ev(12), ev(1, partition=1)], generation=3)
    assert offsets(a) == [10, 11, 0, 12, 1] and a.seeks == {} and (a.stale, a.reread, a.held) == (0, 0, 0)
    assert offsets(c.admit([ev(13), ev(14)], generation=3)) == [13, 14]


def test_the_measured_defect_offsets_skipped_after_a_rebalance_are_sought_back_and_handled_in_order():
    """Generation 3 starts at the committed offset 492, but Faust delivers 495 first: without the check 492-494
    were never handled (and their offsets committed over by the later acks)."""
    c = make({(TOPIC, 3): 492})
    c.admit([ev(488, generation=2), ev(489, generation=2)], generation=2)
    first = c.admit([ev(490, generation=2), ev(491, generation=2), ev(495), ev(496)], generation=3)
    assert first.events == [] and first.stale == 2 and first.held == 2
    assert first.seeks == {(TOPIC, 3): 492}
    again = c.admit([ev(497), ev(492), ev(493), ev(494), ev(495), ev(496), ev(497), ev(498)], generation=3)
    assert offsets(again) == [492, 493, 494, 495, 496, 497, 498]  # 497 before the re-read was held, not handled
    assert again.held == 1 and again.seeks == {}


def test_events_below_the_expected_offset_were_handled_already():
    c = make()
    c.admit([ev(5), ev(6), ev(7)], generation=3)
    a = c.admit([ev(6), ev(7), ev(8)], generation=3)
    assert offsets(a) == [8] and a.reread == 2


def test_a_first_event_at_or_below_the_committed_offset_starts_the_run():
    """Faust's committed offset can be ahead of what it re-delivers (acks of an older generation were committed):
    what arrives is handled (at least once), never dropped as handled already."""
    c = make({(TOPIC, 3): 100})
    assert offsets(c.admit([ev(97), ev(98)], generation=3)) == [97, 98]
    assert offsets(make().admit([ev(40)], generation=3)) == [40]  # nothing committed: the first event starts


def test_a_gap_inside_a_run_seeks_once_then_again_after_retry_s_and_is_accepted_after_the_last_seek():
    clock = Clock()
    c = make(clock=clock)
    c.admit([ev(10), ev(11)], generation=3)
    a = c.admit([ev(14), ev(15)], generation=3)  # 12 and 13 never come (offsets without records)
    assert a.events == [] and a.seeks == {(TOPIC, 3): 12}
    clock.now = 1.0
    assert c.admit([ev(14)], generation=3).seeks == {}  # within retry_s: no second seek
    seeks = []
    for t in (3.5, 7.0):
        clock.now = t
        a = c.admit([ev(14), ev(15)], generation=3)
        seeks.append(a.seeks)
        assert a.events == []
    assert seeks == [{(TOPIC, 3): 12}, {(TOPIC, 3): 12}]
    clock.now = 10.5
    accepted = c.admit([ev(14), ev(15)], generation=3)
    assert accepted.seeks == {(TOPIC, 3): 14} and accepted.events == [] and c.gaps_accepted == 1
    assert offsets(c.admit([ev(15), ev(14), ev(15), ev(16)], generation=3)) == [14, 15, 16]


def test_partitions_and_topics_are_followed_apart_and_a_rebalance_starts_them_again():
    c = make({(TOPIC, 1): 0, ("repartition", 1): 7})
    a = c.admit([ev(0, partition=1), ev(7, partition=1, topic="repartition"), ev(9, partition=1, topic="repartition"),
                 ev(1, partition=1)], generation=3)
    assert offsets(a) == [0, 7, 1] and a.seeks == {("repartition", 1): 8}
    b = c.admit([ev(2, partition=1, generation=4)], generation=4)  # a new generation: from the committed offset
    assert b.events == [] and b.seeks == {(TOPIC, 1): 0}


def test_events_without_a_generation_are_not_stale():
    """Faust's test context and older messages carry no generation id."""
    assert offsets(make().admit([ev(0, generation=None), ev(1, generation=None)], generation=0)) == [0, 1]


def test_the_pinned_faust_consumer_has_what_the_worker_reads():
    """StreamWorker.committed_offset reads Faust's private `_committed_offset` (there is no public copy) and seeks
    with `seek_wait`; an upgrade that drops either must fail here, not disable the check silently."""
    import faust

    from streams.app import create_app
    from streams.settings import WorkerSettings

    app = create_app(WorkerSettings(app_id="continuity-api", store_url="memory://"), testing=False)
    consumer = app.consumer
    offsets = consumer._committed_offset
    assert isinstance(offsets, dict) and offsets.get(faust.types.TP("t", 0)) is None
    assert callable(consumer.seek_wait) and isinstance(app.consumer_generation_id, int)
