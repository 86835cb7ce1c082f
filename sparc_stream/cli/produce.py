"""`sparc produce`: write a dataset's interactions (or the synthetic stream) into Kafka as JSON events.

Feedback events go to the feedback topic keyed by user, item events (the catalogue: every item with its
attributes, before its first interaction) to the item topic keyed by item. Feedback is in time order across
users. A dataset without <Name>_timestamps.txt is interleaved by position (every user's first item, then every
second one, ...) and stamped with the time of production. Event ids are stable ("<name>-<user>-<position>",
"syn-<seed>-<index>"), so producing the same data twice is de-duplicated by the worker.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sparc_stream.cli.errors import UserError
from sparc_stream.cli.worker import add_config_argument, build_settings


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "produce",
        help="write a dataset's interactions or the synthetic stream into Kafka as JSON events",
        description="Produce feedback events (keyed by user, in time order) and item events (the catalogue) "
        "into Kafka, rate-limited, with a progress bar.",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="S3-Rec dataset folder or its <Name>.txt")
    source.add_argument("--synthetic", action="store_true", help="the project's seeded synthetic stream")
    p.add_argument(
        "--rate",
        type=float,
        default=1000.0,
        help="messages per second, 0 = as fast as possible (default 1000)",
    )
    p.add_argument("--limit", type=int, default=None, help="stop after N feedback events")
    add_config_argument(p)
    p.add_argument("--broker", help="Kafka bootstrap servers (default: SPARC_BROKER, the --config file's, or "
                   "127.0.0.1:39092); security settings come from the config file or SPARC_* variables")
    p.add_argument("--topic", help="feedback topic (default: SPARC_FEEDBACK_TOPIC or feedback-events)")
    p.add_argument("--item-topic", help="item topic (default: SPARC_ITEM_TOPIC or item-events)")
    p.add_argument(
        "--partitions",
        type=int,
        help="partitions of topics this creates (default: SPARC_PARTITIONS "
        "or 4); existing topics are used as they are",
    )
    p.add_argument("--no-items", action="store_true", help="do not produce item events")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream")
    p.add_argument("--users", type=int, default=2000, help="synthetic users")
    p.add_argument("--events", type=int, default=60_000, help="synthetic feedback events")
    p.add_argument(
        "--items",
        type=int,
        default=3000,
        help="synthetic initial catalogue; a fifth as many items appear mid-stream (default 3000)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# --- event streams: ("feedback" | "item", key, value) in production order
def dataset_events(ds, now: float | None = None) -> Iterator[tuple[str, str, dict]]:
    """A SequenceDataset as events: the catalogue first, then feedback in time order across users."""
    users = np.concatenate(
        [np.full(len(s), u, dtype=np.int64) for u, s in zip(ds.user_ids, ds.sequences, strict=True)]
    )
    positions = np.concatenate([np.arange(len(s), dtype=np.int64) for s in ds.sequences])
    items = np.concatenate(ds.sequences)
    if ds.timestamps is not None:
        stamps = np.concatenate(ds.timestamps)
        order = np.lexsort((positions, users, stamps))  # time, then user, then position
    else:
        stamps = np.full(len(items), int(now if now is not None else time.time()), dtype=np.int64)
        order = np.lexsort((users, positions))  # round-robin over users by position
    first = int(stamps.min())
    for item in range(1, ds.num_items + 1):
        yield (
            "item",
            str(item),
            {"item_id": item, "attributes": list(ds.item_attributes.get(item, [])), "timestamp": first},
        )
    for i in order.tolist():
        user, pos = int(users[i]), int(positions[i])
        yield (
            "feedback",
            str(user),
            {
                "event_id": f"{ds.name}-{user}-{pos}",
                "user_id": user,
                "item_id": int(items[i]),
                "timestamp": int(stamps[i]),
                "event_type": "view",
            },
        )


def synthetic_events(stream) -> Iterator[tuple[str, str, dict]]:
    for event in stream.iter_events():
        if "event_id" in event:
            yield "feedback", str(event["user_id"]), event
        else:
            yield "item", str(event["item_id"]), event


class Pacer:
    """Sleeps so that no more than `rate` messages per second leave (rate 0: never sleeps)."""

    def __init__(self, rate: float, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.clock, self.sleep = rate, clock, sleep
        self.start = clock()

    def wait(self, sent: int) -> None:
        if self.rate > 0:
            ahead = self.start + sent / self.rate - self.clock()
            if ahead > 0:
                self.sleep(ahead)


def run(args: argparse.Namespace) -> int:
    from kafka import KafkaProducer
    from kafka.errors import KafkaError
    from tqdm.auto import tqdm

    from streams.kafka_connection import KafkaConfigError
    from streams.topics import TopicError, ensure_topics

    if args.rate < 0:
        raise UserError("--rate must be >= 0")
    if args.limit is not None and args.limit < 1:
        raise UserError("--limit must be >= 1")
    settings = build_settings(
        args.config, broker=args.broker, feedback_topic=args.topic, item_topic=args.item_topic,
        partitions=args.partitions,
    )
    topics = {"feedback": settings.feedback_topic, "item": settings.item_topic}
    events, total = _source(args)
    try:
        ensure_topics(settings, names=list(topics.values()), check=False)
        producer = KafkaProducer(**settings.kafka_connection().kafka_python(), linger_ms=20, acks=1)
    except (TopicError, KafkaConfigError) as exc:
        raise UserError(str(exc)) from None
    except KafkaError as exc:
        raise UserError(f"cannot reach Kafka at {settings.kafka_connection().describe()}: {exc}") from None
    pacer, sent, feedback = Pacer(args.rate), 0, 0
    bar = tqdm(total=total, desc="produce", unit="event", disable=args.quiet)
    try:
        for kind, key, value in events:
            if kind == "item" and args.no_items:
                continue
            if kind == "feedback" and args.limit is not None and feedback >= args.limit:
                break
            producer.send(topics[kind], key=key.encode(), value=json.dumps(value).encode())
            sent += 1
            if kind == "feedback":
                feedback += 1
                bar.update(1)
            pacer.wait(sent)
        producer.flush()
    finally:
        bar.close()
        producer.close()
    print(
        f"produced {feedback} feedback events to {topics['feedback']} and {sent - feedback} item events "
        f"to {topics['item']} on {settings.broker}"
    )
    return 0


def _source(args: argparse.Namespace) -> tuple[Iterator[tuple[str, str, dict]], int]:
    if args.synthetic:
        from replay.synthetic import SyntheticConfig, generate

        try:
            cfg = SyntheticConfig(
                n_users=args.users,
                n_events=args.events,
                n_initial_items=args.items,
                n_new_items=args.items // 5,
                seed=args.seed,
            )
        except ValueError as exc:
            raise UserError(str(exc)) from None
        total = cfg.n_events
        return synthetic_events(generate(cfg)), min(total, args.limit or total)
    from replay.datasets import DataError, load_s3rec

    try:
        ds = load_s3rec(args.data)
    except DataError as exc:
        raise UserError(str(exc)) from None
    total = ds.num_interactions
    return dataset_events(ds), min(total, args.limit or total)
