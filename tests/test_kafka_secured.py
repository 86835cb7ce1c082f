"""Kafka security for every client, against the test broker's secured listeners (deploy/kafka/broker.sh with
SPARC_KAFKA_SECURITY=sasl_ssl: SASL_SSL with PLAIN / SCRAM-SHA-256 / SCRAM-SHA-512, and SSL with client certificates
required; its CA, certificates and user's password made by openssl when the broker starts).

End to end over SASL_SSL + SCRAM-SHA-512 with hostname checking: `sparc worker` (its admin calls and Faust's
aiokafka clients), `sparc produce`, the codebook-updates subscriber and `sparc replay`'s Kafka source; the password
never appears in a log or in `sparc config show`. A wrong password is one clear line and a non-zero exit, for
produce and for the worker. No timing is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from kafka import KafkaAdminClient
from worker_harness import ROOT, WorkerProcess, delete_topics_of, get, get_json

from codebook_store import subscribe
from replay.sources import open_source
from sparc_stream.cli.main import main as sparc
from streams.settings import WorkerSettings

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]
TINY_STREAM = ["--synthetic", "--users", "4", "--events", "40", "--items", "20", "--quiet"]


def kafka_section(secured: dict, mechanism: str = "SCRAM-SHA-512", password_file: str | None = None) -> str:
    return (f'[kafka]\nbroker = "kafka://{secured["sasl_ssl"]}"\nsecurity_protocol = "SASL_SSL"\n'
            f'sasl_mechanism = "{mechanism}"\nsasl_username = "{secured["sasl_username"]}"\n'
            f'sasl_password_file = "{password_file or secured["sasl_password_file"]}"\n'
            f'ssl_cafile = "{secured["ssl_cafile"]}"\nssl_check_hostname = true\n')


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_ssl_mechanisms_for_the_kafka_python_clients(kafka_secured, mechanism):
    settings = WorkerSettings(broker=kafka_secured["sasl_ssl"], security_protocol="SASL_SSL",
                              sasl_mechanism=mechanism, sasl_username=kafka_secured["sasl_username"],
                              sasl_password_file=kafka_secured["sasl_password_file"],
                              ssl_cafile=kafka_secured["ssl_cafile"])
    settings.kafka_connection().check()
    with KafkaAdminClient(**settings.kafka_connection().kafka_python()) as admin:
        assert admin.describe_cluster()["brokers"]


def test_ssl_with_a_client_certificate(kafka_secured):
    base = dict(broker=kafka_secured["ssl"], security_protocol="SSL", ssl_cafile=kafka_secured["ssl_cafile"])
    with_cert = WorkerSettings(**base, ssl_certfile=kafka_secured["ssl_certfile"],
                               ssl_keyfile=kafka_secured["ssl_keyfile"])
    with_cert.kafka_connection().check()
    with KafkaAdminClient(**with_cert.kafka_connection().kafka_python()) as admin:
        assert admin.describe_cluster()["brokers"]
    with pytest.raises(ValueError, match="bad certificate|certificate required"):  # the listener requires one
        WorkerSettings(**base).kafka_connection().check()


def test_a_wrong_password_or_an_unknown_ca_is_one_clear_line(kafka_secured, tmp_path, capsys):
    wrong = tmp_path / "wrong-password"
    wrong.write_text("not-the-password\n")
    config = tmp_path / "wrong.toml"
    config.write_text(kafka_section(kafka_secured, password_file=str(wrong)))
    assert sparc(["produce", "--config", str(config), *TINY_STREAM, "--topic", f"wrong-{uuid.uuid4().hex[:8]}"]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparc produce: error: cannot connect to Kafka at") and "invalid credentials" in line
    assert "not-the-password" not in line

    untrusted = tmp_path / "untrusted.toml"
    untrusted.write_text(kafka_section(kafka_secured).replace(f'ssl_cafile = "{kafka_secured["ssl_cafile"]}"\n', ""))
    assert sparc(["produce", "--config", str(untrusted), *TINY_STREAM]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "certificate verify failed" in line

    worker = subprocess.run([sys.executable, "-m", "sparc_stream.cli.main", "worker", "--config", str(config),
                             "--data-dir", str(tmp_path / "faust"), "--store", "memory://"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2
    [line] = worker.stderr.strip().splitlines()
    assert line.startswith("sparc worker: error: cannot connect to Kafka at") and "invalid credentials" in line


def test_worker_produce_and_subscriber_over_sasl_ssl(kafka_secured, kafka_bootstrap, tmp_path, capsys):
    run = uuid.uuid4().hex[:10]
    topics = {name: f"sec-{name}-{run}" for name in ("feedback", "item", "updates", "dlq")}
    config = tmp_path / "sparc.toml"
    config.write_text(
        kafka_section(kafka_secured)
        + "[topics]\n" + "".join(f'{name}_topic = "{topic}"\n' for name, topic in topics.items())
        + 'partitions = 2\n[model]\ncodes = 16\ndim = 32\nlayers = 1\nmax_len = 20\n'
    )
    password = Path(kafka_secured["sasl_password_file"]).read_text().strip()
    flags = (f"--config {config} --store file://{tmp_path}/store --data-dir {tmp_path}/faust --app-id sec-{run} "
             "--batch-size 32 --snapshot-every-steps 10 --snapshot-every-seconds 2 --log-format json").split()
    w = WorkerProcess(tmp_path, flags, {})
    try:
        w.start()
        assert get(w.port, "/readyz")[0] == 503  # nothing served yet: not ready
        produce = ["produce", "--config", str(config), "--synthetic", "--users", "100", "--events", "1500",
                   "--items", "150", "--rate", "0", "--quiet"]
        assert sparc(produce) == 0
        client = WorkerSettings.load(config).kafka_connection().kafka_python()
        servers = client.pop("bootstrap_servers")
        with subscribe(servers, topics["updates"], start=0, timeout=120, kafka_config=client) as updates:
            first = next(iter(updates))
        assert first.version >= 0 and first.item_codes is not None
        capsys.readouterr()
        follow = ["subscribe", "--config", str(config), "--topic", topics["updates"], "--from", str(first.version),
                  "--idle-timeout", "10", "--jsonl"]  # `sparc subscribe` connects as the workers do, from --config
        assert sparc(follow) == 0
        printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
        assert printed and printed[0]["version"] == first.version and printed[0]["item_codes_known"]
        replayed = open_source(f"kafka://{servers[0]}/{topics['feedback']}", client)  # sparc replay's source
        assert replayed.feedback == 1500 and replayed.info["invalid"] == 0
        status, ready = w.wait_for("/readyz 200", lambda: (s := get_json(w.port, "/readyz"))[0] == 200 and s, 120)
        assert ready["ready"] and ready["tables_recovered"] and ready["served_version"] is not None
    finally:
        exit_code = w.terminate()
        delete_topics_of(kafka_bootstrap, run)
    assert exit_code == 0
    log = w.log.read_text()
    assert password not in log
    assert '"level": "INFO"' in log and "snapshot v" in log  # JSON lines, and it published
    config_show = subprocess.run([sys.executable, "-m", "sparc_stream.cli.main", "config", "show",
                                  "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert config_show.returncode == 0 and password not in config_show.stdout
    assert f'sasl_password_file = "{kafka_secured["sasl_password_file"]}"' in config_show.stdout
