"""The training step every caller uses (offline fit, replay, the Kafka worker): `Trainer.step(batch) -> metrics`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from trainer.batches import Batch
from trainer.config import TrainConfig
from trainer.device import resolve_device

if TYPE_CHECKING:
    from trainer.distributed import DataParallel


def finite_gradients(params: list[nn.Parameter]) -> bool:
    """Whether every gradient of `params` is finite (one check for all, one sync on a GPU). A finite loss can have
    NaN gradients (an op with a NaN derivative somewhere in the graph); the optimiser would write them into every
    weight, so a step refuses them as it refuses a NaN loss."""
    grads = [p.grad for p in params if p.grad is not None]
    return not grads or bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


class Trainer:
    """Owns a model and its optimiser, on `device` (trainer.device: the model moves there, batches follow).

    Codebook updates draw from the trainer's own seeded generator (on the CPU, whatever the device); dropout draws
    from torch's global generator (CUDA's on a GPU), so callers seed that (`torch.manual_seed`) for reproducible
    runs, as `fit` does. With `parallel` set (trainer.distributed.DataParallel), every step is taken together with
    the other ranks of its process group.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: str | torch.device = "cpu"):
        self.device = resolve_device(device)
        self.model, self.cfg = model.to(self.device), cfg
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps = 0
        self.parallel: DataParallel | None = None

    def step(self, batch: Batch | None) -> dict:
        """One optimiser step on `batch`, then the codebooks' EMA update (when the model has codebooks). With
        `parallel`: one step of the group (DataParallel.step); batch None = no examples on this rank."""
        if batch is not None:
            batch = batch.to(self.device)
        if self.parallel is not None:
            return self.parallel.step(self, batch)
        self.model.train()
        loss, metrics = self.model.loss(batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.steps}: {metrics}")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not finite_gradients(params):
            self.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient at step {self.steps} under a finite loss: {metrics}")
        self.optimizer.step()
        update = getattr(self.model, "update_codebooks_", None)
        if update is not None:
            metrics.update(update(batch, self.generator))
        self.steps += 1
        metrics["step"] = self.steps
        return metrics

    def grow_items(self, num_items: int, item_attributes: dict[int, list[int]] | None = None) -> None:
        """Grow the model's item table to `num_items` and carry the optimiser state of the grown parameter."""
        tower = self.model.items
        old = tower.id_embedding
        if not getattr(self.model, "grow_", tower.grow_)(num_items, item_attributes):
            return
        new = tower.id_embedding
        state = self.optimizer.state.pop(old, None)
        for group in self.optimizer.param_groups:
            group["params"] = [new if p is old else p for p in group["params"]]
        if state:
            extra = new.shape[0] - old.shape[0]
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.cat([state[key], state[key].new_zeros(extra, *old.shape[1:])])
            self.optimizer.state[new] = state

    def reset_items(self, rows: list[int]) -> None:
        """Rows of the item table handed to other items: reset them in the tower (ItemTower.reset_rows_) and
        clear the optimiser's moments of their ID rows, so the new items start as any new item does."""
        self.model.items.reset_rows_(rows)
        state = self.optimizer.state.get(self.model.items.id_embedding)
        if state and rows:
            idx = torch.as_tensor(rows, dtype=torch.long, device=self.device)
            for key in ("exp_avg", "exp_avg_sq"):
                state[key][idx] = 0.0
