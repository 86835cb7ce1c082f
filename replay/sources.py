"""Where replayed events come from: a JSONL file, an S3-Rec folder, the synthetic stream or a Kafka topic.

Every source yields the SAME plain dicts, in time order, the records the worker's topics carry (streams.records):
  feedback  {"event_id": str, "user_id": str, "item_id": int, "timestamp": int | float, "event_type": str}
  item      {"item_id": int, "attributes": [int, ...], "timestamp": int | float}
`user_id` is always a string, as the worker's Feedback record normalises it (its history table's key). A record
is feedback when it has an "event_id" (`is_feedback`). An item event precedes the first feedback on its item
whenever the source knows the item's attributes.

Order, per source:
  JSONL, Kafka  every record is read first, then stably sorted by (timestamp, item events before feedback):
                a file already in time order keeps its order; items whose catalogue event carries the same
                second as their first feedback come before it.
  S3-Rec        global time order across users; ties by user id, then position in the user's line. Without
                <Name>_timestamps.txt the lines are interleaved round-robin (every user's 1st item, then every
                2nd, ...; users in file order) and the k-th round is stamped NO_TIME_EPOCH + k, so a delay or a
                window "in seconds" counts rounds. An item event (its attributes) is emitted when the item is
                first seen, just before that feedback, with the same timestamp.
  synthetic     the generator's own order (replay.synthetic.SyntheticStream.iter_events).

`open_source(spec)` parses the `--events` argument of `sparc replay` into an `EventSource`; errors a user can
fix are `SourceError`s whose message is one line (`file:line: reason` for a bad JSONL line).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np

NO_TIME_EPOCH = 946_684_800  # 2000-01-01T00:00:00Z: round k of a dataset without timestamps is stamped this + k
KAFKA_POLL_MS = 500
KAFKA_IDLE_S = 10.0  # give up when no record arrives for this long while offsets remain to be read


class SourceError(ValueError):
    """A source cannot be read: a missing file, a bad line, an unknown topic. The message is one line."""


@dataclass(frozen=True)
class EventSource:
    """A replayable event stream.

    name     : what it is, for reports ("Beauty", "synthetic:0", "jsonl:events.jsonl", "kafka:topic")
    records  : a callable returning a fresh iterator over the records, in time order (module doc)
    feedback : number of feedback records it yields, when known in advance (progress bars, auto windows)
    markers  : (replay event index, label) worth drawing on plots, e.g. the synthetic stream's drift points
    info     : source-specific facts for the report (skipped invalid Kafka messages, ...)
    """

    name: str
    records: Callable[[], Iterator[dict]]
    feedback: int | None = None
    markers: tuple[tuple[int, str], ...] = ()
    info: dict = field(default_factory=dict)


def is_feedback(record: dict) -> bool:
    return "event_id" in record


def take_feedback(records: Iterable[dict], limit: int | None) -> Iterator[dict]:
    """The records up to the `limit`-th feedback record (all of them when limit is None)."""
    taken = 0
    for record in records:
        if limit is not None and taken == limit:
            return
        taken += is_feedback(record)
        yield record


def time_ordered(records: Iterable[dict]) -> list[dict]:
    """Stable sort by (timestamp, item events first)."""
    return sorted(records, key=lambda r: (r["timestamp"], is_feedback(r)))


# ------------------------------------------------------------------ JSONL
def _parse_record(raw: bytes, now: float) -> dict:
    """One JSON message -> a record, validated by the worker's own schemas; raises SourceError(reason)."""
    from streams.records import Invalid, validate_feedback, validate_item

    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"bad_json: {exc}") from None
    if not isinstance(obj, dict):
        raise SourceError("not_an_object: expected a JSON object (a feedback or an item event)")
    feedback = "event_id" in obj or "user_id" in obj
    result = validate_feedback(raw, now=now) if feedback else validate_item(raw, now=now)
    if isinstance(result, Invalid):
        kind = "feedback event" if feedback else "item event"
        raise SourceError(f"{result.reason}: {result.detail} (read as a {kind})")
    if feedback:
        return {
            "event_id": result.event_id,
            "user_id": result.user_id,
            "item_id": result.item_id,
            "timestamp": result.timestamp,
            "event_type": result.event_type,
        }
    return {"item_id": result.item_id, "attributes": list(result.attributes), "timestamp": result.timestamp}


