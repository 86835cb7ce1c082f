"""`sparc worker`: run the streaming worker (Faust) in this process until SIGINT/SIGTERM.

Every setting of streams.settings.WorkerSettings can also come from the environment as SPARC_<FIELD>
(e.g. SPARC_FEEDBACK_TOPIC, SPARC_CODES); the flags here win over the environment.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from cli.errors import UserError

# flag -> WorkerSettings field
FLAGS = {
    "broker": "broker",
    "store": "store_url",
    "web_port": "web_port",
    "data_dir": "data_dir",
    "batch_size": "batch_size",
    "app_id": "app_id",
    "partitions": "partitions",
    "snapshot_every_steps": "snapshot_every_steps",
    "snapshot_every_seconds": "snapshot_every_seconds",
    "warm_start": "warm_start",
    "processed_log": "processed_log",
    "signing_key": "signing_key",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="run the streaming worker: ingest feedback from Kafka, train online, publish snapshots, serve",
        description="Consume feedback-events and item-events, train SPARC online in micro-batches, publish "
        "health-gated snapshots to the codebook store and codebook-updates, and serve /retrieve, "
        "/snapshots/latest, /health and /metrics over HTTP. Other settings: SPARC_<FIELD> environment "
        "variables (streams/settings.py).",
    )
    p.add_argument("--broker", help="Kafka bootstrap servers host:port[,host:port] (default 127.0.0.1:39092)")
    p.add_argument(
        "--store",
        help="codebook store URL: rocksdb://PATH, file://DIR or memory:// "
        "(default rocksdb://./state/snapshots)",
    )
    p.add_argument("--web-port", type=int, help="HTTP port (default 6066)")
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
        "--processed-log",
        type=Path,
        help="append a JSON line per learnt micro-batch (event ids, train offsets) and per start to this file",
    )
    p.add_argument(
        "--signing-key",
        type=Path,
        help="sign every codebook update with this key file: an Ed25519 private key (PEM) or an HMAC-SHA256 shared "
        "key (32+ raw bytes); see docs/codebook-updates.md (default: unsigned)",
    )
    p.set_defaults(func=run)


def build_settings(**given):
    """WorkerSettings from the given values (None: not given, so environment or default); bad -> UserError."""
    from pydantic import ValidationError

    from streams.settings import WorkerSettings

    try:
        return WorkerSettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        raise UserError(f"bad setting {where}: {first['msg']}") from None


def run(args: argparse.Namespace) -> int:
    from codebook_store import CodebookStoreError
    from streams.topics import TopicError, ensure_topics
    from streams.worker import StreamWorker

    settings = build_settings(**{field: getattr(args, flag) for flag, field in FLAGS.items()})
    try:
        ensure_topics(settings)
    except TopicError as exc:
        raise UserError(str(exc)) from None
    try:
        worker = StreamWorker(settings)
    except CodebookStoreError as exc:
        raise UserError(str(exc)) from None
    return worker.run()
