"""`sparc learn`: the learner role (one process, or one rank of a data-parallel group) until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse

from sparc_stream.cli.worker import add_role_flags, start_role


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "learn",
        help="run the learner: train on the train topic, publish health-gated snapshots (the one writer)",
        description="Reads every train partition (with --world-size K, rank R reads the partitions p with p mod "
        "K == R, and the ranks take every step together through torch.distributed: gloo on CPUs, nccl on "
        "GPUs) and item-events, trains, and publishes snapshots to the store and codebook-updates (rank 0), "
        "then commits the train positions each snapshot has learnt. It claims the model in the store at start: "
        "a learner started later fences this one, which then stops with the reason. Serves /snapshots/latest, "
        "/health, /livez, /readyz and /metrics. README, Running at scale.",
    )
    add_role_flags(p, "learn")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from streams.roles import LearnNode

    return start_role(args, "learn", LearnNode)
