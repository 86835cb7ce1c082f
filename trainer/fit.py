"""Offline training with early stopping on validation NDCG@10 (the loop behind `sparc evaluate` / `sparc train`)."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from trainer.batches import bucketed_batches
from trainer.config import TrainConfig
from trainer.step import Trainer


@dataclass
class FitResult:
    epochs: int
    best_epoch: int
    best_valid: float
    seconds: float
    stopped: str  # "patience", "max_epochs" or "time budget"


def fit(
    model: nn.Module,
    sequences: list[np.ndarray],
    max_len: int,
    cfg: TrainConfig,
    validate: Callable[[], float],
    desc: str = "train",
    progress: bool = True,
    device: str | torch.device = "cpu",
) -> FitResult:
    """Train until validation (higher is better) stops improving; the best weights are restored at the end.
    The model trains on `device` (trainer.device) and stays there. `validate` runs with the model in eval mode
    (no dropout); the model is left in eval mode."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    trainer = Trainer(model, cfg, device)

    def validate_in_eval_mode() -> float:  # no dropout while validating; Trainer.step switches back to training
        model.eval()
        return validate()

    best, best_epoch, best_state, bad = -1.0, 0, copy.deepcopy(model.state_dict()), 0
    start = time.perf_counter()
    stopped, epoch = "max_epochs", 0
    bar = tqdm(total=cfg.max_epochs, desc=desc, unit="epoch", disable=not progress, leave=False)
    for epoch in range(1, cfg.max_epochs + 1):
        losses = [trainer.step(b)["loss"] for b in bucketed_batches(sequences, cfg.batch_size, max_len, rng)]
        bar.update(1)
        postfix = {"loss": f"{np.mean(losses):.3f}"}
        if epoch % cfg.eval_every == 0:
            score = validate_in_eval_mode()
            postfix["valid"] = f"{score:.4f}"
            if score > best:
                best, best_epoch, bad = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
            if bad >= cfg.patience:
                stopped = "patience"
        bar.set_postfix(postfix)
        if stopped == "patience":
            break
        if time.perf_counter() - start > cfg.max_seconds:
            stopped = "time budget"
            break
    bar.close()
    if best < 0:  # never validated (tiny max_epochs): keep the last weights
        best, best_epoch = validate_in_eval_mode(), epoch
    else:
        model.load_state_dict(best_state)
    model.eval()
    return FitResult(epochs=epoch, best_epoch=best_epoch, best_valid=best, seconds=time.perf_counter() - start,
                     stopped=stopped)
