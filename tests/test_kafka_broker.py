"""The project's real broker (deploy/kafka/broker.sh): produce with kafka-python, consume with aiokafka.

These check that the broker and the two client libraries the project pins agree on what Kafka 4 speaks:
topics with several partitions, keys, ordering per key, consumer groups and timestamp lookups.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from kafka import KafkaProducer

from sparc_stream.cli.main import main as sparc_main

pytestmark = pytest.mark.kafka

BROKER_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "broker.sh"

N_KEYS = 12
PER_KEY = 25
CONSUME_DEADLINE_S = 60  # a bound on how long a broken broker can hang the test, not a performance check


def _produce(bootstrap: str, topic: str, sends: list[dict]) -> list:
    """One kafka-python `send(topic, **kwargs)` per dict, in order; returns each record's metadata."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="sparc-tests-producer")
    try:
        futures = [producer.send(topic, **kwargs) for kwargs in sends]
        producer.flush()
        return [future.get(timeout=30) for future in futures]
    finally:
        producer.close()


async def _consume(bootstrap: str, topic: str, count: int, group_id: str) -> list:
    """Read `count` records from the start of `topic` with aiokafka, as a member of group `group_id`."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group_id,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    await consumer.start()
    received: list = []
    try:
        async with asyncio.timeout(CONSUME_DEADLINE_S):
            while len(received) < count:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    received.extend(records)
        await consumer.commit()
    finally:
        await consumer.stop()
    return received


def test_keyed_records_round_trip_across_partitions(kafka_bootstrap, kafka_topic):
    topic = kafka_topic(partitions=3)
    # Interleaved keys: key k's j-th value is b"k<k>:<j>", so order per key is visible in the values.
    sent = [(f"k{k}".encode(), f"k{k}:{j}".encode()) for j in range(PER_KEY) for k in range(N_KEYS)]

    metadata = _produce(kafka_bootstrap, topic, [{"key": key, "value": value} for key, value in sent])
    received = asyncio.run(_consume(kafka_bootstrap, topic, len(sent), group_id=f"{topic}-group"))

    assert len(received) == len(sent)
    assert sorted((r.key, r.value) for r in received) == sorted(sent)
    # The default partitioner hashes keys (murmur2): one key, one partition; 12 keys cover all 3 partitions.
    partitions_of_key = defaultdict(set)
    for (key, _), meta in zip(sent, metadata, strict=True):
        partitions_of_key[key].add(meta.partition)
    assert all(len(parts) == 1 for parts in partitions_of_key.values())
    assert {r.partition for r in received} == {0, 1, 2}
    # Each record arrives where the producer was told it was written, and per-key order holds.
    assert {(r.partition, r.offset) for r in received} == {(m.partition, m.offset) for m in metadata}
    values_of_key = defaultdict(list)
    for record in received:
        assert {record.partition} == partitions_of_key[record.key]
        values_of_key[record.key].append(record.value)
    for key, values in values_of_key.items():
        assert values == [f"{key.decode()}:{j}".encode() for j in range(PER_KEY)]


def test_offsets_for_times_finds_the_first_record_at_or_after_a_timestamp(kafka_bootstrap, kafka_topic):
    topic = kafka_topic(partitions=1)
    base_ms = (int(time.time()) - 3600) * 1000  # an hour ago: inside retention, not in the future
    # Record i is stamped base + i seconds (CreateTime, the topic default).
    sends = [
        {"value": f"v{i}".encode(), "partition": 0, "timestamp_ms": base_ms + 1000 * i} for i in range(10)
    ]
    metadata = _produce(kafka_bootstrap, topic, sends)
    assert [m.offset for m in metadata] == list(range(10))

    async def lookup(timestamps_ms: list[int]) -> list:
        consumer = AIOKafkaConsumer(bootstrap_servers=kafka_bootstrap)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            return [(await consumer.offsets_for_times({tp: ts}))[tp] for ts in timestamps_ms]
        finally:
            await consumer.stop()

    exact, between, before, after = asyncio.run(
        lookup([base_ms + 5000, base_ms + 5500, base_ms - 1, base_ms + 10_000])
    )
    assert (exact.offset, exact.timestamp) == (5, base_ms + 5000)
    assert (between.offset, between.timestamp) == (6, base_ms + 6000)
    assert (before.offset, before.timestamp) == (0, base_ms)
    assert after is None


def _script_address() -> str:
    return subprocess.run(
        ["bash", str(BROKER_SH), "address"], capture_output=True, text=True, check=True
    ).stdout.strip()


def test_broker_status_answers_while_running(kafka_bootstrap, capfd):
    if kafka_bootstrap != _script_address():
        pytest.skip(f"the broker at {kafka_bootstrap} was not started by {BROKER_SH}")

    status = subprocess.run(["bash", str(BROKER_SH), "status"], capture_output=True, text=True, check=False)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip().splitlines()[-1] == kafka_bootstrap

    # The same through the CLI, in-process: `sparc kafka status` passes the script's output and exit code on.
    capfd.readouterr()
    assert sparc_main(["kafka", "status"]) == 0
    assert capfd.readouterr().out.strip().splitlines()[-1] == kafka_bootstrap


def test_broker_status_fails_where_no_broker_runs(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "SPARC_KAFKA_DIR": str(tmp_path / "kafka-run")}
    status = subprocess.run(
        ["bash", str(BROKER_SH), "status"], capture_output=True, text=True, check=False, env=env
    )
    assert status.returncode != 0
    assert status.stdout == ""
    assert "not running" in status.stderr
