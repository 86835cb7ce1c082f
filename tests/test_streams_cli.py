"""`sparc produce` / `sparc worker` without a broker: event order, pacing, and one-line user errors."""

from __future__ import annotations

import numpy as np

from replay.datasets import SequenceDataset
from sparc_stream.cli.main import main as sparc
from sparc_stream.cli.produce import Pacer, dataset_events


def tiny(timestamps: bool) -> SequenceDataset:
    return SequenceDataset(
        name="Tiny",
        user_ids=np.array([10, 20]),
        sequences=[np.array([1, 2, 3]), np.array([3, 1])],
        num_items=3,
        timestamps=[np.array([100, 300, 300]), np.array([200, 300])] if timestamps else None,
        item_attributes={1: [4], 3: [5, 6]},
        num_attributes=6,
    )


def test_dataset_events_catalogue_first_then_time_order_across_users():
    events = list(dataset_events(tiny(timestamps=True)))
    items = [(key, value) for kind, key, value in events if kind == "item"]
    assert items == [("1", {"item_id": 1, "attributes": [4], "timestamp": 100}),
                     ("2", {"item_id": 2, "attributes": [], "timestamp": 100}),
                     ("3", {"item_id": 3, "attributes": [5, 6], "timestamp": 100})]
    assert [kind for kind, _, _ in events[:3]] == ["item"] * 3
    feedback = [(key, v["event_id"], v["item_id"], v["timestamp"]) for kind, key, v in events if kind == "feedback"]
    assert feedback == [("10", "Tiny-10-0", 1, 100), ("20", "Tiny-20-0", 3, 200), ("10", "Tiny-10-1", 2, 300),
                        ("10", "Tiny-10-2", 3, 300), ("20", "Tiny-20-1", 1, 300)]  # ties: user, then position


def test_dataset_events_without_timestamps_interleave_users_by_position():
    events = [v for kind, _, v in dataset_events(tiny(timestamps=False), now=1_700_000_000) if kind == "feedback"]
    assert [e["event_id"] for e in events] == ["Tiny-10-0", "Tiny-20-0", "Tiny-10-1", "Tiny-20-1", "Tiny-10-2"]
    assert {e["timestamp"] for e in events} == {1_700_000_000}


def test_pacer_sleeps_to_hold_the_rate():
    now, slept = [0.0], []
    pacer = Pacer(10.0, clock=lambda: now[0], sleep=slept.append)
    pacer.wait(5)  # 5 messages at t=0 are 0.5 s early
    now[0] = 2.0
    pacer.wait(10)  # on time: no sleep
    Pacer(0.0, clock=lambda: 0.0, sleep=slept.append).wait(10**6)  # unlimited
    assert slept == [0.5]


def test_user_errors_are_one_line_and_exit_2(capsys):
    assert sparc(["worker", "--partitions", "0"]) == 2
    assert sparc(["produce", "--synthetic", "--rate", "-1"]) == 2
    assert sparc(["produce", "--data", "/no/such/folder"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith(("sparc worker: error:", "sparc produce: error:")) for line in err)
    assert "partitions" in err[0] and "--rate" in err[1] and "/no/such/folder" in err[2]
