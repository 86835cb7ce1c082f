"""Shared test fixtures: one torch thread for the (tiny) unit tests; for the tests marked `kafka`, a real
Apache Kafka broker, never a mock.

Where the broker comes from, first match wins:
  1. env KAFKA_BOOTSTRAP_SERVERS (what `make test` sets after `deploy/kafka/broker.sh start`): used as is;
     it must answer, else the tests fail.
  2. a usable Docker engine and the `testcontainers` package: a throwaway Kafka container.
  3. `deploy/kafka/broker.sh start` (Java 17 + Maven fetch the broker from Maven Central), stopped at the end
     of the session unless it was already running before.
A broker that cannot be had skips the tests on a workstation and FAILS them in CI (env CI=true).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import pytest
from kafka import KafkaAdminClient
from kafka.errors import KafkaError


@pytest.fixture(autouse=True, scope="session")
def _torch_one_thread() -> Iterator[None]:
    """Unit tests use tiny tensors: one torch thread is faster than two contending ones (and deterministic)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BROKER_SH = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "broker.sh"
# KRaft-capable image that testcontainers' KafkaContainer knows how to configure (used only where Docker is).
TESTCONTAINERS_IMAGE = "confluentinc/cp-kafka:7.9.0"
BROKER_START_TIMEOUT_S = 900  # a first start includes the Maven fetch of the broker's jars
BROKER_STOP_TIMEOUT_S = 60


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"true", "1", "yes"}


def _no_broker(reason: str) -> NoReturn:
    """Skip on a workstation; fail in CI, where the Kafka tests are part of what must pass."""
    if _in_ci():
        pytest.fail(f"no Kafka broker for the kafka-marked tests: {reason}", pytrace=False)
    pytest.skip(f"no Kafka broker: {reason}")


def _broker_problem(bootstrap: str) -> str | None:
    """None when a broker at `bootstrap` answers a describe-cluster call, else what went wrong."""
    try:
        with KafkaAdminClient(
            bootstrap_servers=bootstrap,
            client_id="sparc-tests-probe",
            bootstrap_timeout_ms=10_000,
            request_timeout_ms=10_000,
        ) as admin:
            cluster = admin.describe_cluster()
    except KafkaError as exc:
        return str(exc) if str(exc).startswith(type(exc).__name__) else f"{type(exc).__name__}: {exc}"
    if not cluster.get("brokers"):
        return "the cluster reports no brokers"
    return None


def _broker_sh(command: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    """broker.sh in its secured mode unless told otherwise (SPARC_KAFKA_SECURITY): the plaintext listener the
    tests use is the same either way, and the secured tests need the SASL_SSL and SSL listeners."""
    env = {**os.environ, "SPARC_KAFKA_SECURITY": os.environ.get("SPARC_KAFKA_SECURITY", "sasl_ssl")}
    return subprocess.run(
        ["bash", str(BROKER_SH), command], capture_output=True, text=True, timeout=timeout_s, check=False, env=env
    )


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _testcontainers_kafka() -> type | None:
    """testcontainers' KafkaContainer class when that package is installed AND a Docker engine answers."""
    try:
        import docker
        from testcontainers.kafka import KafkaContainer
    except ImportError:
        return None
    try:
        docker.from_env().ping()
    except Exception:  # no engine, no permission on the socket, a daemon that does not answer: no Docker
        return None
    return KafkaContainer


def _containerised_broker(container_class: type) -> Iterator[str]:
    with container_class(image=TESTCONTAINERS_IMAGE).with_kraft() as kafka:
        yield kafka.get_bootstrap_server()


def _project_broker() -> Iterator[str]:
    """The broker of deploy/kafka/broker.sh; stopped afterwards only if this session started it."""
    already_running = _broker_sh("status", timeout_s=60).returncode == 0
    try:
        started = _broker_sh("start", timeout_s=BROKER_START_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _no_broker(f"{BROKER_SH} start did not finish: {exc}")
    if started.returncode != 0:
        _no_broker(f"{BROKER_SH} start exited {started.returncode}:\n{_tail(started.stderr)}")
    bootstrap = started.stdout.strip().splitlines()[-1]
    yield bootstrap
    if not already_running:
        stopped = _broker_sh("stop", timeout_s=BROKER_STOP_TIMEOUT_S)
        if stopped.returncode != 0:
            problem = f"{BROKER_SH} stop exited {stopped.returncode}:\n{_tail(stopped.stderr)}"
            pytest.fail(problem, pytrace=False)


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The bootstrap address ("host:port") of a real Kafka broker that answers, for the whole session."""
    configured = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if configured:
        problem = _broker_problem(configured)
        if problem is not None:
            pytest.fail(f"KAFKA_BOOTSTRAP_SERVERS={configured} does not answer: {problem}", pytrace=False)
        yield configured
        return
    container_class = _testcontainers_kafka()
    if container_class is not None:
        yield from _containerised_broker(container_class)
        return
    yield from _project_broker()


@pytest.fixture(scope="session")
def kafka_secured(kafka_bootstrap: str) -> dict:
    """How a client reaches the secured listeners of the test broker (deploy/kafka/broker.sh's secured mode):
    {"sasl_ssl": "host:port", "ssl": "host:port", "sasl_username", "sasl_password_file", "sasl_mechanisms",
    "ssl_cafile", "ssl_certfile", "ssl_keyfile"}. The same broker as kafka_bootstrap; `make test` starts it with
    SPARC_KAFKA_SECURITY=sasl_ssl."""
    try:
        found = _broker_sh("client-config", timeout_s=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _no_broker(f"{BROKER_SH} client-config did not finish: {exc}")
    if found.returncode != 0:
        _no_broker(f"the broker at {kafka_bootstrap} has no secured listeners (start it with "
                   f"SPARC_KAFKA_SECURITY=sasl_ssl): {_tail(found.stderr, 3)}")
    return json.loads(Path(found.stdout.strip().splitlines()[-1]).read_text())


def _topic_stem(test_name: str) -> str:
    """A test's name reduced to the characters Kafka allows in topic names ([A-Za-z0-9._-])."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", test_name).strip("-.")[:100] or "topic"


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """Factory: `kafka_topic(partitions=3)` creates a topic unique to this call and returns its name.

    The name is the test's name plus a uuid suffix, so tests never see each other's records. The call returns
    once every partition has a leader; the topics are deleted when the test ends.
    """
    created: list[str] = []
    with KafkaAdminClient(bootstrap_servers=kafka_bootstrap, client_id="sparc-tests-admin") as admin:

        def create(partitions: int = 1, stem: str | None = None, configs: dict | None = None) -> str:
            name = f"{_topic_stem(stem or request.node.name)}-{uuid.uuid4().hex[:12]}"
            admin.create_topics(
                {name: {"num_partitions": partitions, "replication_factor": 1, "configs": configs or {}}},
                wait_for_metadata=True,
            )
            created.append(name)
            return name

        yield create
        if created:
            admin.delete_topics(created, raise_errors=False)
