"""Message schemas of the worker's topics and the validation that guards them.

feedback-events (key = user id, value = JSON):
    {"event_id": str, "user_id": int in [0, 2**63 - 1] | str (1 to 128 characters), "item_id": ItemId,
     "timestamp": unix seconds, "event_type": str, "weight": float >= 0 (optional, default 1.0)}
    (other keys are ignored)
item-events (key = item id, value = JSON):
    {"item_id": ItemId, "attributes": [int >= 1, ...], "timestamp": unix seconds}
ItemId: an integer in [1, 2**63 - 1] or a string of 1 to 256 characters (a SKU). It is an external id, never a
row number (trainer.vocab): its value costs nothing. Ids are parsed in canonical form (trainer.vocab.canonical_id):
"7" and 7 are the same item and both parse as 7; "07" stays a string.
<app_id>-train-examples (internal, train_partitions partitions): streams.batching.TrainBatch, a micro-batch of
    valid feedback events of the users of one train partition (streams.routing) with their histories and the
    feedback positions it covers (for the snapshot's watermark), built from TrainExamples (one event, the
    user's history before it, where it was read).
<app_id>-feedback-by-user (internal): feedback records re-keyed by user (key = user id, the original bytes).

`validate_feedback(raw)` / `validate_item(raw)` never raise: they return the parsed record or an `Invalid`
with a short reason (the DLQ counter's label) and a one-line detail.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from trainer.vocab import INT64_MAX, MAX_ID_CHARS, canonical_id

MIN_TIMESTAMP = 631_152_000  # 1990-01-01T00:00:00Z: anything older is a unit or clock error
MAX_FUTURE_SECONDS = 86_400  # timestamps more than a day ahead of the worker's clock are rejected

REASONS = (
    "oversized",
    "bad_json",
    "not_an_object",
    "missing_field",
    "wrong_type",
    "out_of_range",
    "bad_timestamp",
    "not_utf8",
    "catalogue_full",  # valid, but its new item does not fit the learner's catalogue (CatalogueConfig.on_full)
    "unknown_item",  # valid feedback on an item no item event has named (item_sources "items")
    "wrong_key",  # valid feedback read outside its user's partition, with on_wrong_key "dlq" (streams.routing)
    "train_error",  # valid, but the training step refused its micro-batch (a non-finite loss or gradient)
)

Id = Annotated[StrictStr, Field(min_length=1, max_length=128)]
ItemId = StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]


@dataclass(frozen=True)
class Invalid:
    """Why a message was rejected: `reason` is one of REASONS, `detail` a one-line explanation."""

    reason: str
    detail: str


def _check_timestamp(value: float, context: dict | None) -> float:
    now = (context or {}).get("now", time.time())
    if not math.isfinite(value) or not MIN_TIMESTAMP <= value <= now + MAX_FUTURE_SECONDS:
        raise PydanticCustomError(
            "bad_timestamp",
            "timestamp {value} is not unix seconds between 1990-01-01 and one day from now",
            {"value": value},
        )
    return value


def _check_item(value: int | str) -> int | str:
    item = canonical_id(value) if isinstance(value, str) else value  # the field's type bounds the string
    if isinstance(item, int) and not 1 <= item <= INT64_MAX:
        raise PydanticCustomError("out_of_range", "item id {value} is not in [1, 2**63 - 1]", {"value": item})
    return item


class _ItemEventBase(BaseModel):
    """The checks every event naming an item shares: the item id in canonical form and in range, and a plausible
    timestamp (the clock from the validation context: "now")."""

    @field_validator("item_id", check_fields=False)
    @classmethod
    def _canonical_item(cls, value: int | str) -> int | str:
        return _check_item(value)

    @field_validator("timestamp", check_fields=False)
    @classmethod
    def _plausible_time(cls, value: float, info) -> float:
        return _check_timestamp(value, info.context)


class Feedback(_ItemEventBase):
    """A user's interaction with an item. `user_id` is normalised to a string (the table key)."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    event_id: Id
    user_id: Id | StrictInt
    item_id: ItemId
    timestamp: StrictInt | StrictFloat
    event_type: Annotated[StrictStr, Field(min_length=1, max_length=32)]
    weight: Annotated[StrictFloat | StrictInt, Field(ge=0, le=1e6)] = 1.0

    @field_validator("user_id")
    @classmethod
    def _user_as_text(cls, value: str | int) -> str:
        if isinstance(value, int) and not 0 <= value <= INT64_MAX:  # a string id has at most 128 characters
            raise PydanticCustomError("out_of_range", "user id {value} is not in [0, 2**63 - 1]", {"value": value})
        return str(value)


