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


def test_discovery_is_on_by_default_and_the_earlier_behaviour_one_flag_away(monkeypatch, capsys):
    """Issue 16: the worker serves with exploration slots (exploit 15, lift 0.5, chosen on validation);
    --no-exploration restores what it served before; --help says so. Stable interests are opt-in."""
    import argparse

    from sparc_stream.cli.worker import FLAGS, ROLE_FLAGS, add_role_flags, role_settings

    for key in ("SPARC_EXPLORATION", "SPARC_EXPLOIT", "SPARC_LIFT", "SPARC_EMA_DECAY", "SPARC_CODE_HYSTERESIS",
                "SPARC_TOP_CODES"):
        monkeypatch.delenv(key, raising=False)
    s = WorkerSettings()
    assert s.exploration_config() is not None and (s.exploit, s.lift) == (15, 0.5)
    assert s.exploration_config().slots(20) == 15 and s.exploration_config().slots(15) is None
    model = s.sparc_config()
    assert (model.ema_decay, model.code_hysteresis) == (0.95, 0.0)
    for role in ("worker", "serve"):
        assert "exploration" in ROLE_FLAGS[role]
        p = argparse.ArgumentParser()
        add_role_flags(p, role)
        assert role_settings(p.parse_args([]), role).exploration_config() is not None
        assert role_settings(p.parse_args(["--no-exploration"]), role).exploration_config() is None
    assert FLAGS["exploration"][0] == "exploration"
    monkeypatch.setenv("SPARC_EMA_DECAY", "0.99")
    monkeypatch.setenv("SPARC_CODE_HYSTERESIS", "3")
    model = WorkerSettings().sparc_config()
    assert (model.ema_decay, model.code_hysteresis) == (0.99, 3.0)
    with pytest.raises(UserError, match="exploit 3 is below top_codes 4"):
        build_settings(exploit=3)
    assert build_settings(exploit=3, exploration=False).exploration_config() is None  # off: no constraint
    from trainer.config import EXPLORATION

    # the help texts name the defaults (they are written out: the command line imports no trainer module)
    slots = (f"first {EXPLORATION.exploit}", f"q(i)^{EXPLORATION.lift:g}")
    for command, says in (("worker", (*slots, "SPARC_EMA_DECAY=0.99")), ("serve", slots), ("demo", slots),
                          ("evaluate", (f"default {EXPLORATION.exploit}", f"default {EXPLORATION.lift:g}"))):
        with pytest.raises(SystemExit):
            sparc([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--no-exploration" in text and all(s in text for s in says), command