def read_jsonl(path: str | Path, now: float | None = None) -> list[dict]:
    """Every record of a JSONL file (one event per line; blank lines skipped), time-ordered.

    A line that is not a valid feedback or item event raises SourceError("file:line: reason: detail").
    Timestamps must be unix seconds between 1990 and one day after `now` (default: the clock).
    """
    p = Path(path)
    if not p.is_file():
        raise SourceError(f"{p}: no such file")
    now = time.time() if now is None else now
    records = []
    with p.open("rb") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(_parse_record(line, now))
            except SourceError as exc:
                raise SourceError(f"{p}:{lineno}: {exc}") from None
    return time_ordered(records)


def jsonl_source(path: str | Path) -> EventSource:
    records = read_jsonl(path)
    return EventSource(
        name=f"jsonl:{Path(path).name}",
        records=lambda: iter(records),
        feedback=sum(map(is_feedback, records)),
    )


# ------------------------------------------------------------------ S3-Rec
def dataset_records(ds) -> Iterator[dict]:
    """A SequenceDataset (replay.datasets) as time-ordered records (module doc: S3-Rec order)."""
    users = np.concatenate([np.full(len(s), u, dtype=np.int64) for u, s in zip(ds.user_ids, ds.sequences, strict=True)])
    positions = np.concatenate([np.arange(len(s), dtype=np.int64) for s in ds.sequences])
    rows = np.concatenate([np.full(len(s), r, dtype=np.int64) for r, s in enumerate(ds.sequences)])
    items = np.concatenate(ds.sequences)
    if ds.timestamps is not None:
        stamps = np.concatenate(ds.timestamps)
        order = np.lexsort((positions, users, stamps))  # time, then user, then position
    else:
        stamps = NO_TIME_EPOCH + positions
        order = np.lexsort((rows, positions))  # round-robin: position, then users in file order
    seen: set[int] = set()
    for i in order.tolist():
        item, ts, user = int(items[i]), int(stamps[i]), int(users[i])
        if item not in seen:
            seen.add(item)
            yield {"item_id": item, "attributes": list(ds.item_attributes.get(item, [])), "timestamp": ts}
        yield {
            "event_id": f"{ds.name}-{user}-{int(positions[i])}",
            "user_id": str(user),
            "item_id": item,
            "timestamp": ts,
            "event_type": "view",
        }


def s3rec_source(path: str | Path) -> EventSource:
    from replay.datasets import DataError, load_s3rec

    try:
        ds = load_s3rec(path)
    except DataError as exc:
        raise SourceError(str(exc)) from None
    return EventSource(
        name=ds.name,
        records=lambda: dataset_records(ds),
        feedback=ds.num_interactions,
        info={"timestamps": ds.timestamps is not None, **ds.summary()},
    )


# ------------------------------------------------------------------ synthetic
def synthetic_source(seed: int = 0, **overrides) -> EventSource:
    """The project's synthetic stream (replay.synthetic) with SyntheticConfig(seed=seed, **overrides)."""
    from replay.synthetic import SyntheticConfig, generate

    try:
        stream = generate(SyntheticConfig(seed=seed, **overrides))
    except (TypeError, ValueError) as exc:
        raise SourceError(f"synthetic stream: {exc}") from None

    def records() -> Iterator[dict]:
        for r in stream.iter_events():
            yield {**r, "user_id": str(r["user_id"])} if is_feedback(r) else r

    return EventSource(
        name=f"synthetic:{seed}",
        records=records,
        feedback=stream.num_events,
        markers=tuple((d.event_index, f"drift {k + 1}") for k, d in enumerate(stream.drift_points)),
        info={"items": stream.num_items, "drift_timestamps": [d.timestamp for d in stream.drift_points]},
    )


# ------------------------------------------------------------------ Kafka
def parse_time(text: str) -> float:
    """Unix seconds from "1700000000", "1700000000.5" or an ISO-8601 date/time (UTC unless it says)."""
    try:
        value = float(text)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise SourceError(f"{text!r} is neither unix seconds nor an ISO-8601 date/time") from None
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not math.isfinite(value) or value < 0:
        raise SourceError(f"{text!r}: a time must be finite unix seconds >= 0")
    return value


