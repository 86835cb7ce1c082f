"""streams.records: what the ingest agent accepts, and why it rejects the rest (no broker needed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from streams.records import Feedback, Invalid, TrainExample, read_train_example, validate_feedback, validate_item

NOW = 1_750_000_000.0
GOOD = {"event_id": "e1", "user_id": 5, "item_id": 3, "timestamp": 1_700_000_000, "event_type": "view"}


def raw(**changes) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def check(data: bytes) -> Feedback | Invalid:
    return validate_feedback(data, now=NOW, max_item_id=1000, max_bytes=1024)


def test_a_valid_event_is_parsed_and_the_user_id_becomes_text():
    fb = check(raw(weight=2.5, extra="ignored"))
    assert isinstance(fb, Feedback)
    assert (fb.event_id, fb.user_id, fb.item_id, fb.event_type, fb.weight) == ("e1", "5", 3, "view", 2.5)
    assert check(raw(user_id="alice", timestamp=1_700_000_000.25)).user_id == "alice"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not json", "bad_json"),
        (b"\xff\xfe{}", "not_utf8"),
        (b"[1, 2]", "not_an_object"),
        (b"null", "not_an_object"),
        (b"x" * 2000, "oversized"),
        (raw(event_type=...), "missing_field"),
        (raw(item_id="3"), "wrong_type"),
        (raw(item_id=3.0), "wrong_type"),
        (raw(item_id=True), "wrong_type"),
        (raw(user_id=[1]), "wrong_type"),
        (raw(item_id=0), "out_of_range"),
        (raw(item_id=1001), "out_of_range"),
        (raw(user_id=-1), "out_of_range"),
        (raw(event_id=""), "out_of_range"),
        (raw(weight=-1), "out_of_range"),
        (raw(timestamp=100), "bad_timestamp"),  # before 1990
        (raw(timestamp=int(NOW) * 1000), "bad_timestamp"),  # milliseconds
        (raw(timestamp=NOW + 2 * 86_400), "bad_timestamp"),  # two days ahead
        (b'{"event_id":"e","user_id":1,"item_id":1,"timestamp":NaN,"event_type":"v"}', "bad_timestamp"),
    ],
)
def test_invalid_events_name_their_reason(data, reason):
    result = check(data)
    assert isinstance(result, Invalid), result
    assert result.reason == reason
    assert result.detail and "\n" not in result.detail


def test_the_detail_names_the_field():
    assert check(raw(item_id="3")).detail.startswith("item_id:")
    assert check(raw(event_type=...)).detail.startswith("event_type:")


def test_item_events():
    item = validate_item(b'{"item_id": 4, "attributes": [1, 2], "timestamp": 1700000000}', now=NOW)
    assert (item.item_id, item.attributes) == (4, [1, 2])
    assert validate_item(b'{"item_id": 4, "timestamp": 1700000000}', now=NOW).attributes == []
    bad = validate_item(b'{"item_id": 4, "attributes": [0], "timestamp": 1700000000}', now=NOW)
    assert bad.reason == "out_of_range" and bad.detail.startswith("attributes.0")
    # the item-id range and timestamp checks are shared with feedback events
    assert validate_item(b'{"item_id": 0, "timestamp": 1700000000}', now=NOW).reason == "out_of_range"
    assert validate_item(b'{"item_id": 9, "timestamp": 1700000000}', max_item_id=8, now=NOW).reason == "out_of_range"
    assert validate_item(b'{"item_id": 4, "timestamp": 100}', now=NOW).reason == "bad_timestamp"


def test_train_example_round_trips_as_json():
    ex = TrainExample(event=check(raw()), history=[1, 2], source={"topic": "t", "partition": 1, "offset": 7})
    assert TrainExample.model_validate_json(ex.model_dump_json()) == ex



def test_train_examples_are_read_back_with_the_workers_item_limit():
    big = check(raw()).model_copy(update={"item_id": 3_000_000})
    data = TrainExample(event=big, history=[1], source={"topic": "t", "partition": 0, "offset": 0}).model_dump_json()
    assert read_train_example(data.encode(), max_item_id=5_000_000).event.item_id == 3_000_000
    with pytest.raises(ValidationError):
        read_train_example(data.encode())  # the default limit is 1_000_000
