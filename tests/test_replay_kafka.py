"""A Kafka time range as a replay source, against the real broker (kafka_bootstrap / kafka_topic fixtures)."""

from __future__ import annotations

import json
import time

import pytest
import torch
from kafka import KafkaProducer

from replay.sources import KafkaRange, SourceError, is_feedback, open_source, read_kafka
from sparc_stream.cli.main import main

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return list(open_source("synthetic:5?users=20&events=240&items=40&topics=4").records())


@pytest.fixture
def logged(kafka_bootstrap, kafka_topic, records):
    """The records in a 2-partition topic, one second of Kafka record time apart (in the past: brokers refuse
    timestamps far ahead), keyed as the worker's producer keys them, plus one unreadable message at i = 100."""
    topic = kafka_topic(partitions=2)
    base_ms = (int(time.time()) - 86_400) * 1000
    producer = KafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    try:
        for i, r in enumerate(records):
            key = str(r["user_id"] if is_feedback(r) else r["item_id"]).encode()
            producer.send(topic, key=key, value=json.dumps(r).encode(), timestamp_ms=base_ms + i * 1000)
            if i == 100:
                producer.send(topic, key=b"x", value=b"{not json", timestamp_ms=base_ms + i * 1000)
        producer.flush()
    finally:
        producer.close()
    return topic, base_ms // 1000


def _key(r: dict) -> tuple:
    return (r.get("event_id", ""), r["item_id"], r["timestamp"])


def test_a_time_range_reads_exactly_its_records_in_time_order(kafka_bootstrap, logged, records):
    topic, base = logged
    got, info = read_kafka(KafkaRange(kafka_bootstrap, topic, start_time=base + 50, stop_time=base + 150))
    want = records[50:150]
    assert sorted(map(_key, got)) == sorted(map(_key, want))
    assert info == {"read": 101, "invalid": 1, "partitions": 2}
    stamps = [(r["timestamp"], is_feedback(r)) for r in got]
    assert stamps == sorted(stamps)
    assert all(isinstance(r["user_id"], str) for r in got if is_feedback(r))


def test_offsets_bound_each_partition(kafka_bootstrap, logged, records):
    topic, _ = logged
    everything, info = read_kafka(KafkaRange(kafka_bootstrap, topic))
    assert sorted(map(_key, everything)) == sorted(map(_key, records)) and info["invalid"] == 1
    some, info = read_kafka(KafkaRange(kafka_bootstrap, topic, start_offset="10", stop_offset="0:30,1:25"))
    assert info["read"] == 20 + 15


def test_replay_cli_on_a_kafka_range_and_a_missing_topic(kafka_bootstrap, logged, records, tmp_path, capsys):
    topic, base = logged
    before = torch.get_num_threads()
    try:
        rc = main(["replay", "--events", f"kafka://{kafka_bootstrap}/{topic}?from={base + 20}&to={base + 400}",
                   "--report", str(tmp_path / "rep"), "--variants", "evolving,frozen", "--codes", "8", "--dim", "16",
                   "--max-len", "10", "--layers", "1", "--batch-size", "16", "--quiet"])
        assert rc == 0, capsys.readouterr().err
        report = json.loads((tmp_path / "rep" / "report.json").read_text())
        assert report["source"] == f"kafka:{topic}"
        assert report["source_info"]["invalid"] == 1
        assert report["events"] == sum(map(is_feedback, records[20:]))
        capsys.readouterr()
        rc = main(["replay", "--events", f"kafka://{kafka_bootstrap}/{topic}-absent", "--report",
                   str(tmp_path / "rep2"), "--quiet"])
        assert rc == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "not found" in err and f"{topic}-absent" in err
        with pytest.raises(SourceError, match="not found"):
            read_kafka(KafkaRange(kafka_bootstrap, f"{topic}-absent"))
    finally:
        torch.set_num_threads(before)
