"""Turning item sequences into training batches (pure tensors, no I/O)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch


@dataclass
class Batch:
    """Right-padded next-item prediction batch.

    inputs  (B, T) int64: items, zeros after each sequence's end
    targets (B, T) int64: the next item at each position, 0 where there is none
    lengths (B,)   int64: number of real input items per row
    length_buckets: encode the rows per length bucket (CausalEncoder.forward_in_buckets: the same states, less
                    padding work) rather than as one (B, T) grid. Worth it when lengths vary widely within the
                    batch (online batches); offline batches are already grouped by length and keep one grid.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    lengths: torch.Tensor
    length_buckets: bool = False

    @property
    def size(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device) -> Batch:
        """The batch with its tensors on `device`."""
        return replace(self, inputs=self.inputs.to(device), targets=self.targets.to(device),
                       lengths=self.lengths.to(device))


def pad_histories(histories: list[np.ndarray], max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Histories -> (B, T) right-padded last `max_len` items and lengths (B,). T = the batch's longest."""
    cut = [h[-max_len:] for h in histories]
    lengths = np.fromiter((len(h) for h in cut), dtype=np.int64, count=len(cut))
    out = np.zeros((len(cut), max(int(lengths.max(initial=1)), 1)), dtype=np.int64)
    for row, h in enumerate(cut):
        out[row, : len(h)] = h
    return torch.from_numpy(out), torch.from_numpy(lengths)


def make_batch(sequences: list[np.ndarray], max_len: int) -> Batch:
    """Each sequence (>= 2 items) gives inputs seq[:-1] and targets seq[1:], keeping the last `max_len` steps."""
    inputs, lengths = pad_histories([s[:-1] for s in sequences], max_len)
    targets, _ = pad_histories([s[1:] for s in sequences], max_len)
    return Batch(inputs=inputs, targets=targets, lengths=lengths)


def bucketed_batches(
    sequences: list[np.ndarray], batch_size: int, max_len: int, rng: np.random.Generator
) -> list[Batch]:
    """One epoch of batches of similar-length sequences (less padding), in random order.

    Sequences shorter than 2 items carry no target and are skipped. Lengths are jittered before sorting so the
    batches differ from epoch to epoch.
    """
    usable = [s for s in sequences if len(s) >= 2]
    keys = np.array([min(len(s), max_len + 1) for s in usable], dtype=np.float64) + rng.random(len(usable))
    order = np.argsort(keys)
    batches = [
        make_batch([usable[i] for i in order[start : start + batch_size]], max_len)
        for start in range(0, len(order), batch_size)
    ]
    rng.shuffle(batches)
    return batches
