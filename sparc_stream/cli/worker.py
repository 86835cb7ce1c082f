"""`sparc worker`: the one-process worker (ingest, the learner and serving in one process) until SIGINT/SIGTERM.

Every setting of streams.settings.WorkerSettings can also come from the environment as SPARC_<FIELD>
(e.g. SPARC_FEEDBACK_TOPIC, SPARC_CODES) or from a TOML file (--config); flags win over the environment, the
environment over the file (`sparc config show` prints what results). The scale-out roles (`sparc ingest`,
`sparc learn`, `sparc serve`) take the same settings and the flags that apply to them (ROLE_FLAGS).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from sparc_stream.cli.device import HELP as DEVICE_HELP
from sparc_stream.cli.device import check_device
from sparc_stream.cli.errors import UserError

# flag -> (WorkerSettings field, add_argument keywords)
FLAGS: dict[str, tuple[str, dict]] = {
    "broker": ("broker", {"help": "Kafka bootstrap servers host:port[,host:port] or kafka://host:port (default "
                          "127.0.0.1:39092)"}),
    "store": ("store_url", {"help": "codebook store URL: rocksdb://PATH, file://DIR or memory:// (default "
                            "rocksdb://./state/snapshots)"}),
    "web_host": ("web_host", {"help": "address the web server binds (default 127.0.0.1; 0.0.0.0 in a container)"}),
    "web_port": ("web_port", {"type": int, "help": "HTTP port (default 6066)"}),
    "log_format": ("log_format", {"choices": ["text", "json"], "help": "log lines as text or JSON (default text)"}),
    "log_level": ("log_level", {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"], "type": str.upper,
                                "help": "lowest level logged (default INFO)"}),
    "data_dir": ("data_dir", {"type": Path, "help": "local state directory: Faust's tables, a serve replica's "
                              "history copy (default ./state/faust)"}),
    "batch_size": ("batch_size", {"type": int, "help": "micro-batch: feedback messages ingest forwards at a time, "
                                  "events a learner (rank) trains on per step (default 64)"}),
    "app_id": ("app_id", {"help": "Faust app id = ingest's consumer group; prefixes the internal topics "
                          "(default sparc-worker)"}),
    "partitions": ("partitions", {"type": int, "help": "partitions of the feedback topic and tables (default 4)"}),
    "train_partitions": ("train_partitions", {"type": int, "help": "partitions of the train topic (default: "
                                              "--partitions)"}),
    "group_instance_id": ("group_instance_id", {"help": "static group membership: this process's unique, stable "
                                                "id in the consumer group (e.g. the pod name); a restart under "
                                                "it keeps its partitions without a rebalance"}),
    "snapshot_every_steps": ("snapshot_every_steps", {"type": int, "help": "publish every N training steps "
                                                      "(default 200)"}),
    "snapshot_every_seconds": ("snapshot_every_seconds", {"type": float, "help": "... or every T seconds "
                                                          "(default 60)"}),
    "warm_start": ("warm_start", {
        "action": argparse.BooleanOptionalAction, "default": None,
        "help": "start from the store's latest snapshot of the model when there is one: its weights, step count "
        "and train positions (default on; --no-warm-start: a fresh model, versions still continue from the "
        "store's)"}),
    "on_corrupt": ("on_corrupt", {
        "choices": ("fallback", "refuse"),
        "help": "a warm start whose latest snapshot fails verification: fall back to the newest earlier version "
        "that verifies and passed the health gate, rolling latest back to it with a warning naming the bad one "
        "(default), or refuse to start"}),
    "processed_log": ("processed_log", {"type": Path, "help": "append a JSON line per learnt step (event ids, "
                                        "train offsets) and per start to this file"}),
    "device": ("device", {"metavar": "auto|cpu|cuda", "help": DEVICE_HELP}),
    "signing_key": ("signing_key", {
        "type": Path, "help": "sign every codebook update with this key file: an Ed25519 private key (PEM) or an "
        "HMAC-SHA256 shared key (32+ raw bytes); see docs/codebook-updates.md (default: unsigned)"}),
    "world_size": ("world_size", {"type": int, "help": "learner processes training the model together "
                                  "(torch.distributed; default 1)"}),
    "rank": ("rank", {"type": int, "help": "this learner's rank in [0, world-size) (default 0); rank 0 publishes"}),
    "dist_url": ("dist_url", {"help": "where the ranks meet: tcp://HOST:PORT of rank 0, or env:// (MASTER_ADDR, "
                              "MASTER_PORT; default env://)"}),
    "exploration": ("exploration", {
        "action": argparse.BooleanOptionalAction, "default": None,
        "help": "/retrieve's exploration slots (default on): in a list of more than 15 items the slots after the "
        "first 15 go to what the user takes unusually often for its popularity, p(i|u) / q(i)^0.5 (discovery at "
        "no cost to the first 15; settings exploit and lift, README 'Discovery'); --no-exploration: plain soft "
        "search, as before"}),
}
COMMON = ("broker", "web_host", "web_port", "log_format", "log_level", "app_id", "partitions")
LEARNER = ("store", "train_partitions", "batch_size", "snapshot_every_steps", "snapshot_every_seconds",
           "warm_start", "on_corrupt", "processed_log", "device", "signing_key")
ROLE_FLAGS = {
    "worker": (*COMMON, *LEARNER, "data_dir", "group_instance_id", "exploration"),
    "ingest": (*COMMON, "train_partitions", "data_dir", "batch_size", "group_instance_id"),
    "learn": (*COMMON, *LEARNER, "world_size", "rank", "dist_url"),
    "serve": (*COMMON, "store", "data_dir", "exploration"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run the one-process worker: ingest feedback from Kafka, train online, publish snapshots, serve",
        description="Consume feedback-events and item-events, train SPARC online in micro-batches, publish "
        "health-gated snapshots to the codebook store and codebook-updates, and serve /retrieve, "
        "/snapshots/latest, /health, /livez, /readyz and /metrics over HTTP: the three roles (`sparc ingest`, "
        "`sparc learn`, `sparc serve`) in one process. Other settings, Kafka security included: a TOML file "
        "(--config) or SPARC_<FIELD> environment variables (streams/settings.py; `sparc config show` lists them). "
        "Discovery (README 'Discovery and stable interests'): /retrieve has exploration slots by default "
        "(--no-exploration: plain lists, as before); stable interests are opt-in (SPARC_EMA_DECAY=0.99 "
        "SPARC_CODE_HYSTERESIS=3).",
    )
    add_role_flags(p, "worker")
    p.set_defaults(func=run)


def add_role_flags(p: argparse.ArgumentParser, role: str) -> None:
    add_config_argument(p)
    for flag in ROLE_FLAGS[role]:
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, **FLAGS[flag][1])


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


def role_settings(args: argparse.Namespace, role: str):
    """The settings of a role's command line (its flags, then the environment, the config file, defaults)."""
    return build_settings(args.config, **{FLAGS[flag][0]: getattr(args, flag) for flag in ROLE_FLAGS[role]})


def start_role(args: argparse.Namespace, role: str, build: Callable, topics: list[str] | None = None) -> int:
    """What every role's command does: its settings, the device check (a learner), logging, the topics it
    needs (created when missing), then `build(settings)` (a process object with run()); errors one line."""
    from codebook_store import CodebookStoreError
    from streams.kafka_connection import KafkaConfigError
    from streams.learning import RoleFailed
    from streams.logs import setup_logging
    from streams.topics import TopicError, ensure_topics

    settings = role_settings(args, role)
    if "device" in ROLE_FLAGS[role]:
        check_device(settings.device)
    setup_logging(settings.log_format, settings.log_level)  # before the topics: their warnings are logged
    try:
        if topics == []:  # reads only topics others create: check the connection, create nothing
            settings.kafka_connection().check()
            replication = settings.replication_factor
        else:
            replication = ensure_topics(settings, topics)
        process = build(settings.model_copy(update={"replication_factor": replication}))
        return process.run()
    except (TopicError, KafkaConfigError, CodebookStoreError, RoleFailed) as exc:
        raise UserError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    from streams.worker import StreamWorker

    return start_role(args, "worker", StreamWorker)
