"""Baselines evaluated in the same harness as SPARC: SASRec, ComiRec-SA and popularity."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainer.batches import Batch
from trainer.config import EncoderConfig
from trainer.losses import full_softmax_ce
from trainer.towers import CausalEncoder, ItemTower


def _mask_padding(logits: torch.Tensor) -> torch.Tensor:
    logits = logits.clone()
    logits[..., 0] = -math.inf
    return logits


class SASRec(nn.Module):
    """Self-attentive sequential recommendation (Kang & McAuley 2018) with full-softmax cross-entropy.

    One user vector h (the encoder's last state); score = h . e_i with the item table shared between input and
    output. Item ids only (no attributes), as in the reference runs of measured-here.md.
    """

    def __init__(self, num_items: int, cfg: EncoderConfig):
        super().__init__()
        self.items = ItemTower(num_items, cfg.dim)
        self.encoder = CausalEncoder(cfg)

    def _states(self, inputs: torch.Tensor, lengths: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.encoder(F.embedding(inputs, z), lengths)  # (B, T, D)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        z = self.items()
        H = self._states(batch.inputs, batch.lengths, z)
        valid = batch.targets > 0
        loss = full_softmax_ce(H[valid], z[1:], batch.targets[valid] - 1)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.items()
        H = self._states(inputs, lengths, z)
        h = H[torch.arange(H.shape[0], device=H.device), lengths - 1]
        return _mask_padding(h @ z.T)


class ComiRecSA(nn.Module):
    """ComiRec-SA (Cen et al. 2020): K interest vectors from multi-head self-attentive pooling of the sequence.

    V = softmax_t(W2 tanh(W1 (e_t + p_t))) over the history -> K vectors (K, D). Training picks, for each target,
    the interest with the highest score on it (the original's hard selection) and applies full-softmax CE.
    Serving scores an item by its best interest: max_k v_k . e_i. Every position is trained (causal pooling).
    """

    def __init__(self, num_items: int, cfg: EncoderConfig, interests: int = 4):
        super().__init__()
        d = cfg.dim
        self.cfg, self.interests = cfg, interests
        self.items = ItemTower(num_items, d)
        self.position = nn.Embedding(cfg.max_len, d)
        nn.init.normal_(self.position.weight, std=0.02)
        self.w1 = nn.Linear(d, 4 * d, bias=False)
        self.w2 = nn.Linear(4 * d, interests, bias=False)

    def _interests(self, inputs: torch.Tensor, lengths: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """-> (B, T, K, D): the K interest vectors of every prefix 0..t."""
        b, t = inputs.shape
        pos = (lengths[:, None] - 1 - torch.arange(t, device=z.device)[None, :]).clamp(min=0, max=self.cfg.max_len - 1)
        x = F.embedding(inputs, z) + self.position(pos)  # (B, T, D)
        x = F.dropout(x, self.cfg.dropout, self.training)
        a = self.w2(torch.tanh(self.w1(x))).transpose(1, 2)  # (B, K, T): attention logits per key position
        causal = torch.ones(t, t, dtype=torch.bool, device=z.device).tril()  # query t sees keys <= t
        a = a[:, :, None, :].masked_fill(~causal[None, None], -math.inf)  # (B, K, Tq, Tk)
        return (torch.softmax(a, dim=-1) @ x[:, None]).permute(0, 2, 1, 3)  # (B, Tq, K, D)

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        z = self.items()
        V = self._interests(batch.inputs, batch.lengths, z)
        valid = batch.targets > 0
        v, y = V[valid], batch.targets[valid]  # (M, K, D), (M,)
        pick = (v * F.embedding(y, z)[:, None, :]).sum(-1).argmax(-1)  # (M,)
        u = v[torch.arange(v.shape[0], device=v.device), pick]
        loss = full_softmax_ce(u, z[1:], y - 1)
        return loss, {"loss": float(loss.detach())}

    @torch.no_grad()
    def score(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        z = self.items()
        V = self._interests(inputs, lengths, z)
        v = V[torch.arange(V.shape[0], device=V.device), lengths - 1]  # (B, K, D)
        return _mask_padding((v @ z.T).amax(dim=1))


class Popularity:
    """Most-consumed items in the training data, the same list for everyone."""

    def __init__(self, num_items: int):
        self.counts = torch.zeros(num_items + 1)

    def fit(self, sequences: list[np.ndarray]) -> None:
        flat = np.concatenate(sequences) if sequences else np.zeros(0, dtype=np.int64)
        self.counts = torch.bincount(torch.from_numpy(flat), minlength=self.counts.shape[0]).float()
        self.counts[0] = -math.inf

    def score(self, inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.counts[None, :].expand(inputs.shape[0], -1)
