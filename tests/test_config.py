"""One configuration: a TOML file beside SPARC_* variables and flags (precedence flags > environment > file >
defaults), `sparc config show` with secrets masked, secrets from files, and the Kafka connection settings
(streams.kafka_connection) with their adapters for Faust and kafka-python. No broker needed."""

from __future__ import annotations

import ssl
import subprocess
import tomllib

import faust
import pytest

from sparc_stream.cli.config import MASK
from sparc_stream.cli.errors import UserError
from sparc_stream.cli.main import main as sparc
from sparc_stream.cli.worker import build_settings
from streams.kafka_connection import KafkaConfigError, KafkaConnection, parse_bootstrap
from streams.settings import SECTIONS, ConfigError, WorkerSettings, read_config_file, section_of

CA_SUBJECT = "/CN=test-ca"


@pytest.fixture
def clean_env(monkeypatch):
    """No SPARC_* variable from the caller's environment leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("SPARC_") and not name.startswith("SPARC_KAFKA_"):
            monkeypatch.delenv(name)
    return monkeypatch


def write(path, text: str):
    path.write_text(text)
    return path


def test_precedence_is_flags_then_environment_then_file_then_defaults(tmp_path, clean_env):
    config = write(tmp_path / "sparc.toml", "[ingest]\nbatch_size = 10\ndedup_window = 11\n"
                                            "[web]\nweb_port = 7001\n[model]\ncodes = 8\n")
    assert WorkerSettings.load().batch_size == 64  # the default
    assert WorkerSettings.load(config).batch_size == 10  # the file
    clean_env.setenv("SPARC_BATCH_SIZE", "20")
    clean_env.setenv("SPARC_WEB_PORT", "7002")
    settings = WorkerSettings.load(config)
    assert (settings.batch_size, settings.web_port, settings.dedup_window, settings.codes) == (20, 7002, 11, 8)
    settings = build_settings(config, batch_size=30, web_port=None)  # a flag; None: the flag was not given
    assert (settings.batch_size, settings.web_port, settings.dedup_window) == (30, 7002, 11)


def test_config_show_masks_secrets_and_prints_a_file_that_loads_back(tmp_path, clean_env, capsys):
    config = write(tmp_path / "sparc.toml", '[kafka]\nbroker = "kafka://b1:9093,kafka://b2:9093"\n'
                   'security_protocol = "SASL_SSL"\nsasl_mechanism = "SCRAM-SHA-512"\nsasl_username = "svc"\n'
                   '[topics]\nreplication_factor = 3\nmin_insync_replicas = 2\n')
    clean_env.setenv("SPARC_SASL_PASSWORD", "s3cret-from-env")
    assert sparc(["config", "show", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "s3cret-from-env" not in shown and f'sasl_password = "{MASK}"' in shown
    data = tomllib.loads(shown)
    assert list(data) == list(SECTIONS)
    assert data["kafka"]["broker"] == "b1:9093,b2:9093" and data["topics"]["replication_factor"] == 3
    assert "# replication_factor" not in shown and "# ssl_cafile = (unset)" in shown
    reread = read_config_file(write(tmp_path / "shown.toml", shown))
    settings = WorkerSettings.load(config)
    for name, value in reread.items():
        if name != "sasl_password":
            assert str(value) == str(getattr(settings, name)), name
    assert sparc(["config", "show", "--config", str(config), "--format", "json"]) == 0
    assert "s3cret-from-env" not in capsys.readouterr().out


def test_secrets_come_from_files_and_never_show(tmp_path, clean_env):
    secret = write(tmp_path / "password", "from-a-file\n")
    settings = WorkerSettings(security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username="u",
                              sasl_password_file=secret)
    assert settings.sasl_password.get_secret_value() == "from-a-file"
    assert "from-a-file" not in repr(settings) and "from-a-file" not in repr(settings.kafka_connection())
    assert settings.kafka_connection().kafka_python()["sasl_plain_password"] == "from-a-file"
    with pytest.raises(UserError, match="give sasl_password or sasl_password_file, not both") as both:
        build_settings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_username="u",
                       sasl_password="typed", sasl_password_file=str(secret))
    assert "typed" not in str(both.value) and "from-a-file" not in str(both.value)
    with pytest.raises(UserError, match="cannot read sasl_password_file"):
        build_settings(sasl_password_file=str(tmp_path / "missing"))


@pytest.mark.parametrize("text, message", [
    ("[kafka]\nbatch_size = 3\n", "batch_size belongs in [ingest]"),
    ("[kafak]\nbroker = 'x:1'\n", "unknown section [kafak]"),
    ("[ingest]\nbatch_sise = 3\n", "batch_sise: no such setting"),
    ("[ingest]\nbatch_size = \n", "not valid TOML"),
])
def test_a_bad_config_file_is_one_clear_line(tmp_path, clean_env, capsys, text, message):
    config = write(tmp_path / "bad.toml", text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        read_config_file(config)
    assert sparc(["config", "show", "--config", str(config)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("sparc config: error:") and str(config) in line


def test_a_bad_value_in_the_file_names_the_setting(tmp_path, clean_env):
    with pytest.raises(UserError, match="bad setting batch_size"):
        build_settings(write(tmp_path / "bad.toml", "[ingest]\nbatch_size = 0\n"))
    with pytest.raises(UserError, match="cannot read the config file"):
        build_settings(tmp_path / "missing.toml")


def test_every_section_names_real_settings_once():
    fields = set(WorkerSettings.model_fields)
    named = [name for names in SECTIONS.values() for name in names]
    assert len(named) == len(set(named))
    assert set(named) <= fields, set(named) - fields
    assert section_of("no_such_field") == "worker"


@pytest.mark.parametrize("given, message", [
    (dict(security_protocol="SASL_SSL"), "SASL_SSL needs sasl_mechanism, sasl_username, sasl_password"),
    (dict(sasl_username="u"), "sasl_\\* settings are given but security_protocol is PLAINTEXT"),
    (dict(ssl_cafile="/x.pem"), "ssl_cafile given but security_protocol is PLAINTEXT"),
    (dict(security_protocol="SSL", ssl_certfile="/c.pem"), "needs both ssl_certfile and ssl_keyfile"),
    (dict(security_protocol="SASL_SSL", sasl_mechanism="GSSAPI", sasl_username="u", sasl_password="p"),
     "sasl_mechanism"),
])
def test_inconsistent_security_settings_are_one_line(clean_env, given, message):
    with pytest.raises(UserError, match=message):
        build_settings(**given)


def test_bootstrap_forms():
    assert parse_bootstrap("kafka://h:1;kafka://g:2/") == ["h:1", "g:2"]
    with pytest.raises(KafkaConfigError, match="not host:port"):
        parse_bootstrap("h:1,kafka:/g:2")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and a client key + certificate made with openssl, as an operator's files would be."""
    d = tmp_path_factory.mktemp("pki")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *args: subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", CA_SUBJECT)
    run("req", *ec, "-keyout", "client.key", "-out", "client.csr", "-subj", "/CN=client")
    run("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "client.pem", "-days", "2")
    return d


def test_adapters_for_faust_and_kafka_python_share_one_tls_context(pki):
    conn = KafkaConnection(bootstrap_servers=("b:9093",), security_protocol="SASL_SSL",
                           sasl_mechanism="SCRAM-SHA-256", sasl_username="svc", sasl_password="pw",
                           ssl_cafile=pki / "ca.pem", ssl_certfile=pki / "client.pem", ssl_keyfile=pki / "client.key")
    credentials = conn.faust_credentials()
    assert isinstance(credentials, faust.SASLCredentials)
    assert credentials.mechanism.value == "SCRAM-SHA-256" and credentials.protocol.value == "SASL_SSL"
    assert credentials.ssl_context.verify_mode == ssl.CERT_REQUIRED and credentials.ssl_context.check_hostname
    config = conn.kafka_python()
    assert config["security_protocol"] == "SASL_SSL" and config["sasl_plain_password"] == "pw"
    assert config["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert "pw" not in repr(conn) and "pw" not in conn.describe()

    tls = KafkaConnection(bootstrap_servers=("b:9093",), security_protocol="SSL", ssl_cafile=pki / "ca.pem",
                          ssl_check_hostname=False)
    assert isinstance(tls.faust_credentials(), faust.SSLCredentials)
    assert tls.kafka_python()["ssl_context"].check_hostname is False
    assert KafkaConnection(bootstrap_servers=("b:9092",)).faust_credentials() is None
    assert "ssl_context" not in KafkaConnection(bootstrap_servers=("b:9092",)).kafka_python()


def test_unreadable_tls_files_are_one_line(pki, tmp_path):
    missing = KafkaConnection(bootstrap_servers=("b:1",), security_protocol="SSL", ssl_cafile=tmp_path / "no.pem")
    with pytest.raises(KafkaConfigError, match="cannot load the TLS files.*no.pem"):
        missing.ssl_context()
    swapped = KafkaConnection(bootstrap_servers=("b:1",), security_protocol="SSL", ssl_cafile=pki / "ca.pem",
                              ssl_certfile=pki / "client.key", ssl_keyfile=pki / "client.pem")
    with pytest.raises(KafkaConfigError, match="cannot load the TLS files"):
        swapped.ssl_context()


def test_the_worker_app_gets_the_credentials(tmp_path, pki, clean_env):
    from streams.app import create_app

    settings = WorkerSettings(data_dir=tmp_path, security_protocol="SSL", ssl_cafile=pki / "ca.pem")
    app = create_app(settings)
    assert isinstance(app.conf.broker_credentials, faust.SSLCredentials)
