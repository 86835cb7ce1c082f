"""End to end against a real broker: `sparc worker` in a subprocess, `sparc produce` feeding it.

Checks: invalid events land in the DLQ unchanged with their reasons; re-produced events are de-duplicated;
at least two snapshots are announced on codebook-updates with increasing versions; /retrieve answers with the
version that served it; /snapshots/latest, /health and /metrics answer; SIGTERM stops the worker cleanly.
Operability: the web server listens on web_host only; /readyz is 503 before the first snapshot and 200 after;
/metrics has the latency histograms and the consumer lag of every partition; an over-long URL is answered 400
and logged as one INFO line, never an ERROR with a traceback.
Every wait is bounded and fails with what it was waiting for. Topics and the consumer group are unique to the
test run. No timing is asserted.
"""

from __future__ import annotations

import socket
import uuid

import pytest
from kafka import KafkaProducer
from worker_harness import (
    TINY_MODEL,
    Reader,
    WorkerProcess,
    announced,
    delete_topics_of,
    event,
    get,
    get_json,
    log_tail,
    metric,
)

from codebook_store import open_store
from sparc_stream.cli.main import main as sparc

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

INVALID = {  # raw value -> the reason the worker must give
    b"{this is not json": "bad_json",
    event(event_id="x1", event_type=None): "missing_field",
    event(event_id="x2", timestamp=5): "bad_timestamp",
    event(event_id="x3", event_type="v" * 20_000): "oversized",
}


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on `port` (Linux's /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.rpartition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    raw = bytes.fromhex(address)
                    if len(raw) == 4:
                        found.add(socket.inet_ntop(socket.AF_INET, raw[::-1]))
                    else:
                        words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                        found.add(socket.inet_ntop(socket.AF_INET6, words))
    return found


def test_worker_end_to_end(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    topics = {name: f"e2e-{name.lower()}-{run}" for name in ("FEEDBACK", "ITEM", "UPDATES", "DLQ")}
    env = {**{f"SPARC_{name}_TOPIC": topic for name, topic in topics.items()}, **TINY_MODEL}
    flags = (f"--broker {kafka_bootstrap} --store file://{tmp_path}/store "
             f"--data-dir {tmp_path}/faust --batch-size 32 --app-id e2e-{run} --partitions 2 "
             "--snapshot-every-steps 20 --snapshot-every-seconds 3")
    w = WorkerProcess(tmp_path, flags.split(), env)
    port = w.port
    dlq = updates = None
    try:
        w.start()
        assert listening_addresses(port) == {"127.0.0.1"}  # web_host's default, not 0.0.0.0
        assert get(port, "/readyz")[0] == 503  # no snapshot yet
        dlq, updates = Reader(kafka_bootstrap, topics["DLQ"]), Reader(kafka_bootstrap, topics["UPDATES"])

        feedback, items = topics["FEEDBACK"], topics["ITEM"]
        produce = (f"produce --synthetic --users 200 --events 3000 --items 300 --rate 0 --quiet "
                   f"--broker {kafka_bootstrap} --topic {feedback} --item-topic {items}").split()
        assert sparc(produce) == 0
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for raw in INVALID:
            producer.send(topics["FEEDBACK"], key=b"1", value=raw)
        producer.flush()
        producer.close()

        # invalid events: in the DLQ, byte for byte, with their reasons
        w.wait_for(f"{len(INVALID)} dead letters", lambda: len(dlq.poll()) >= len(INVALID), 120)
        got = {r.value: dict(r.headers) for r in dlq.records}
        assert set(got) == set(INVALID)
        for raw, reason in INVALID.items():
            assert got[raw]["reason"].decode() == reason
            assert got[raw]["source-topic"].decode() == topics["FEEDBACK"] and got[raw]["detail"]

        # snapshots: at least two announced, versions increasing, each remap relative to the one before
        w.wait_for("two codebook updates", lambda: len(announced(updates.poll())) >= 2, 180)
        messages = announced(updates.records)
        versions = [m.version for m in messages]
        assert versions == sorted(set(versions))
        for m in messages:
            assert m.health["gate"]["passed"]
        assert messages[1].remap_from == versions[0]

        # serving: /retrieve names the snapshot version that served it, one that was announced
        answered = lambda: (r := get_json(port, "/retrieve/17?k=10"))[0] == 200 and r  # noqa: E731
        body = w.wait_for("a /retrieve answer", answered, 120)[1]
        assert len(body["items"]) == 10 and body["history_length"] > 0
        w.wait_for(f"v{body['version']} on codebook-updates",
                   lambda: body["version"] in {u.version for u in announced(updates.poll())}, 60)
        status, latest = get_json(port, "/snapshots/latest")
        assert status == 200 and latest["version"] >= body["version"] and latest["served"] >= body["version"]
        status, bad = get_json(port, "/retrieve/17?k=-3")
        assert status == 400 and "k must be" in bad["error"]
        assert get(port, "/retrieve/" + "x" * 20_000)[0] == 400  # a client's over-long URL
        status, ready = get_json(port, "/readyz")
        assert status == 200 and ready["ready"] and ready["served_version"] >= versions[0]

        # re-delivery: the same events again are de-duplicated by event id
        assert sparc([*produce, "--limit", "200", "--no-items"]) == 0
        w.wait_for("200 duplicates counted", lambda: w.metric("sparc_duplicate_events_total") >= 200, 120)
        text = get(port, "/metrics")[1].decode()
        assert metric(text, "sparc_dlq_messages_total") == len(INVALID)
        assert metric(text, "sparc_events_total") == 3000
        assert metric(text, "sparc_snapshot_version") >= versions[1]
        for status in (200, 400):
            assert f'sparc_retrieve_seconds_count{{status="{status}"}}' in text
        assert metric(text, "sparc_train_step_seconds_count") >= 2 and metric(text, "sparc_publish_seconds_count") >= 2
        lag = {line.split("{")[1].split("}")[0] for line in text.splitlines() if line.startswith("sparc_consumer_lag{")}
        assert {f'partition="{p}",topic="{topics["FEEDBACK"]}"' for p in (0, 1)} <= lag
        assert "sparc_build_info{" in text and "process_resident_memory_bytes" in text
        status, health = get_json(port, "/health")
        assert status == 200 and health["status"] == "ok"
    finally:
        for reader in (dlq, updates):
            if reader is not None:
                reader.close()
        code = w.terminate(90) if w.process is not None else "never started"
        delete_topics_of(kafka_bootstrap, run)  # this run's topics, internal too
    assert code == 0, f"worker exit status {code}; log tail:\n{log_tail(w.log, 30)}"
    log = w.log.read_text()
    assert "Traceback" not in log, log_tail(w.log, 60)
    [bad_request] = [line for line in log.splitlines() if "Error handling request" in line]
    assert "[INFO]" in bad_request and "(answered 400): Got more than" in bad_request  # the over-long URL
    with open_store(f"file://{tmp_path}/store", read_only=True) as store:  # what was announced is stored
        assert set(versions) <= set(store.versions()) and store.latest_version() >= versions[-1]
