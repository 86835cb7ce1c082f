"""The defects an operator measured in the worker's defaults (issue 13), each reproduced without a broker:
Faust's own unprefixed environment variables overriding the settings, the web server listening on 0.0.0.0,
Faust's `kafka://` broker URL form and the history changelog's replication (tests/test_streams_probes.py: /health
answering 200 whatever its status)."""

from __future__ import annotations

import pytest
from test_streams_agents import make_worker

from sparc_stream.cli.errors import UserError
from sparc_stream.cli.main import main as sparc
from sparc_stream.cli.worker import build_settings
from streams.app import create_app
from streams.settings import WorkerSettings


def test_faust_environment_variables_never_change_the_app(monkeypatch, tmp_path):
    # what Kubernetes injects for a Service named `web`, and Faust's own names for our settings
    monkeypatch.setenv("WEB_PORT", "tcp://10.0.0.7:9999")
    monkeypatch.setenv("WEB_HOST", "evil.example")
    monkeypatch.setenv("WEB_BIND", "0.0.0.0")
    monkeypatch.setenv("TOPIC_PARTITIONS", "8")
    monkeypatch.setenv("TOPIC_REPLICATION_FACTOR", "7")
    monkeypatch.setenv("BROKER_URL", "kafka://other-broker:9092")
    monkeypatch.setenv("APP_DATADIR", str(tmp_path / "elsewhere"))
    monkeypatch.setenv("CONSUMER_MAX_FETCH_SIZE", "1")
    settings = WorkerSettings(data_dir=tmp_path, web_port=6123, partitions=3, broker="127.0.0.1:39999")
    app = create_app(settings)
    assert app.conf.web_port == 6123
    assert app.conf.web_host == "127.0.0.1"
    assert app.conf.topic_partitions == 3
    assert app.conf.topic_replication_factor == 1
    assert [str(url) for url in app.conf.broker] == ["kafka://127.0.0.1:39999"]
    assert app.conf.consumer_max_fetch_size == settings.fetch_bytes
    assert str(app.conf.datadir).startswith(str(tmp_path))


def test_the_web_server_binds_web_host(tmp_path):
    app = create_app(WorkerSettings(data_dir=tmp_path, web_host="127.0.0.1"))
    assert app.conf.web_bind == "127.0.0.1"
    app = create_app(WorkerSettings(data_dir=tmp_path, web_host="0.0.0.0"))
    assert app.conf.web_bind == "0.0.0.0"


@pytest.mark.parametrize("given, servers", [
    ("127.0.0.1:39092", ["127.0.0.1:39092"]),
    ("kafka://127.0.0.1:39092", ["127.0.0.1:39092"]),
    ("kafka://a.example:9093,kafka://b.example:9093", ["a.example:9093", "b.example:9093"]),
    ("a.example:9093, b.example:9094", ["a.example:9093", "b.example:9094"]),
    ("kafka://a.example:9093;b.example:9094", ["a.example:9093", "b.example:9094"]),
    ("[::1]:9092", ["[::1]:9092"]),
])
def test_the_broker_accepts_host_port_lists_and_kafka_urls(given, servers):
    settings = WorkerSettings(broker=given)
    assert settings.bootstrap_servers == servers
    assert settings.broker == ",".join(servers)  # one form from here on (Faust gets kafka:// + each)


@pytest.mark.parametrize("bad", ["http://127.0.0.1:9092", "127.0.0.1", "kafka://", "host:port", "h:0",
                                 "h:70000", "a:1,,b", ""])
def test_a_bad_broker_is_one_clear_line(bad, capsys):
    with pytest.raises(UserError, match="broker"):
        build_settings(broker=bad)
    assert sparc(["worker", "--broker", bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparc worker: error:") and "broker" in err[0]


def test_the_history_changelog_gets_the_workers_replication_and_min_insync(tmp_path):
    """Faust creates the changelog (issue 13: it got replication 1 whatever the cluster): with the worker's
    replication factor (streams.topics.ensure_topics resolves an unset one) and min.insync.replicas."""
    w = make_worker(tmp_path, replication_factor=3, min_insync_replicas=2)
    try:
        changelog = w.history.changelog_topic
        assert changelog.get_topic_name() == w.settings.changelog_topic
        assert w.app.conf.topic_replication_factor == 3 and changelog.replicas is None  # None: the app's
        assert changelog.compacting and changelog.config == {"min.insync.replicas": "2"}
    finally:
        w.close()
