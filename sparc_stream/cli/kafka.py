"""`sparc kafka start|status|stop`: the project's local Apache Kafka broker (wraps deploy/kafka/broker.sh).

The script's output passes straight through and its exit code is the command's: progress on stderr, the
bootstrap address as the last line of stdout for `start` and `status`.
"""

from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from sparc_stream.cli.errors import UserError

# deploy/ is part of a source checkout, not of the installed package (README "Install")
BROKER_SH = Path(__file__).resolve().parents[2] / "deploy" / "kafka" / "broker.sh"

_DESCRIPTION = """\
A real, single-node Apache Kafka 4 broker (KRaft: broker and controller in one JVM) on 127.0.0.1, for tests
and local runs. Needs Java 17+; the first start fetches the broker's jars from Maven Central with Maven
(once per machine, cached in ${SPARC_CACHE:-~/.cache/sparc-stream}/kafka-<hash>/).

Listens on 127.0.0.1:39092 (PLAINTEXT; controller on 39093). Environment: SPARC_KAFKA_PORT,
SPARC_KAFKA_CONTROLLER_PORT, SPARC_KAFKA_DIR (config, pid, logs and data; default
~/.cache/sparc-stream/kafka-run), SPARC_KAFKA_START_TIMEOUT, SPARC_KAFKA_STOP_TIMEOUT.
SPARC_KAFKA_SECURITY=sasl_ssl adds a SASL_SSL listener (PLAIN/SCRAM users) on 39094 and an SSL listener with
client certificates on 39095, certificates made by openssl (`broker.sh client-config` says how to connect).
Details: deploy/kafka/README.md."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "kafka",
        help="start, check or stop the project's local Kafka broker (127.0.0.1:39092)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    actions = p.add_subparsers(dest="kafka_command", metavar="ACTION", required=True)

    start = actions.add_parser(
        "start",
        help="start the broker detached and wait until it answers; prints the bootstrap address last",
        description="Start the broker in the background (a no-op if it already runs and answers), wait until "
                    "its log says 'Kafka Server started' and an admin client call answers, then print the "
                    "bootstrap address (e.g. 127.0.0.1:39092) as the last line of stdout.",
    )
    start.set_defaults(func=run_start)

    status = actions.add_parser(
        "status",
        help="exit 0 and print the address if the broker runs and answers, non-zero otherwise",
        description="Check that the broker process is alive and answers an admin client call.",
    )
    status.set_defaults(func=run_status)

    stop = actions.add_parser(
        "stop",
        help="stop the broker (SIGTERM, then SIGKILL after 20 s) and delete its data",
        description="Stop the broker: SIGTERM, then SIGKILL if it has not exited after "
                    "SPARC_KAFKA_STOP_TIMEOUT seconds (default 20). Its data directory is deleted, so the "
                    "next start is a fresh, empty broker, unless --keep-data is given.",
    )
    stop.add_argument("--keep-data", action="store_true", help="keep topics and records for the next start")
    stop.set_defaults(func=run_stop)


def run_start(args: argparse.Namespace) -> int:
    return run_broker_sh("start")


def run_status(args: argparse.Namespace) -> int:
    return run_broker_sh("status")


def run_stop(args: argparse.Namespace) -> int:
    return run_broker_sh("stop", *(["--keep-data"] if args.keep_data else []))


def run_broker_sh(*argv: str) -> int:
    """Run deploy/kafka/broker.sh with `argv`, its output passed through; returns its exit code."""
    if not BROKER_SH.is_file():
        raise UserError("needs a source checkout of sparc-stream (it runs deploy/kafka/broker.sh, which the "
                        "installed package does not ship); run it from a clone with an editable install")
    return subprocess.run(["bash", str(BROKER_SH), *argv], check=False).returncode
