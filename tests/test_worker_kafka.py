"""End to end against a real broker: `sparc worker` in a subprocess, `sparc produce` feeding it.

Checks: invalid events land in the DLQ unchanged with their reasons; re-produced events are de-duplicated;
at least two snapshots are announced on codebook-updates with increasing versions; /retrieve answers with the
version that served it; /snapshots/latest, /health and /metrics answer; SIGTERM stops the worker cleanly.
Every wait is bounded and fails with what it was waiting for. Topics and the consumer group are unique to the
test run. No timing is asserted.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer

from cli.main import main as sparc
from codebook_store import CodebookUpdate, Reassembler, open_store

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[1]


def event(**fields) -> bytes:
    base = {"event_id": "x", "user_id": 1, "item_id": 2, "timestamp": 1_700_000_000, "event_type": "view"}
    return json.dumps({k: v for k, v in {**base, **fields}.items() if v is not None}).encode()


INVALID = {  # raw value -> the reason the worker must give
    b"{this is not json": "bad_json",
    event(event_id="x1", event_type=None): "missing_field",
    event(event_id="x2", timestamp=5): "bad_timestamp",
    event(event_id="x3", event_type="v" * 20_000): "oversized",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, worker: subprocess.Popen, log: Path) -> Any:
    """Call `probe` until it returns something truthy; fail naming `what`, with the worker's log, when the time
    is up or the worker has exited."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline and worker.poll() is None:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    why = f"the worker exited with {worker.returncode}" if worker.poll() is not None else f"{timeout_s}s passed"
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
    pytest.fail(f"{why} while waiting for {what} (last: {last!r}); worker log:\n{tail}")


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def get_json(port: int, path: str) -> tuple[int, Any]:
    status, body = get(port, path)
    return status, json.loads(body) if status else None


class Reader:
    """Collects every record of a topic from the beginning (no consumer group)."""

    def __init__(self, bootstrap: str, topic: str):
        self.consumer = KafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
            group_id=None,
        )
        self.records: list = []

    def poll(self) -> list:
        for batch in self.consumer.poll(timeout_ms=500).values():
            self.records.extend(batch)
        return self.records

    def close(self) -> None:
        self.consumer.close()


def announced(records) -> list[CodebookUpdate]:
    """The verified codebook updates that codebook-updates records reassemble to, in the order completed."""
    r = Reassembler()
    return [u for rec in records if (u := r.accept(rec.key, rec.value, rec.headers)) is not None]


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def test_worker_end_to_end(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    topics = {name: f"e2e-{name.lower()}-{run}" for name in ("FEEDBACK", "ITEM", "UPDATES", "DLQ")}
    env = {**os.environ, **{f"SPARC_{name}_TOPIC": topic for name, topic in topics.items()},
           "SPARC_CODES": "16", "SPARC_DIM": "32", "SPARC_LAYERS": "1", "SPARC_MAX_LEN": "20"}
    port, log = free_port(), tmp_path / "worker.log"
    flags = (f"--broker {kafka_bootstrap} --store file://{tmp_path}/store --web-port {port} "
             f"--data-dir {tmp_path}/faust --batch-size 32 --app-id e2e-{run} --partitions 2 "
             "--snapshot-every-steps 20 --snapshot-every-seconds 3")
    with log.open("wb") as out:
        command = [sys.executable, "-m", "cli.main", "worker", *flags.split()]
        worker = subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    dlq = updates = None
    try:
        wait_for("the worker's web server", lambda: get(port, "/health")[0] == 200, 180, worker, log)
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
        wait_for(f"{len(INVALID)} dead letters", lambda: len(dlq.poll()) >= len(INVALID), 120, worker, log)
        got = {r.value: dict(r.headers) for r in dlq.records}
        assert set(got) == set(INVALID)
        for raw, reason in INVALID.items():
            assert got[raw]["reason"].decode() == reason
            assert got[raw]["source-topic"].decode() == topics["FEEDBACK"] and got[raw]["detail"]

        # snapshots: at least two announced, versions increasing, each remap relative to the one before
        wait_for("two codebook updates", lambda: len(announced(updates.poll())) >= 2, 180, worker, log)
        messages = announced(updates.records)
        versions = [m.version for m in messages]
        assert versions == sorted(set(versions))
        for m in messages:
            assert m.health["gate"]["passed"]
        assert messages[1].remap_from == versions[0]

        # serving: /retrieve names the snapshot version that served it, one that was announced
        answered = lambda: (r := get_json(port, "/retrieve/17?k=10"))[0] == 200 and r  # noqa: E731
        body = wait_for("a /retrieve answer", answered, 120, worker, log)[1]
        assert len(body["items"]) == 10 and body["history_length"] > 0
        wait_for(f"v{body['version']} on codebook-updates",
                 lambda: body["version"] in {u.version for u in announced(updates.poll())}, 60, worker, log)
        status, latest = get_json(port, "/snapshots/latest")
        assert status == 200 and latest["version"] >= body["version"] and latest["served"] >= body["version"]
        status, bad = get_json(port, "/retrieve/17?k=-3")
        assert status == 400 and "k must be" in bad["error"]

        # re-delivery: the same events again are de-duplicated by event id
        assert sparc([*produce, "--limit", "200", "--no-items"]) == 0
        duplicates = lambda: metric(get(port, "/metrics")[1].decode(), "sparc_duplicate_events_total")  # noqa: E731
        wait_for("200 duplicates counted", lambda: duplicates() >= 200, 120, worker, log)
        text = get(port, "/metrics")[1].decode()
        assert metric(text, "sparc_dlq_messages_total") == len(INVALID)
        assert metric(text, "sparc_events_total") == 3000
        assert metric(text, "sparc_snapshot_version") >= versions[1]
        status, health = get_json(port, "/health")
        assert status == 200 and health["status"] == "ok"
    finally:
        for reader in (dlq, updates):
            if reader is not None:
                reader.close()
        worker.send_signal(signal.SIGTERM)
        try:
            code = worker.wait(timeout=90)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
            code = "killed after 90 s"
        with KafkaAdminClient(bootstrap_servers=kafka_bootstrap) as admin:  # this run's topics, internal too
            admin.delete_topics([t for t in admin.list_topics() if run in t], raise_errors=False)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
    assert code == 0, f"worker exit status {code}; log tail:\n{tail}"
    with open_store(f"file://{tmp_path}/store", read_only=True) as store:  # what was announced is stored
        assert set(versions) <= set(store.versions()) and store.latest_version() >= versions[-1]
