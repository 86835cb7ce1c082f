"""`sparc serve`: a serving replica until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from sparc_stream.cli.worker import add_role_flags, start_role


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run a serving replica: follow the store's latest snapshot and answer /retrieve",
        description="Follows the store's latest snapshot (every follow_seconds; the store opened read-only), "
        "builds its own index and answers GET /retrieve/{user} (the user's history from a copy of the history "
        "table, read from its changelog) and POST /retrieve (the recent items in the body). Start M of them. "
        "Every answer names the snapshot version that served it. README, Running at scale.",
    )
    add_role_flags(p, "serve")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.roles import ServeNode

    return start_role(args, "serve", ServeNode, topics=[])
