"""The --device flag of the commands that train (train, evaluate, replay, worker): where the model learns."""

from __future__ import annotations

import argparse

from sparc_stream.cli.errors import UserError

HELP = ("where the model trains: cpu, cuda[:N] or auto (cuda when torch sees a GPU, else cpu) (default cpu: "
        "results reproduce bit for bit only on the CPU; snapshots hold CPU tensors either way)")


def add_device_flag(p: argparse.ArgumentParser, default: str | None = "cpu") -> None:
    p.add_argument("--device", default=default, metavar="auto|cpu|cuda", help=HELP)


def check_device(name: str):
    """The torch.device for `name`, or UserError (one line) for an unknown one or cuda without a GPU."""
    from trainer.device import resolve_device

    try:
        return resolve_device(name)
    except ValueError as exc:
        raise UserError(str(exc)) from None
