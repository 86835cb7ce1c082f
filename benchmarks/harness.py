"""What the Kafka tests and the benchmarks that drive `sparc worker` share: the worker in a subprocess, bounded
waits that fail naming what they waited for, HTTP probes, topic readers, a paced producer that records what Kafka
acknowledged, a private broker (deploy/kafka/broker.sh with ports and a state dir of its own), and the reader of
the worker's processed log. No timing is asserted anywhere.

Load: the project's synthetic stream (replay.synthetic) as Kafka messages (`synthetic`, `catalogue_messages`,
`feedback_events`, `send_all`).

tests/worker_harness.py re-exports these for the tests (test_worker_kafka.py, test_worker_restart.py, ...);
benchmarks/fault_suite.py and benchmarks/outage_bench.py import them from here.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from streams.processed_log import learnt_event_ids, read_processed_log, train_positions  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]
BROKER_SH = ROOT / "deploy" / "kafka" / "broker.sh"
TINY_MODEL = {"SPARC_CODES": "16", "SPARC_DIM": "32", "SPARC_LAYERS": "1", "SPARC_MAX_LEN": "20"}

Message = tuple[str, bytes | None, bytes]  # (an id of the caller's, the Kafka key, the value)


class WaitTimeout(AssertionError):
    """A bounded wait ran out (or the process it watched exited); the message names what it waited for."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, process: subprocess.Popen, log: Path) -> Any:
    """Call `probe` until it returns something truthy; raise WaitTimeout naming `what`, with the process's log,
    when the time is up or the process has exited."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline and process.poll() is None:
        last = probe()
        if last:
            return last
        time.sleep(0.5)
    why = f"the worker exited with {process.returncode}" if process.poll() is not None else f"{timeout_s:.0f}s passed"
    raise WaitTimeout(f"{why} while waiting for {what} (last: {last!r}); worker log:\n{log_tail(log)}")


def poll_until(probe: Callable[[], Any], timeout_s: float, alive: Callable[[], bool],
               every: float = 0.25) -> float | None:
    """The time (unix s) `probe` first returned something truthy; None when the time ran out or `alive` stopped
    holding. (wait_for's non-raising sibling, for benchmarks that report when something happened.)"""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and alive():
        if probe():
            return time.time()
        time.sleep(every)
    return None


def get(port: int, path: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path: (status, body); (0, b"") when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def get_json(port: int, path: str) -> tuple[int, Any]:
    status, body = get(port, path)
    return status, json.loads(body) if status else None


def metric(text: str, name: str) -> float:
    """Sum of a metric's samples (all label sets) in Prometheus text."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and line[len(name)] in " {"
    )


def rss_mb(pid: int) -> float | None:
    """A process's resident set (VmRSS) in MB; None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Reader:
    """Collects every record of a topic from the beginning (no consumer group)."""

    def __init__(self, bootstrap: str, topic: str):
        from kafka import KafkaConsumer

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
        """Poll until every record up to the topic's end offsets (as of this call) is read; raise WaitTimeout
        after timeout_s."""
        deadline = time.monotonic() + timeout_s
        while not self.consumer.assignment() and time.monotonic() < deadline:
            self.poll()
        parts = list(self.consumer.assignment())
        end = self.consumer.end_offsets(parts)
        while any(self.consumer.position(tp) < end[tp] for tp in parts):
            if time.monotonic() > deadline:
                raise WaitTimeout(f"could not read {self.consumer.subscription()} to its end in {timeout_s} s")
            self.poll()
        return self.records

    def close(self) -> None:
        self.consumer.close()


def announced(records) -> list:
    """The verified codebook updates (codebook_store.CodebookUpdate) that codebook-updates records reassemble to,
    in the order completed."""
    from codebook_store import Reassembler

    r = Reassembler()
    return [u for rec in records if (u := r.accept(rec.key, rec.value, rec.headers)) is not None]


def delete_topics_of(bootstrap: str, run: str) -> None:
    """Delete every topic whose name holds `run` (the test's own and the worker's internal ones)."""
    from kafka import KafkaAdminClient

    with KafkaAdminClient(bootstrap_servers=bootstrap) as admin:
        admin.delete_topics([t for t in admin.list_topics() if run in t], raise_errors=False)


class WorkerProcess:
    """`sparc worker` (or another role's command) in a subprocess; every start writes its own log (worker-1.log,
    worker-2.log, ...; `name` replaces "worker").

    flags: the command-line flags (a --web-port is added); env: SPARC_* settings on top of `base_env` (default:
    this process's environment); module: what `python -m` runs (its main takes the command and the flags)."""

    def __init__(self, tmp_path: Path, flags: Iterable[str], env: Mapping[str, str], command: str = "worker",
                 name: str | None = None, *, base_env: Mapping[str, str] | None = None,
                 module: str = "sparc_stream.cli.main"):
        self.tmp_path, self.flags = tmp_path, list(flags)
        self.env = {**(os.environ if base_env is None else base_env), **env}
        self.command, self.name, self.module = command, name or command, module
        self.port = free_port()
        self.starts = 0
        self.launched_at = 0.0  # unix time of the last launch
        self.process: subprocess.Popen | None = None
        self.log = tmp_path / f"{self.name}-0.log"

    def launch(self) -> WorkerProcess:
        """Start the process and return at once."""
        self.starts += 1
        self.log = self.tmp_path / f"{self.name}-{self.starts}.log"
        command = [sys.executable, "-m", self.module, self.command, *self.flags, "--web-port", str(self.port)]
        self.launched_at = time.time()
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(command, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        return self

    def start(self, ready_timeout_s: float = 180, wait: bool = True) -> WorkerProcess:
        """Start the process and (wait) wait until its web server answers /livez."""
        self.launch()
        if wait:
            self.wait_until_live(ready_timeout_s)
        return self

    def wait_until_live(self, timeout_s: float = 180) -> None:
        self.wait_for(f"{self.name}'s web server", self.alive, timeout_s)

    def wait_for_exit(self, timeout_s: float = 90) -> int:
        """The exit status once the process has ended by itself; WaitTimeout (with its log) if it still runs."""
        assert self.process is not None
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise WaitTimeout(f"{self.name} still runs after {timeout_s} s; its log:\n{log_tail(self.log)}") from None

    def alive(self) -> bool:
        """The web server answers /livez with 200."""
        return get(self.port, "/livez")[0] == 200

    def wait_for(self, what: str, probe: Callable[[], Any], timeout_s: float) -> Any:
        assert self.process is not None
        return wait_for(what, probe, timeout_s, self.process, self.log)

    def metrics_text(self) -> str:
        return get(self.port, "/metrics")[1].decode(errors="replace")

    def metric(self, name: str) -> float:
        return metric(self.metrics_text(), name)

    def rss_mb(self) -> float | None:
        return None if self.process is None else rss_mb(self.process.pid)

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


def json_messages(events: Iterable[dict]) -> Iterator[Message]:
    """Feedback event dicts as messages: (event id, user id as the key, JSON value)."""
    for e in events:
        yield e["event_id"], str(e["user_id"]).encode(), json.dumps(e).encode()


class PacedProducer(threading.Thread):
    """Sends messages (harness.Message) to `topic` in order at about `rate` per second (0: as fast as it can) from
    a thread, until they run out or `stop` is set. What Kafka acknowledged is recorded per message: `acked`,
    (id, partition, offset, unix time of the send); sends that fail (a broker away longer than the producer
    waits) are counted in `failed` and dropped. Pacing only: nothing depends on the rate being met."""

    def __init__(self, bootstrap: str, topic: str, messages: Iterable[Message], rate: float = 0.0,
                 **producer_config: Any):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.messages, self.rate = bootstrap, topic, messages, rate
        self.config = {"linger_ms": 20, "acks": 1, **producer_config}
        self.sent = self.failed = 0
        self.acked: list[tuple[str, int, int, float]] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        from sparc_stream.cli.produce import Pacer

        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap, **self.config)
            pacer = Pacer(self.rate)
            try:
                for n, (ident, key, value) in enumerate(self.messages, 1):
                    if self.stop.is_set():
                        return
                    at = time.time()
                    try:
                        future = producer.send(self.topic, key=key, value=value)
                    except KafkaError:  # no metadata within max_block_ms: the broker is away
                        self.failed += 1
                    else:
                        future.add_callback(self._acked, ident, at).add_errback(self._failed)
                        self.sent += 1
                    pacer.wait(n)
            finally:
                producer.flush(timeout=60)
                producer.close(timeout=10)
        except BaseException as exc:  # reported by the caller
            self.error = exc

    def _acked(self, ident: str, at: float, meta) -> None:
        self.acked.append((ident, meta.partition, meta.offset, at))

    def _failed(self, exc: BaseException) -> None:
        self.failed += 1

    def finish(self, timeout_s: float = 120) -> None:
        """Stop sending and wait for the thread (its last sends flushed)."""
        self.stop.set()
        if self.is_alive():
            self.join(timeout=timeout_s)


def broker_sh(command: str, *args: str, env: Mapping[str, str] | None = None, tries: int = 1) -> str:
    """Run deploy/kafka/broker.sh; returns its stdout. A start is tried again when the port was taken: on
    loopback, a client reconnecting in a tight loop to the stopped broker's port can connect to itself (TCP
    simultaneous open from an ephemeral port equal to the port) and hold that port for a moment. Raises
    RuntimeError with the script's stderr when it fails."""
    env = dict(os.environ if env is None else env)
    for attempt in range(1, tries + 1):
        done = subprocess.run(["bash", str(BROKER_SH), command, *args], capture_output=True, text=True, check=False,
                              env=env)
        if done.returncode == 0:
            return done.stdout
        if attempt == tries or "Address already in use" not in done.stderr + _server_log(env):
            raise RuntimeError(f"broker.sh {command} failed:\n{done.stderr[-2000:]}")
        time.sleep(1)
    raise AssertionError("unreachable")


def _server_log(env: Mapping[str, str]) -> str:
    state = Path(env.get("SPARC_KAFKA_DIR", Path.home() / ".cache/sparc-stream/kafka-run"))
    try:
        return (state / "logs" / "server.log").read_text(errors="replace")[-20000:]
    except OSError:
        return ""


class PrivateBroker:
    """A broker of deploy/kafka/broker.sh that nothing else uses: loopback, plaintext, its own state dir and ports
    (`port` and `controller_port`, default port + 1; two free ones when no port is given).

        broker = PrivateBroker(Path("/tmp/x/kafka")); bootstrap = broker.start(); ...; broker.stop()
    """

    def __init__(self, state_dir: Path, port: int | None = None, controller_port: int | None = None):
        self.state_dir = state_dir
        self.port = port or free_port()
        self.controller_port = controller_port or (port + 1 if port else free_port())
        base = {k: v for k, v in os.environ.items() if not k.startswith("SPARC_KAFKA_")}
        self.env = {**base, "SPARC_KAFKA_PORT": str(self.port),
                    "SPARC_KAFKA_CONTROLLER_PORT": str(self.controller_port), "SPARC_KAFKA_DIR": str(state_dir),
                    "SPARC_KAFKA_SECURITY": "plaintext"}
        self.bootstrap = f"127.0.0.1:{self.port}"

    def start(self, tries: int = 10) -> str:
        """Start it (or find it running) and return its bootstrap address."""
        return broker_sh("start", env=self.env, tries=tries).strip().splitlines()[-1]

    def stop(self, keep_data: bool = False) -> None:
        broker_sh("stop", *(["--keep-data"] if keep_data else []), env=self.env)

    def running(self) -> bool:
        try:
            broker_sh("status", env=self.env)
        except RuntimeError:
            return False
        return True

    def pid(self) -> int | None:
        try:
            return int((self.state_dir / "broker.pid").read_text().strip())
        except (OSError, ValueError):
            return None


class Deployment:
    """One worker deployment on a broker (or one of the scale-out roles: `role`), unique to a run: its topics,
    consumer group (app id), codebook store, table directory and processed log, all named after `name` plus a random
    suffix, files under `workdir`.

        d = Deployment(bootstrap, tmp, "restart", settings={"SPARC_BATCH_SIZE": "32"})
        w = d.worker().start(); ...; d.audit(acked_ids, w.port); d.delete_topics()
        learn = d.role("learn").start(); ingest = d.role("ingest", "ingest-0").start(); ...  (audit: learn.port)

    settings: SPARC_* variables of the worker (the model's shape, batching, ...); the worker's environment holds
    only these and the deployment's own (no SPARC_* setting of the caller's leaks in)."""

    KINDS = ("feedback", "item", "updates", "dlq")

    def __init__(self, bootstrap: str, workdir: Path, name: str, *, store: str = "rocksdb",
                 settings: Mapping[str, str] | None = None, partitions: int = 2):
        import uuid

        self.bootstrap, self.workdir, self.partitions = bootstrap, workdir, partitions
        self.run = f"{name}-{uuid.uuid4().hex[:8]}"
        self.topics = {kind: f"{self.run}-{kind}" for kind in self.KINDS}
        self.app_id = self.run
        if "://" in store:  # a whole URL (a store somewhere else than under workdir)
            self.store_url = store
        else:
            self.store_url = f"{store}://{workdir / 'store'}" if store != "memory" else "memory://"
        self.processed = workdir / "processed.jsonl"
        self.env = {**{f"SPARC_{kind.upper()}_TOPIC": topic for kind, topic in self.topics.items()},
                    "SPARC_SESSION_TIMEOUT": "10", **(settings or {})}
        self.flags = ["--broker", bootstrap, "--store", self.store_url, "--data-dir", str(workdir / "faust"),
                      "--app-id", self.app_id, "--partitions", str(partitions), "--processed-log", str(self.processed)]

    def worker(self, module: str = "sparc_stream.cli.main") -> WorkerProcess:
        base = {k: v for k, v in os.environ.items() if not k.startswith("SPARC_")}
        return WorkerProcess(self.workdir, self.flags, self.env, base_env=base, module=module)

    def role(self, command: str, name: str | None = None, **settings: str) -> WorkerProcess:
        """A process of a scale-out role of this deployment (`sparc ingest|learn|serve`, README "Running at
        scale"): the deployment's topics, app id, partitions, store and processed log (the learner writes it), a
        state directory of its own (`name`, default the command) and `settings` (SPARC_* variables) on top."""
        name = name or command
        flags = ["--broker", self.bootstrap] + (["--data-dir", str(self.workdir / name)] if command != "learn" else [])
        env = {**self.env, "SPARC_APP_ID": self.app_id, "SPARC_PARTITIONS": str(self.partitions),
               "SPARC_STORE_URL": self.store_url, "SPARC_PROCESSED_LOG": str(self.processed), **settings}
        base = {k: v for k, v in os.environ.items() if not k.startswith("SPARC_")}
        return WorkerProcess(self.workdir, flags, env, command=command, name=name, base_env=base)

    def latest_train_position(self, port: int) -> dict[str, int] | None:
        """The train-topic positions ({"topic:partition": offset}) the worker's latest snapshot has learnt up to
        (None: no latest yet)."""
        status, latest = get_json(port, "/snapshots/latest")
        if status != 200:
            return None
        return train_positions(latest["watermark"]["kafka"], self.app_id)

    def learnt(self, upto: Mapping[str, int] | None) -> list[str]:
        """The event ids (with repeats) that a snapshot at train positions `upto` has learnt (learnt_event_ids)."""
        return learnt_event_ids(read_processed_log(self.processed), upto) if upto else []

    def missing(self, wanted: set[str], port: int) -> set[str] | None:
        """The ids in `wanted` that the worker's latest snapshot has not learnt (None: no latest snapshot)."""
        upto = self.latest_train_position(port)
        return None if upto is None else wanted - set(self.learnt(upto))

    def wait_learnt(self, wanted: set[str], port: int, timeout_s: float, alive: Callable[[], bool],
                    stalled_s: float = 90.0) -> float | None:
        """Wait until the latest snapshot has learnt every id in `wanted`: the time (unix s) it had, or None when
        `timeout_s` passed, the worker stopped, or the latest's train position did not move for `stalled_s` (a
        worker still catching up on a backlog is waited for; one that has stopped learning is not)."""
        deadline = time.monotonic() + timeout_s
        position, moved = None, time.monotonic()
        while time.monotonic() < deadline and alive():
            if self.missing(wanted, port) == set():
                return time.time()
            now = self.latest_train_position(port)
            if now != position:
                position, moved = now, time.monotonic()
            elif time.monotonic() - moved > stalled_s:
                return None
            time.sleep(2.0)
        return None

    def audit(self, wanted: Iterable[str], port: int) -> dict[str, int]:
        """What the latest snapshot holds of `wanted` (the ids Kafka acknowledged): "lost" (never learnt),
        "learnt_twice" (learnt more than once: at least once is the contract), "learnt" (distinct)."""
        from collections import Counter

        wanted = set(wanted)
        upto = self.latest_train_position(port)
        counts = Counter(self.learnt(upto)) if upto else Counter()
        return {"events": len(wanted), "learnt": sum(1 for e in wanted if counts[e]),
                "lost": sum(1 for e in wanted if not counts[e]),
                "learnt_twice": sum(1 for e in wanted if counts[e] > 1)}

    def create_topics(self) -> None:
        """Create the deployment's topics as the worker would (before anything is produced to them)."""
        from streams.settings import WorkerSettings
        from streams.topics import ensure_topics

        ensure_topics(WorkerSettings(broker=self.bootstrap, app_id=self.app_id, partitions=self.partitions,
                                     **{f"{kind}_topic": topic for kind, topic in self.topics.items()}))

    def delete_topics(self) -> None:
        delete_topics_of(self.bootstrap, self.run)


# ---------------------------------------------------------------------------------------------- load
def synthetic(seed: int, events: int, users: int = 2000, items: int = 3000):
    """The project's synthetic stream (replay.synthetic), every item in the catalogue from the start."""
    from replay.synthetic import SyntheticConfig, generate

    return generate(SyntheticConfig(n_users=users, n_events=max(events, users * 5), n_initial_items=items,
                                    n_new_items=0, seed=seed))


def catalogue_messages(stream) -> list[Message]:
    """The stream's item events (key: the item id)."""
    return [(str(e["item_id"]), str(e["item_id"]).encode(), json.dumps(e).encode())
            for e in stream.iter_events() if "event_id" not in e]


def feedback_events(stream, prefix: str = "") -> Iterator[dict]:
    """The stream's feedback events; `prefix` makes their event ids unique to a phase."""
    for e in stream.iter_events():
        if "event_id" in e:
            yield {**e, "event_id": prefix + e["event_id"]} if prefix else e


def send_all(bootstrap: str, topic: str, messages, timeout_s: float = 300) -> PacedProducer:
    """Send messages as fast as the producer goes and wait until Kafka has acknowledged them (or the time is up)."""
    producer = PacedProducer(bootstrap, topic, messages, 0.0, batch_size=256 * 1024)
    producer.start()
    producer.join(timeout=timeout_s)
    if producer.error is not None:
        raise RuntimeError(f"producing to {topic} failed: {producer.error!r}")
    return producer
