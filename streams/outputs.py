"""Where the agents' results go: the dead-letter topic, the train topic and codebook-updates.

Agents talk to an `Outputs` object, not to topics, so unit tests (which run without a broker) can record what
would have been sent; `KafkaOutputs` is the worker's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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

    async def train(self, message: bytes) -> None:
        """Send one train-topic message (an encoded streams.batching.TrainBatch) to the trainer."""

    async def announce(self, version: int, records: Sequence[Record]) -> None:
        """Publish the codebook-updates records of a snapshot that became latest, in order."""


class KafkaOutputs:
    def __init__(self, dlq, train, updates):
        self._dlq, self._train, self._updates = dlq, train, updates

    async def dead_letter(self, raw: bytes, key: bytes | None, invalid: Invalid, source: Source) -> None:
        await self._dlq.send(key=key, value=raw, headers=dlq_headers(invalid, source))

    async def train(self, message: bytes) -> None:
        await self._train.send(key=None, value=message)

    async def announce(self, version: int, records: Sequence[Record]) -> None:
        for key, value, headers in records:  # one producer, awaited in turn: the chunks stay in order
            await self._updates.send(key=key, value=value, headers=headers)