def parse_offsets(text: str, partitions: Iterable[int]) -> dict[int, int]:
    """"N" (every partition) or "P:N,P:N" -> {partition: offset}."""
    parts = sorted(partitions)
    try:
        if ":" not in text:
            return dict.fromkeys(parts, int(text))
        out = {}
        for pair in text.split(","):
            p, o = pair.split(":")
            out[int(p)] = int(o)
    except ValueError:
        raise SourceError(f"offsets {text!r}: expected N or PARTITION:N,PARTITION:N") from None
    unknown = set(out) - set(parts)
    if unknown:
        raise SourceError(f"offsets {text!r}: no partition {sorted(unknown)} (the topic has {parts})")
    return out


@dataclass(frozen=True)
class KafkaRange:
    """Records of one topic between two points, per partition: [start, stop).

    start_time / stop_time are Kafka record timestamps (unix seconds; the producer's send time unless it set
    one), looked up with offsets_for_times; start_offset / stop_offset are offsets, one for every partition
    ("N") or per partition ("P:N,..."). Time and offset bounds may be mixed; unset = the topic's beginning/end
    (the end as it is when reading starts).
    """

    bootstrap: str
    topic: str
    start_time: float | None = None
    stop_time: float | None = None
    start_offset: str | None = None
    stop_offset: str | None = None
    client: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)  # security (KafkaConnection)


def read_kafka(rng: KafkaRange, timeout_s: float = 30.0) -> tuple[list[dict], dict]:
    """Every valid record in the range, time-ordered, and {"read", "invalid", "partitions"}.

    Invalid messages are skipped and counted, as the worker sends them to its dead-letter topic.
    Raises SourceError when the broker does not answer or the topic does not exist.
    """
    from kafka import KafkaConsumer, TopicPartition
    from kafka.errors import KafkaError

    try:
        consumer = KafkaConsumer(
            bootstrap_servers=rng.bootstrap,
            **rng.client,
            group_id=None,
            enable_auto_commit=False,
            allow_auto_create_topics=False,
            client_id="sparc-replay",
            request_timeout_ms=int(timeout_s * 1000),
        )
    except KafkaError as exc:
        raise SourceError(f"cannot reach Kafka at {rng.bootstrap}: {exc}") from None
    try:
        partitions = consumer.partitions_for_topic(rng.topic)
        if not partitions:
            raise SourceError(f"topic {rng.topic!r} not found on {rng.bootstrap}")
        tps = [TopicPartition(rng.topic, p) for p in sorted(partitions)]
        begin, end = consumer.beginning_offsets(tps), consumer.end_offsets(tps)
        start = {tp: begin[tp] for tp in tps}
        stop = {tp: end[tp] for tp in tps}
        for bound, when, offsets in ((start, rng.start_time, rng.start_offset), (stop, rng.stop_time, rng.stop_offset)):
            if when is not None:
                found = consumer.offsets_for_times({tp: int(when * 1000) for tp in tps})
                for tp in tps:  # None: no record at or after `when` in that partition
                    bound[tp] = found[tp].offset if found.get(tp) is not None else end[tp]
            if offsets is not None:
                for p, o in parse_offsets(offsets, partitions).items():
                    tp = TopicPartition(rng.topic, p)
                    bound[tp] = min(max(o, begin[tp]), end[tp])
        todo = {tp for tp in tps if start[tp] < stop[tp]}
        consumer.assign(tps)
        for tp in tps:
            consumer.seek(tp, start[tp])
        records, invalid, read = [], 0, 0
        now, idle_since = time.time(), time.monotonic()
        while todo:
            batches = consumer.poll(timeout_ms=KAFKA_POLL_MS)
            if not any(batches.values()):
                if time.monotonic() - idle_since > KAFKA_IDLE_S:
                    left = ", ".join(f"{tp.partition}: {consumer.position(tp)}/{stop[tp]}" for tp in sorted(todo))
                    raise SourceError(f"topic {rng.topic!r}: no records for {KAFKA_IDLE_S:.0f} s before the end "
                                      f"of the range (partition: offset/stop {left})")
                continue
            idle_since = time.monotonic()
            for tp, messages in batches.items():
                for m in messages:
                    if m.offset >= stop[tp]:
                        break
                    read += 1
                    try:
                        records.append(_parse_record(m.value or b"", now))
                    except SourceError:
                        invalid += 1
                if consumer.position(tp) >= stop[tp]:
                    todo.discard(tp)
                    consumer.pause(tp)
    except KafkaError as exc:
        raise SourceError(f"reading {rng.topic!r} from {rng.bootstrap}: {exc}") from None
    finally:
        consumer.close()
    return time_ordered(records), {"read": read, "invalid": invalid, "partitions": len(partitions)}


