"""Where the roles' results go: the dead-letter topic, the train topic, the repartition topic and
codebook-updates.

Ingest (Faust, async) talks to an `Outputs` object and the learner (a thread, sync) to a `LearnOutputs` object,
not to topics, so unit tests (which run without a broker) can record what would have been sent;
`KafkaOutputs` (Faust topics) and `KafkaLearnOutputs` (a kafka-python producer) are the real ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from streams.records import Invalid, Source

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # (key, value, headers), as codebook_store.messages makes


def dlq_headers(invalid: Invalid, source: Source) -> list[tuple[str, bytes]]:
    """Headers of a dead letter: why it was rejected and where it was read."""
    return [
        ("reason", invalid.reason.encode()),
        ("detail", invalid.detail.encode()),
        ("source-topic", source.topic.encode()),
        ("source-partition", str(source.partition).encode()),
        ("source-offset", str(source.offset).encode()),
    ]


class Outputs(Protocol):
    async def dead_letter(self, raw: bytes, key: bytes | None, invalid: Invalid, source: Source) -> None:
        """Send the original bytes, unchanged, with the reason in headers."""

    async def train(self, message: bytes, partition: int) -> None:
        """Send one train-topic message (an encoded streams.batching.TrainBatch) to a train partition."""

    async def repartition(self, raw: bytes, key: bytes, partition: int) -> None:
        """Send a feedback record, unchanged, keyed by its user, to its home partition of the repartition topic."""


class LearnOutputs(Protocol):
    def dead_letter(self, raw: bytes, key: bytes | None, invalid: Invalid, source: Source) -> None:
        """Send the original bytes, unchanged, with the reason in headers."""

    def announce(self, version: int, records: Sequence[Record]) -> None:
        """Publish the codebook-updates records of a snapshot that became latest, in order, and wait until
        Kafka has them."""


class KafkaOutputs:
    def __init__(self, dlq, train, repartition):
        self._dlq, self._train, self._repartition = dlq, train, repartition

    async def dead_letter(self, raw: bytes, key: bytes | None, invalid: Invalid, source: Source) -> None:
        await self._dlq.send(key=key, value=raw, headers=dlq_headers(invalid, source))

    async def train(self, message: bytes, partition: int) -> None:
        await self._train.send(key=None, value=message, partition=partition)

    async def repartition(self, raw: bytes, key: bytes, partition: int) -> None:
        await self._repartition.send(key=key, value=raw, partition=partition)


class KafkaLearnOutputs:
    """The learner's producer (kafka-python: thread-safe, used from the learner and publisher threads)."""

    def __init__(self, producer: Any, dlq_topic: str, updates_topic: str):
        self._producer, self._dlq, self._updates = producer, dlq_topic, updates_topic

    def dead_letter(self, raw: bytes, key: bytes | None, invalid: Invalid, source: Source) -> None:
        self._producer.send(self._dlq, key=key, value=raw, headers=dlq_headers(invalid, source))

    def announce(self, version: int, records: Sequence[Record]) -> None:
        futures = [self._producer.send(self._updates, key=key, value=value, headers=list(headers))
                   for key, value, headers in records]  # one producer, one partition: the chunks stay in order
        self._producer.flush()
        for future in futures:
            future.get(timeout=60)  # raises if Kafka refused a chunk

    def close(self) -> None:
        self._producer.close()
