"""streams.records: what the ingest agent accepts, and why it rejects the rest (no broker needed)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from streams.records import Feedback, Invalid, TrainExample, validate_feedback, validate_item

NOW = 1_750_000_000.0
GOOD = {"event_id": "e1", "user_id": 5, "item_id": 3, "timestamp": 1_700_000_000, "event_type": "view"}


def raw(**changes) -> bytes:
    body = {**GOOD, **changes}
    return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()


def check(data: bytes) -> Feedback | Invalid:
    return validate_feedback(data, now=NOW, max_bytes=1024)


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
        (raw(item_id=3.0), "wrong_type"),
        (raw(item_id=True), "wrong_type"),
        (raw(item_id=[3]), "wrong_type"),
        (raw(user_id=[1]), "wrong_type"),
        (raw(item_id=0), "out_of_range"),
        (raw(item_id="0"), "out_of_range"),  # the string "0" is the id 0
        (raw(item_id=-4), "out_of_range"),
        (raw(item_id=2**63), "out_of_range"),
        (raw(item_id=""), "out_of_range"),
        (raw(item_id="x" * 257), "out_of_range"),
        (raw(user_id=-1), "out_of_range"),
        (raw(user_id=2**63), "out_of_range"),  # an integer user id is bounded like an item id ...
        (raw(user_id=10**300), "out_of_range"),  # ... or it would become a table key of any length
        (raw(user_id="u" * 129), "out_of_range"),  # as a string id is
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


def test_item_ids_are_integers_or_strings_in_canonical_form():
    """An item id's value is never a row number: any size of integer id, or a string id (a SKU), is valid; "3"
    and 3 are one item and both parse as 3."""
    assert check(raw(item_id=2**62)).item_id == 2**62
    assert check(raw(item_id="sku-" + "x" * 196)).item_id == "sku-" + "x" * 196
    assert check(raw(item_id="3")).item_id == 3 and type(check(raw(item_id="3")).item_id) is int
    assert check(raw(item_id="03")).item_id == "03"


def test_the_detail_names_the_field():
    assert check(raw(item_id=3.5)).detail.startswith("item_id:")
    assert check(raw(event_type=...)).detail.startswith("event_type:")


def test_item_events():
    item = validate_item(b'{"item_id": 4, "attributes": [1, 2], "timestamp": 1700000000}', now=NOW)
    assert (item.item_id, item.attributes) == (4, [1, 2])
    assert validate_item(b'{"item_id": 4, "timestamp": 1700000000}', now=NOW).attributes == []
    bad = validate_item(b'{"item_id": 4, "attributes": [0], "timestamp": 1700000000}', now=NOW)
    assert bad.reason == "out_of_range" and bad.detail.startswith("attributes.0")
    # the item-id range and timestamp checks are shared with feedback events
    assert validate_item(b'{"item_id": 0, "timestamp": 1700000000}', now=NOW).reason == "out_of_range"
    assert validate_item(b'{"item_id": "B00X", "timestamp": 1700000000}', now=NOW).item_id == "B00X"
    assert validate_item(b'{"item_id": 4, "timestamp": 100}', now=NOW).reason == "bad_timestamp"


def test_train_example_round_trips_as_json():
    ex = TrainExample(event=check(raw()), history=[1, 2], source={"topic": "t", "partition": 1, "offset": 7})
    assert TrainExample.model_validate_json(ex.model_dump_json()) == ex

    mixed = TrainExample(event=check(raw(item_id="sku-1")), history=[2**62, "sku-0", 4],
                         source={"topic": "t", "partition": 1, "offset": 8})
    back = TrainExample.model_validate_json(mixed.model_dump_json())
    assert back == mixed and back.history == [2**62, "sku-0", 4] and back.event.item_id == "sku-1"
    with pytest.raises(ValidationError):  # what ingest refuses, a train message cannot smuggle in
        TrainExample.model_validate_json(mixed.model_dump_json().replace('"sku-1"', "0"))