def kafka_source(rng: KafkaRange) -> EventSource:
    records, info = read_kafka(rng)
    return EventSource(
        name=f"kafka:{rng.topic}",
        records=lambda: iter(records),
        feedback=sum(map(is_feedback, records)),
        info=info,
    )


def parse_kafka_url(spec: str, client: Mapping[str, Any] | None = None) -> KafkaRange:
    """kafka://HOST:PORT/TOPIC?from=TS&to=TS&from_offset=N&to_offset=N -> KafkaRange (see its doc); `client`: the
    kafka-python security settings (streams.kafka_connection.KafkaConnection.kafka_python, less the servers)."""
    url = urlsplit(spec)
    topic = url.path.strip("/")
    if not url.netloc or not topic or "/" in topic:
        raise SourceError(f"{spec!r}: expected kafka://HOST:PORT/TOPIC[?from=TS&to=TS]")
    query = parse_qs(url.query, keep_blank_values=True)
    known = {"from", "to", "from_offset", "to_offset"}
    unknown = set(query) - known
    if unknown:
        raise SourceError(f"{spec!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                          f"expected {', '.join(sorted(known))}")

    def one(key: str) -> str | None:
        return query[key][-1] if key in query else None

    return KafkaRange(
        bootstrap=url.netloc,
        topic=topic,
        start_time=parse_time(one("from")) if one("from") is not None else None,
        stop_time=parse_time(one("to")) if one("to") is not None else None,
        start_offset=one("from_offset"),
        stop_offset=one("to_offset"),
        client=dict(client or {}),
    )


# ------------------------------------------------------------------ the --events argument
SYNTHETIC_KEYS = {"users": "n_users", "events": "n_events", "items": "n_initial_items", "new_items": "n_new_items",
                  "drifts": "n_drifts", "topics": "n_topics"}


def open_source(spec: str, kafka_client: Mapping[str, Any] | None = None) -> EventSource:
    """`synthetic[:SEED][?users=U&events=E&items=I&new_items=J&drifts=D&topics=T]`, `kafka://HOST:PORT/TOPIC?...`
    (read with the kafka-python security settings `kafka_client`), an S3-Rec folder or <Name>.txt, or a
    .jsonl/.json file."""
    if spec == "synthetic" or spec.startswith(("synthetic:", "synthetic?")):
        head, _, query = spec.partition("?")
        seed_text = head.partition(":")[2] or "0"
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        unknown = set(params) - set(SYNTHETIC_KEYS)
        if unknown:
            raise SourceError(f"{spec!r}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                              f"expected {', '.join(SYNTHETIC_KEYS)}")
        try:
            seed = int(seed_text)
            overrides = {SYNTHETIC_KEYS[k]: int(v) for k, v in params.items()}
        except ValueError:
            raise SourceError(f"{spec!r}: expected synthetic[:SEED][?users=N&events=N...] with integers") from None
        if "n_new_items" not in overrides and "n_initial_items" in overrides:
            overrides["n_new_items"] = overrides["n_initial_items"] // 5  # as `sparc produce --items`
        return synthetic_source(seed, **overrides)
    if spec.startswith("kafka://"):
        return kafka_source(parse_kafka_url(spec, kafka_client))
    p = Path(spec)
    if p.suffix in (".jsonl", ".json", ".ndjson"):
        return jsonl_source(p)
    if not p.exists():
        raise SourceError(f"{p}: no such file or folder (expected a .jsonl file, an S3-Rec folder, "
                          "synthetic[:SEED] or kafka://HOST:PORT/TOPIC)")
    return s3rec_source(p)
