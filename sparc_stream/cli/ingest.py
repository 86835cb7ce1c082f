"""`sparc ingest`: the ingest role (N replicas in one consumer group) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from sparc_stream.cli.worker import add_role_flags, start_role


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "ingest",
        help="run an ingest replica: validate, de-duplicate and forward feedback to the train topic",
        description="A Faust process of the ingest role; start N of them with one --app-id: they share the "
        "feedback partitions (a consumer group). Each validates feedback (invalid events to the DLQ with the "
        "reason), re-keys records read outside their user's partition through the repartition topic, "
        "de-duplicates by event id against the user-history table (RocksDB + changelog; standby copies: "
        "table_standby_replicas) and sends one train message per micro-batch and train partition. Serves "
        "/health, /livez, /readyz and /metrics. README, Running at scale.",
    )
    add_role_flags(p, "ingest")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.worker import StreamWorker

    return start_role(args, "ingest", lambda settings: StreamWorker(settings, learn=False, serve=False))
