"""The one `sparc` command. Each subcommand lives in its own module of this package and registers itself here."""

from __future__ import annotations

import argparse
import sys

from sparc_stream.cli import allocator, errors


def build_parser() -> argparse.ArgumentParser:
    from sparc_stream.cli import config, demo, evaluate, kafka, produce, replay, snapshots, subscribe, train, worker

    parser = argparse.ArgumentParser(
        prog="sparc",
        description="SPARC streaming retrieval: train, evaluate, replay and serve multi-interest codebooks.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in (demo, evaluate, train, kafka, snapshots, worker, produce, replay, subscribe, config):
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    allocator.tune_allocator()  # before anything allocates much (sparc_stream/cli/allocator.py says why)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except errors.UserError as exc:  # bad input from the user: one readable line, no traceback
        print(f"sparc {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sparc {args.command}: interrupted", file=sys.stderr)
        return 130
    except ModuleNotFoundError as exc:  # a slim install (README "Subscribing"): name the extra the command needs
        extra = errors.extra_providing(exc.name)
        if extra is None:
            raise
        print(f"sparc {args.command}: error: this command needs the {extra} install (pip install "
              f"'sparc-stream[{extra}]'); {exc.name!r} is missing", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