class ItemEvent(_ItemEventBase):
    """A catalogue entry: an item (new or updated) and its attribute ids."""

    model_config = ConfigDict(strict=True, frozen=True, extra="ignore")

    item_id: ItemId
    attributes: Annotated[list[Annotated[StrictInt, Field(ge=1)]], Field(max_length=64)] = []
    timestamp: StrictInt | StrictFloat


class Source(BaseModel):
    """Where a message was read: topic, partition, offset."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int


class TrainExample(BaseModel):
    """One valid feedback event as ingest forwards it: the user's history before it and where it was read
    (streams.batching.TrainBatch, the train topic's message, carries a micro-batch of them)."""

    model_config = ConfigDict(frozen=True)

    event: Feedback
    history: list[int | str]  # the user's items before this event, oldest first (at most max_len)
    source: Source


_TYPE_ERRORS = (
    "int_type",
    "string_type",
    "float_type",
    "list_type",
    "bool_type",
    "union_tag_invalid",
    "int_from_float",
)
_RANGE_ERRORS = (
    "greater_than_equal",
    "less_than_equal",
    "greater_than",
    "less_than",
    "string_too_short",
    "string_too_long",
    "too_long",
    "too_short",
    "out_of_range",
)


def _where(loc: tuple) -> str:
    """('user_id', 'constrained-str') -> 'user_id'; ('attributes', 0) -> 'attributes.0'."""
    return ".".join(str(p) for i, p in enumerate(loc) if i == 0 or isinstance(p, int))


def _classify(exc: ValidationError) -> Invalid:
    errors = exc.errors(include_url=False, include_input=False)
    kinds = {e["type"] for e in errors}
    if "json_invalid" in kinds:
        return Invalid("bad_json", errors[0]["msg"])
    if kinds & {"model_type", "model_attributes_type", "dict_type"}:
        return Invalid("not_an_object", "the message is JSON but not an object")
    # a union field (an id: int or string) whose value has one member's type but is out of its range
    ranged = {e["loc"][:1] for e in errors if e["type"] in _RANGE_ERRORS}
    errors = [e for e in errors if not (e["type"] in _TYPE_ERRORS and e["loc"][:1] in ranged)]
    for reason, members in (
        ("missing_field", ("missing",)),
        ("bad_timestamp", ("bad_timestamp",)),
        ("wrong_type", _TYPE_ERRORS),
        ("out_of_range", _RANGE_ERRORS),
    ):
        hit = next((e for e in errors if e["type"] in members), None)
        if hit is not None:
            return Invalid(reason, f"{_where(hit['loc'])}: {hit['msg']}")
    first = errors[0]
    return Invalid("wrong_type", f"{_where(first['loc'])}: {first['msg']}")


def _validate(model: type[BaseModel], raw: bytes, max_bytes: int, context: dict[str, Any]) -> Any:
    if len(raw) > max_bytes:
        return Invalid("oversized", f"{len(raw)} bytes, the limit is {max_bytes}")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("not_utf8", f"not UTF-8 at byte {exc.start}")
    try:
        return model.model_validate_json(raw, context=context)
    except ValidationError as exc:
        return _classify(exc)


def validate_feedback(raw: bytes, *, max_bytes: int = 16_384, now: float | None = None) -> Feedback | Invalid:
    """Parse one feedback message; `now` (unix seconds) bounds the timestamp (default: the clock)."""
    return _validate(Feedback, raw, max_bytes, {"now": time.time() if now is None else now})


def validate_item(raw: bytes, *, max_bytes: int = 16_384, now: float | None = None) -> ItemEvent | Invalid:
    """Parse one item-catalogue message (see validate_feedback)."""
    return _validate(ItemEvent, raw, max_bytes, {"now": time.time() if now is None else now})
