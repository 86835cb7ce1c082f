"""replay/sources.py: every source yields the same time-ordered records; bad input is a one-line SourceError."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replay.sources import (
    NO_TIME_EPOCH,
    SourceError,
    is_feedback,
    open_source,
    parse_kafka_url,
    parse_offsets,
    parse_time,
    read_jsonl,
)

T0 = 1_700_000_000


def fb(event_id: str, user, item: int, ts: int) -> dict:
    return {"event_id": event_id, "user_id": user, "item_id": item, "timestamp": ts, "event_type": "view"}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def test_jsonl_is_parsed_validated_and_time_ordered(tmp_path):
    path = write_jsonl(tmp_path / "events.jsonl", [
        fb("e2", 7, 3, T0 + 5),
        fb("e1", "u1", 2, T0 + 1),
        "",  # blank lines are skipped
        {"item_id": 3, "attributes": [4, 5], "timestamp": T0 + 5},  # same second as its first feedback
        {**fb("e3", 7, 2, T0 + 5), "extra": "ignored"},
    ])
    records = read_jsonl(path)
    assert [r.get("event_id", "item") for r in records] == ["e1", "item", "e2", "e3"]
    assert records[1] == {"item_id": 3, "attributes": [4, 5], "timestamp": T0 + 5}
    assert records[2] == fb("e2", "7", 3, T0 + 5)  # user ids become strings, as in the worker
    assert "extra" not in records[3]


@pytest.mark.parametrize(("line", "reason"), [
    ("{not json", "bad_json"),
    ('["a list"]', "not_an_object"),
    (json.dumps({"event_id": "x", "user_id": 1, "timestamp": T0, "event_type": "view"}), "missing_field"),
    (json.dumps(fb("x", 1, 0, T0)), "out_of_range"),
    (json.dumps(fb("x", 1, 5, 12)), "bad_timestamp"),
    (json.dumps({"item_id": 3, "attributes": ["a"], "timestamp": T0}), "wrong_type"),
])
def test_a_bad_jsonl_line_names_file_line_and_reason(tmp_path, line, reason):
    path = write_jsonl(tmp_path / "bad.jsonl", [fb("e1", 1, 2, T0), line])
    with pytest.raises(SourceError) as info:
        read_jsonl(path)
    message = str(info.value)
    assert message.startswith(f"{path}:2: {reason}: "), message
    assert "\n" not in message


def test_missing_jsonl_file(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "absent.jsonl"))


def write_s3rec(folder: Path, timestamps: bool) -> Path:
    folder.mkdir()
    (folder / "Tiny.txt").write_text("1 10 11 12\n2 20 10\n3 30\n")
    if timestamps:  # user 2's first event ties with user 1's second; user 3 ties with user 1's first
        (folder / "Tiny_timestamps.txt").write_text(f"1 {T0} {T0 + 9} {T0 + 9}\n2 {T0 + 9} {T0 + 20}\n3 {T0}\n")
    (folder / "Tiny_item2attributes.json").write_text(json.dumps({"10": [1, 2], "20": [3]}))
    return folder


def test_s3rec_global_time_order_ties_by_user_then_position_and_items_at_first_sight(tmp_path):
    source = open_source(str(write_s3rec(tmp_path / "tiny", timestamps=True)))
    records = list(source.records())
    feedback = [(r["user_id"], r["item_id"], r["timestamp"]) for r in records if is_feedback(r)]
    assert feedback == [
        ("1", 10, T0), ("3", 30, T0),  # tie at T0: user 1 before user 3
        ("1", 11, T0 + 9), ("1", 12, T0 + 9), ("2", 20, T0 + 9),  # tie: user, then position
        ("2", 10, T0 + 20),
    ]
    assert source.feedback == 6 and source.name == "Tiny"
    items = [(i, r["item_id"]) for i, r in enumerate(records) if not is_feedback(r)]
    # an item event just before each item's first feedback, never again
    assert [item for _, item in items] == [10, 30, 11, 12, 20]
    for pos, item in items:
        assert records[pos + 1]["item_id"] == item and is_feedback(records[pos + 1])
    assert records[0] == {"item_id": 10, "attributes": [1, 2], "timestamp": T0}
    assert next(r for r in records if r.get("item_id") == 30 and not is_feedback(r))["attributes"] == []
    assert records[1]["event_id"] == "Tiny-1-0"


def test_s3rec_without_timestamps_is_round_robin_by_position(tmp_path):
    records = list(open_source(str(write_s3rec(tmp_path / "tiny", timestamps=False))).records())
    feedback = [(r["user_id"], r["item_id"], r["timestamp"]) for r in records if is_feedback(r)]
    assert feedback == [
        ("1", 10, NO_TIME_EPOCH), ("2", 20, NO_TIME_EPOCH), ("3", 30, NO_TIME_EPOCH),
        ("1", 11, NO_TIME_EPOCH + 1), ("2", 10, NO_TIME_EPOCH + 1),
        ("1", 12, NO_TIME_EPOCH + 2),
    ]


def test_s3rec_errors_are_source_errors(tmp_path):
    folder = write_s3rec(tmp_path / "tiny", timestamps=True)
    (folder / "Tiny.txt").write_text("1 10 eleven\n")
    with pytest.raises(SourceError, match=r"Tiny.txt:1: not an integer"):
        open_source(str(folder))
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(str(tmp_path / "nowhere"))


def test_synthetic_source_matches_the_generator():
    source = open_source("synthetic:4?users=20&events=300&items=40&drifts=2")
    records = list(source.records())
    feedback = [r for r in records if is_feedback(r)]
    assert source.name == "synthetic:4" and source.feedback == len(feedback) == 300
    assert all(isinstance(r["user_id"], str) for r in feedback)
    assert feedback[0]["event_id"] == "syn-4-0"
    times = [r["timestamp"] for r in records]
    assert times == sorted(times)
    assert [label for _, label in source.markers] == ["drift 1", "drift 2"]
    assert [at for at, _ in source.markers] == [100, 200]  # replay positions of the drift points
    first = {}
    for pos, r in enumerate(records):
        first.setdefault(r["item_id"], (pos, is_feedback(r)))
    assert not any(was_feedback for _, was_feedback in first.values())  # item events come first


@pytest.mark.parametrize("spec", ["synthetic:x", "synthetic:1?colour=3", "synthetic?users=0"])
def test_bad_synthetic_specs(spec):
    with pytest.raises(SourceError):
        open_source(spec)


def test_kafka_url_and_bounds():
    rng = parse_kafka_url("kafka://127.0.0.1:39092/feedback-events?from=1700000000&to=2023-11-14T22:13:30")
    assert (rng.bootstrap, rng.topic) == ("127.0.0.1:39092", "feedback-events")
    assert rng.start_time == 1_700_000_000.0 and rng.stop_time == 1_700_000_010.0
    rng = parse_kafka_url("kafka://h:1/t?from_offset=5&to_offset=0:9,1:7")
    assert (rng.start_offset, rng.stop_offset, rng.start_time) == ("5", "0:9,1:7", None)
    assert parse_offsets("5", [1, 0]) == {0: 5, 1: 5}
    assert parse_offsets("0:9,1:7", [0, 1]) == {0: 9, 1: 7}
    assert parse_time("2023-11-14T22:13:20+00:00") == 1_700_000_000.0
    for bad in ("kafka://h:1/", "kafka:///t", "kafka://h:1/t?since=3"):
        with pytest.raises(SourceError):
            parse_kafka_url(bad)
    with pytest.raises(SourceError, match="no partition"):
        parse_offsets("4:1", [0, 1])
    with pytest.raises(SourceError):
        parse_time("yesterday")
