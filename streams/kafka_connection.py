"""How every Kafka client of the project connects: bootstrap servers, security protocol, SASL and TLS.

    conn = settings.kafka_connection()            # streams.settings.WorkerSettings -> KafkaConnection
    faust.App(..., broker_credentials=conn.faust_credentials())        # the worker (aiokafka under Faust)
    KafkaProducer(**conn.kafka_python())                                # produce, replay, the subscriber, admin

One model, two adapters: `faust_credentials()` for Faust/aiokafka and `kafka_python()` for kafka-python. Both
use the same `ssl.SSLContext` (CA file or the system's CAs, optional client certificate and key, hostname
checking on unless turned off), so every client verifies the broker the same way.

Secrets (the SASL password, the client key's password) are `SecretStr`: masked in reprs, `sparc config show` and
errors; they are unwrapped only into the client configuration handed to a Kafka client, which is never logged.
Where they come from (the environment or a file) is streams.settings' business.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, SecretStr, model_validator

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>\d{1,5})$")


class KafkaConfigError(ValueError):
    """A connection setting that cannot work (the message is one line and never holds a secret)."""


def parse_bootstrap(text: str) -> list[str]:
    """Bootstrap servers from `host:port[,host:port]` or Faust's `kafka://host:port[,kafka://host:port]` (`;` also
    separates, as in Faust's URLs). Raises KafkaConfigError naming what is wrong."""
    servers = []
    for part in re.split(r"[,;]", text):
        server = part.strip()
        if server.lower().startswith("kafka://"):
            server = server[len("kafka://"):].rstrip("/")
        match = _HOST_PORT.match(server)
        if not match:
            raise KafkaConfigError(
                f"{part.strip()!r} is not host:port (expected host:port[,host:port] or kafka://host:port)"
            )
        if not 1 <= int(match["port"]) <= 65535:
            raise KafkaConfigError(f"{server!r}: the port must be in 1..65535")
        servers.append(server)
    return servers


class KafkaConnection(BaseModel):
    """Where and how to connect (the fields mirror the Kafka client settings of the same names)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bootstrap_servers: tuple[str, ...]
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True

    @model_validator(mode="after")
    def _consistent(self) -> KafkaConnection:
        if self.sasl:
            missing = [name for name in ("sasl_mechanism", "sasl_username", "sasl_password")
                       if getattr(self, name) is None]
            if missing:
                raise ValueError(f"security_protocol {self.security_protocol} needs {', '.join(missing)}")
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise ValueError(f"sasl_* settings are given but security_protocol is {self.security_protocol} "
                             "(use SASL_SSL or SASL_PLAINTEXT)")
        ssl_files = [name for name in ("ssl_cafile", "ssl_certfile", "ssl_keyfile") if getattr(self, name)]
        if not self.tls and ssl_files:
            raise ValueError(f"{', '.join(ssl_files)} given but security_protocol is {self.security_protocol} "
                             "(use SSL or SASL_SSL)")
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("a client certificate needs both ssl_certfile and ssl_keyfile")
        return self

    @property
    def sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def describe(self) -> str:
        """One line for logs and errors: servers, protocol, mechanism and user (never a secret)."""
        text = f"{','.join(self.bootstrap_servers)} ({self.security_protocol}"
        if self.sasl:
            text += f" {self.sasl_mechanism} as {self.sasl_username!r}"
        return text + ")"

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of SSL / SASL_SSL (None otherwise): the broker's certificate is verified against
        ssl_cafile (or the system's CAs), its host name checked unless ssl_check_hostname is off."""
        if not self.tls:
            return None
        try:
            context = ssl.create_default_context(cafile=str(self.ssl_cafile) if self.ssl_cafile else None)
            context.check_hostname = self.ssl_check_hostname
            if self.ssl_certfile is not None:
                password = self.ssl_key_password.get_secret_value() if self.ssl_key_password else None
                context.load_cert_chain(str(self.ssl_certfile), str(self.ssl_keyfile), password=password)
        except (OSError, ssl.SSLError) as exc:
            raise KafkaConfigError(f"cannot load the TLS files (ssl_cafile={self.ssl_cafile}, ssl_certfile="
                                   f"{self.ssl_certfile}, ssl_keyfile={self.ssl_keyfile}): {_reason(exc)}") from None
        return context

    def faust_credentials(self) -> Any:
        """Faust's broker_credentials: SASLCredentials (with the TLS context for SASL_SSL), SSLCredentials, or
        None for PLAINTEXT."""
        import faust

        context = self.ssl_context()
        if self.sasl:
            assert self.sasl_password is not None
            return faust.SASLCredentials(username=self.sasl_username, password=self.sasl_password.get_secret_value(),
                                         ssl_context=context, mechanism=self.sasl_mechanism)
        return faust.SSLCredentials(context) if context is not None else None

    def check(self, timeout_s: float = 15.0) -> None:
        """Connect and authenticate to a bootstrap server, as the worker's client (aiokafka) does; raises
        KafkaConfigError with the broker's own reason (a refused connection, a certificate that does not verify,
        "Invalid username or password") when none accepts. The Kafka clients themselves only retry until
        they time out ("Unable to bootstrap"), so a command checks first and fails in one clear line."""
        import asyncio

        from aiokafka.conn import create_conn

        context = self.ssl_context()
        password = self.sasl_password.get_secret_value() if self.sasl_password else None

        async def attempt() -> list[str]:
            reasons = []
            for server in self.bootstrap_servers:
                host, _, port = server.rpartition(":")
                try:
                    conn = await asyncio.wait_for(create_conn(
                        host.strip("[]"), int(port), client_id="sparc-check", request_timeout_ms=int(timeout_s * 1000),
                        ssl_context=context, security_protocol=self.security_protocol,
                        sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                        sasl_plain_password=password,
                    ), timeout_s)
                except Exception as exc:  # each server's reason is reported; the next may answer
                    reasons.append(f"{server}: {_reason(exc)}")
                    continue
                conn.close()
                return []
            return reasons

        reasons = asyncio.run(attempt())
        if reasons:
            raise KafkaConfigError(f"cannot connect to Kafka at {self.describe()}: {'; '.join(reasons)}")

    def kafka_python(self) -> dict[str, Any]:
        """Keyword arguments for kafka-python's KafkaProducer, KafkaConsumer and KafkaAdminClient."""
        config: dict[str, Any] = {
            "bootstrap_servers": list(self.bootstrap_servers),
            "security_protocol": self.security_protocol,
        }
        context = self.ssl_context()
        if context is not None:
            config["ssl_context"] = context
            config["ssl_check_hostname"] = self.ssl_check_hostname
        if self.sasl:
            assert self.sasl_password is not None
            config.update(sasl_mechanism=self.sasl_mechanism, sasl_plain_username=self.sasl_username,
                          sasl_plain_password=self.sasl_password.get_secret_value())
        return config


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror}: {exc.filename}"
    if isinstance(exc, TimeoutError):
        return "no answer (timed out)"
    cause = exc.__cause__ or exc.__context__
    text = str(exc) or type(exc).__name__
    if cause is not None and str(cause) and str(cause) not in text:  # e.g. the TLS error under a connection error
        text += f" ({cause})"
    return " ".join(text.split())
