"""Helpers for the end-to-end worker tests against a real broker (test_worker_kafka.py, test_worker_restart.py,
test_worker_equivalence.py): `sparc worker` in a subprocess, bounded waits that fail naming what they waited for,
HTTP probes, topic readers, and the reader of the worker's processed log. No timing is asserted anywhere.
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
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient, KafkaConsumer

from codebook_store import CodebookUpdate, Reassembler
from streams.processed_log import learnt_event_ids, read_processed_log, train_positions  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"SPARC_CODES": "16", "SPARC_DIM": "32", "SPARC_LAYERS": "1", "SPARC_MAX_LEN": "20"}


def event(**fields) -> bytes:
    base = {"event_id": "x", "user_id": 1, "item_id": 2, "timestamp": 1_700_000_000, "event_type": "view"}
    return json.dumps({k: v for k, v in {**base, **fields}.items() if v is not None}).encode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


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
    pytest.fail(f"{why} while waiting for {what} (last: {last!r}); worker log:\n{log_tail(log)}")


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

    def drain(self, timeout_s: float = 60) -> list:
        """Poll until every record up to the topic's end offsets (as of this call) is read; fail after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment() and time.monotonic() < deadline:
            self.poll()
        parts = list(self.consumer.assignment())
        end = self.consumer.end_offsets(parts)
        while any(self.consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                pytest.fail(f"could not read {self.consumer.subscription()} to its end in {timeout_s} s")
            self.poll()
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


def delete_topics_of(bootstrap: str, run: str) -> None:
    """Delete every topic whose name holds `run` (the test's own and the worker's internal ones)."""
    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        admin.delete_topics([t for t in admin.list_topics() if run in t], raise_errors=False)


class WorkerProcess:
    """`sparc worker` (or another role's command) in a subprocess; every start writes its own log (worker-1.log,
    worker-2.log, ...; `name` replaces "worker").

    flags: the command-line flags (a --web-port is added); env: SPARC_* settings on top of the environment."""

    def __init__(self, tmp_path: Path, flags: Iterable[str], env: dict[str, str], command: str = "worker",
                 name: str | None = None):
        self.tmp_path, self.flags, self.env = tmp_path, list(flags), {**os.environ, **env}
        self.command, self.name = command, name or command
        self.port = free_port()
        self.starts = 0
        self.process: subprocess.Popen | None = None
        self.log = tmp_path / f"{self.name}-0.log"

    def start(self, ready_timeout_s: float = 180, wait: bool = True) -> WorkerProcess:
        """Start the process and (wait) wait until its web server answers /livez."""
        self.starts += 1
        self.log = self.tmp_path / f"{self.name}-{self.starts}.log"
        command = [sys.executable, "-m", "sparc_stream.cli.main", self.command, *self.flags, "--web-port",
                   str(self.port)]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        if wait:
            self.wait_until_live(ready_timeout_s)
        return self

    def wait_until_live(self, timeout_s: float = 180) -> None:
        self.wait_for(f"{self.name}'s web server", lambda: get(self.port, "/livez")[0] == 200, timeout_s)

    def wait_for(self, what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
        assert self.process is not None
        return wait_for(what, probe, timeout_s, self.process, self.log)

    def wait_for_exit(self, timeout_s: float = 90) -> int:
        """The exit status once the process has ended by itself; fail (with its log) if it is still running."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{self.name} still runs after {timeout_s} s; its log:\n{log_tail(self.log)}")

    def metric(self, name: str) -> float:
        return metric(get(self.port, "/metrics")[1].decode(), name)

    def terminate(self, timeout_s: float = 90) -> int | str:
        """SIGTERM, then wait for the exit status ("killed after N s" if it did not stop)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            return f"killed after {timeout_s} s"

    def kill(self) -> int:
        """SIGKILL (a crash: nothing is flushed, committed or closed) and reap it."""
        assert self.process is not None
        self.process.kill()
        return self.process.wait()

    def stop_quietly(self) -> None:
        """For `finally` blocks: make sure the process is gone."""
        if self.process is not None and self.process.poll() is None:
            self.terminate(30)
