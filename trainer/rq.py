"""Residual quantisation (the RQ part of RQ-VAE) with EMA codebooks that stay healthy on a stream.

One `VectorQuantizer` per level, held in `ResidualQuantizer.levels`. Level l quantises the residual r_l left by
the levels before it: c_l = argmin_k ||r_l - e_{l,k}||, r_{l+1} = r_l - e_{l,c_l}. The codes of an item are
(c_1, ..., c_L); its "interest" is c_1.

Codebook statistics (EMA cluster sizes and sums, the "initialised" flag, the "frozen" flag) are buffers, so they
travel in `state_dict`. Updaters end in `_` and change nothing when the module is frozen or in eval mode.
Gradients reach z through the commitment loss; the quantised value uses the straight-through estimator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def kmeans(x: torch.Tensor, k: int, iters: int = 10, generator: torch.Generator | None = None) -> torch.Tensor:
    """Plain Lloyd k-means. x: (N, D) -> centroids (k, D). With N < k, points are sampled with replacement."""
    n = x.shape[0]
    if n >= k:  # picks drawn on the CPU (the trainer's generator lives there) whatever x's device
        idx = torch.randperm(n, generator=generator, device="cpu")[:k]
    else:
        idx = torch.randint(0, n, (k,), generator=generator, device="cpu")
    centroids = x[idx].clone()
    for _ in range(iters):
        assign = torch.cdist(x, centroids).argmin(dim=1)  # (N,)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids


class VectorQuantizer(nn.Module):
    """One level: a codebook of `codes` vectors of size `dim`, learnt by EMA of the vectors assigned to them."""

    def __init__(self, codes: int, dim: int, decay: float = 0.95, dead_threshold: float = 0.5, eps: float = 1e-5):
        super().__init__()
        self.codes, self.dim, self.decay, self.dead_threshold, self.eps = codes, dim, decay, dead_threshold, eps
        self.register_buffer("codebook", torch.zeros(codes, dim))  # (C, D)
        self.register_buffer("cluster_size", torch.zeros(codes))  # (C,) EMA of assignment counts
        self.register_buffer("embed_sum", torch.zeros(codes, dim))  # (C, D) EMA of assigned vector sums
        self.register_buffer("initialised", torch.tensor(False))
        self.register_buffer("frozen", torch.tensor(False))

    def assign(self, x: torch.Tensor, held: torch.Tensor | None = None, margin: float = 0.0) -> torch.Tensor:
        """x: (N, D) -> nearest code ids (N,).

        Hysteresis: with held (N,) codes (-1: none) and margin > 0, a row keeps its held code as long as
        ||x - e_held||^2 <= (1 + margin) * min_c ||x - e_c||^2, so a vector near a boundary does not flip codes
        with every small move of itself or of the codewords."""
        # ||x||^2 is constant per row: argmin ||x - e||^2 = argmin (||e||^2 - 2 x.e)
        dist = (self.codebook * self.codebook).sum(dim=1)[None, :] - 2.0 * (x @ self.codebook.T)
        best = dist.argmin(dim=1)
        if held is None or margin <= 0:
            return best
        full = (dist + (x * x).sum(dim=1, keepdim=True)).clamp(min=0)  # squared distances
        near = full.gather(1, best[:, None])[:, 0]
        kept = full.gather(1, held.clamp(min=0)[:, None])[:, 0]
        return torch.where((held >= 0) & (kept <= (1.0 + margin) * near), held, best)

    def _updating(self) -> bool:
        return self.training and not bool(self.frozen)

    @torch.no_grad()
    def init_(self, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """k-means initialisation on the first vectors seen (no-op once initialised or when frozen)."""
        if bool(self.initialised) or not self._updating():
            return
        centroids = kmeans(x.detach().float(), self.codes, generator=generator)
        self.codebook.copy_(centroids)
        self.embed_sum.copy_(centroids)
        self.cluster_size.fill_(1.0)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update_(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """EMA update from vectors x (N, D) assigned to codes (N,)."""
        if not self._updating():
            return
        x = x.detach().float()
        counts = torch.bincount(codes, minlength=self.codes).to(x.dtype)
        sums = torch.zeros_like(self.embed_sum).index_add_(0, codes, x)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        # Laplace smoothing keeps empty clusters finite; dead ones are revived separately.
        n = self.cluster_size.sum()
        smoothed = (self.cluster_size + self.eps) / (n + self.codes * self.eps) * n
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

    @torch.no_grad()
    def revive_(self, x: torch.Tensor, generator: torch.Generator | None = None) -> int:
        """Replace dead codewords (EMA size below threshold) by random recent vectors x (N, D). Returns how many."""
        if not self._updating():
            return 0
        dead = (self.cluster_size < self.dead_threshold).nonzero().flatten()
        if dead.numel() == 0 or x.shape[0] == 0:
            return 0
        pick = torch.randint(0, x.shape[0], (dead.numel(),), generator=generator, device="cpu")
        fresh = x.detach().float()[pick]
        self.codebook[dead] = fresh
        self.embed_sum[dead] = fresh
        self.cluster_size[dead] = 1.0
        return int(dead.numel())


class ResidualQuantizer(nn.Module):
    """L levels of `VectorQuantizer` applied to successive residuals."""

    def __init__(self, levels: int, codes: int, dim: int, decay: float = 0.95, dead_threshold: float = 0.5):
        super().__init__()
        self.levels = nn.ModuleList(VectorQuantizer(codes, dim, decay, dead_threshold) for _ in range(levels))

    @property
    def codebooks(self) -> torch.Tensor:
        """(L, C, D) stacked codebooks."""
        return torch.stack([q.codebook for q in self.levels])

    def encode(
        self, z: torch.Tensor, held: torch.Tensor | None = None, margin: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """z: (N, D) -> codes (N, L) and the quantised sum (N, D) (no gradient through the codebooks).
        held (N,), margin: the level-1 hysteresis of VectorQuantizer.assign (levels below assign plainly)."""
        residual = z.detach()
        quantised = torch.zeros_like(residual)
        codes = []
        for level, q in enumerate(self.levels):
            c = q.assign(residual, held, margin) if level == 0 else q.assign(residual)
            e = q.codebook[c]
            quantised = quantised + e
            residual = residual - e
            codes.append(c)
        return torch.stack(codes, dim=1), quantised

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """codes (N, L) -> sum of codewords (N, D) (z_recon, with the identity decoder)."""
        return sum(q.codebook[codes[:, l]] for l, q in enumerate(self.levels))

    @torch.no_grad()
    def update_(
        self,
        z: torch.Tensor,
        generator: torch.Generator | None = None,
        held: torch.Tensor | None = None,
        margin: float = 0.0,
    ) -> dict:
        """One streaming update from a batch of item vectors z (N, D): k-means init on first use, EMA,
        dead-code revival from the batch's residuals. Returns {"revived": n}. No-op when frozen or in eval.
        held, margin: level 1 assigns with `encode`'s hysteresis (its EMA follows the codes it serves)."""
        residual = z.detach().float()
        revived = 0
        for level, q in enumerate(self.levels):
            sticky = (held, margin) if level == 0 else (None, 0.0)
            q.init_(residual, generator)
            c = q.assign(residual, *sticky)
            q.update_(residual, c)
            revived += q.revive_(residual, generator)
            residual = residual - q.codebook[q.assign(residual, *sticky)]
        return {"revived": revived}

    def freeze_(self, frozen: bool = True) -> None:
        for q in self.levels:
            q.frozen.fill_(frozen)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z: (N, D) -> (z_q straight-through (N, D), codes (N, L), commitment loss scalar)."""
        codes, quantised = self.encode(z)
        commit = F.mse_loss(z, quantised)
        z_q = z + (quantised - z).detach()
        return z_q, codes, commit


def code_health(codes: torch.Tensor, codes_per_level: int) -> dict:
    """Health of an item -> code assignment. codes: (N, L) for N real items.

    Per level: utilisation (share of codewords used), perplexity (exp of the entropy of code usage);
    collision_rate: share of items whose full code tuple is shared with another item.
    """
    n, levels = codes.shape
    out: dict = {"items": int(n)}
    for l in range(levels):
        counts = torch.bincount(codes[:, l], minlength=codes_per_level).float()
        p = counts / counts.sum().clamp(min=1)
        entropy = -(p[p > 0] * p[p > 0].log()).sum()
        out[f"level{l + 1}_utilisation"] = float((counts > 0).float().mean())
        out[f"level{l + 1}_perplexity"] = float(entropy.exp())
    if n:
        _, inverse, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
        out["collision_rate"] = float((counts[inverse] > 1).float().mean())
    else:
        out["collision_rate"] = 0.0
    return out
