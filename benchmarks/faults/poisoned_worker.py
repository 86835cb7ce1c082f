"""`sparc worker` with a poisoned-batch hook, for the fault suite's NaN scenario only.

    python -m benchmarks.faults.poisoned_worker worker --broker ... (the flags of `sparc worker`)

This module is not part of `sparc`: nothing in sparc_stream/, streams/ or trainer/ imports it, no setting or
environment variable turns it on, so a production worker cannot poison itself by accident. Run as a module it wraps
two methods, then runs `sparc` exactly as sparc_stream.cli.main does (the real worker: Kafka, the learner thread,
the trainer's checks, the health gate, the store, codebook-updates):
  - OnlineLearner.learn notes, for the length of the call, whether the micro-batch holds an event whose id
    starts with NAN_GRADIENT or NAN_LOSS;
  - SparcModel.loss then poisons that batch's loss: NAN_GRADIENT leaves its value finite but makes every gradient
    NaN on the way back (what a NaN derivative somewhere in the graph does); NAN_LOSS makes its value NaN.
Everything else, the poisoned batch's own events included, goes through the real path.
"""

from __future__ import annotations

import sys
import threading

import torch

NAN_GRADIENT = "poison-nan-gradient-"
NAN_LOSS = "poison-nan-loss-"


class _NanGradient(torch.autograd.Function):
    """The identity forward; NaN backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad * float("nan")


def install() -> None:
    """Wrap OnlineLearner.learn and SparcModel.loss (module doc)."""
    from trainer.model import SparcModel
    from trainer.online import OnlineLearner

    poison = threading.local()  # the learner thread's current batch's poison, if any
    learn, loss = OnlineLearner.learn, SparcModel.loss

    def poisoned_learn(self, events, histories):
        ids = [str(e.get("event_id", "")) for e in events]
        poison.kind = next((p for p in (NAN_GRADIENT, NAN_LOSS) if any(i.startswith(p) for i in ids)), None)
        try:
            return learn(self, events, histories)
        finally:
            poison.kind = None

    def poisoned_loss(self, batch):
        value, metrics = loss(self, batch)
        kind = getattr(poison, "kind", None)
        if kind == NAN_GRADIENT:
            value = _NanGradient.apply(value)
        elif kind == NAN_LOSS:
            value = value * float("nan")
        return value, metrics

    OnlineLearner.learn = poisoned_learn
    SparcModel.loss = poisoned_loss


if __name__ == "__main__":
    install()
    from sparc_stream.cli.main import main

    sys.exit(main())
