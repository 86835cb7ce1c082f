"""`sparc worker`: run the streaming worker (Faust) in this process until SIGINT/SIGTERM.

Every setting of streams.settings.WorkerSettings can also come from the environment as SPARC_<FIELD>
(e.g. SPARC_FEEDBACK_TOPIC, SPARC_CODES) or from a TOML file (--config); flags win over the environment, the
environment over the file (`sparc config show` prints what results).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparc_stream.cli.device import add_device_flag, check_device
from sparc_stream.cli.errors import UserError

# flag -> WorkerSettings field
FLAGS = {
    "broker": "broker",
    "store": "store_url",
    "web_host": "web_host",
    "web_port": "web_port",
    "log_format": "log_format",
    "log_level": "log_level",
    "data_dir": "data_dir",
    "batch_size": "batch_size",
    "app_id": "app_id",
    "partitions": "partitions",
    "snapshot_every_steps": "snapshot_every_steps",
    "snapshot_every_seconds": "snapshot_every_seconds",
    "warm_start": "warm_start",
    "on_corrupt": "on_corrupt",
    "processed_log": "processed_log",
    "device": "device",
    "signing_key": "signing_key",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run the streaming worker: ingest feedback from Kafka, train online, publish snapshots, serve",
        description="Consume feedback-events and item-events, train SPARC online in micro-batches, publish "
        "health-gated snapshots to the codebook store and codebook-updates, and serve /retrieve, "
        "/snapshots/latest, /health, /livez, /readyz and /metrics over HTTP. Other settings, Kafka security "
        "included: a TOML file (--config) or SPARC_<FIELD> environment variables (streams/settings.py; `sparc "
        "config show` lists them).",
    )
    add_config_argument(p)
    p.add_argument("--broker", help="Kafka bootstrap servers host:port[,host:port] or kafka://host:port "
                   "(default 127.0.0.1:39092)")
    p.add_argument(
        "--store",
        help="codebook store URL: rocksdb://PATH, file://DIR or memory:// "
        "(default rocksdb://./state/snapshots)",
    )
    p.add_argument("--web-host", help="address the web server binds (default 127.0.0.1; 0.0.0.0 in a container)")
    p.add_argument("--web-port", type=int, help="HTTP port (default 6066)")
    p.add_argument("--log-format", choices=["text", "json"], help="log lines as text or JSON (default text)")
    p.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], type=str.upper,
                   help="lowest level logged (default INFO)")
    p.add_argument("--data-dir", type=Path, help="Faust table state directory (default ./state/faust)")
    p.add_argument("--batch-size", type=int, help="training micro-batch size (default 64)")
    p.add_argument("--app-id", help="Faust app id = consumer group (default sparc-worker)")
    p.add_argument("--partitions", type=int, help="partitions of the feedback topic and tables (default 4)")
    p.add_argument("--snapshot-every-steps", type=int, help="publish every N training steps (default 200)")
    p.add_argument("--snapshot-every-seconds", type=float, help="... or every T seconds (default 60)")
    p.add_argument(
        "--warm-start",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start from the store's latest snapshot of the model when there is one: its weights, step count and "
        "train position (default on; --no-warm-start: a fresh model, versions still continue from the store's)",
    )
    p.add_argument(
        "--on-corrupt",
        choices=("fallback", "refuse"),
        help="a warm start whose latest snapshot fails verification: fall back to the newest earlier version that "
        "verifies and passed the health gate, rolling latest back to it with a warning naming the bad one "
        "(default), or refuse to start",
    )
    p.add_argument(
        "--processed-log",
        type=Path,
        help="append a JSON line per learnt micro-batch (event ids, train offsets) and per start to this file",
    )
    add_device_flag(p, default=None)
    p.add_argument(
        "--signing-key",
        type=Path,
        help="sign every codebook update with this key file: an Ed25519 private key (PEM) or an HMAC-SHA256 shared "
        "key (32+ raw bytes); see docs/codebook-updates.md (default: unsigned)",
    )
    p.set_defaults(func=run)


def add_config_argument(p: argparse.ArgumentParser, help: str | None = None) -> None:
    p.add_argument("--config", type=Path, metavar="FILE",
                   help=help or "TOML settings file ([kafka], [topics], [web], ... sections; `sparc config show` "
                   "prints one); SPARC_<FIELD> environment variables and flags override it")


def build_settings(config: Path | None = None, **given):
    """WorkerSettings from the given values (None: not given), the environment, the config file and the
    defaults, in that order; bad -> UserError (one line, never a secret's value)."""
    from pydantic import ValidationError

    from streams.settings import ConfigError, WorkerSettings

    try:
        return WorkerSettings.load(config, **{k: v for k, v in given.items() if v is not None})
    except ConfigError as exc:
        raise UserError(str(exc)) from None
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise UserError(f"bad setting {where}: {message}" if where else f"bad settings: {message}") from None


def run(args: argparse.Namespace) -> int:
    from codebook_store import CodebookStoreError
    from streams.kafka_connection import KafkaConfigError
    from streams.logs import setup_logging
    from streams.topics import TopicError, ensure_topics
    from streams.worker import StreamWorker

    settings = build_settings(args.config, **{field: getattr(args, flag) for flag, field in FLAGS.items()})
    check_device(settings.device)
    setup_logging(settings.log_format, settings.log_level)  # before the topics: their warnings are logged
    try:
        replication = ensure_topics(settings)
        worker = StreamWorker(settings.model_copy(update={"replication_factor": replication}))
    except (TopicError, KafkaConfigError, CodebookStoreError) as exc:
        raise UserError(str(exc)) from None
    return worker.run()
