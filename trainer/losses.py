"""Retrieval losses over the item catalogue.

full_softmax_ce: exact softmax cross-entropy over every item, fused so the (M, N) logits buffer is reused for
  the gradient (about half the memory traffic of log_softmax + nll + their backward).
sampled_softmax_ce: in-batch negatives with logQ correction (Yi et al. 2019), for catalogues too large for the
  full softmax. Chosen by TrainConfig.loss / SparcConfig.retrieval_loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _FusedSoftmaxCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = h @ z.T  # (M, N)
        rows = torch.arange(h.shape[0], device=h.device)
        target = logits[rows, y]  # (M,) a copy
        # one pass fewer than logsumexp + exp: shift by the row max, exponentiate in place, normalise
        peak = logits.amax(dim=1, keepdim=True)
        total = logits.sub_(peak).exp_().sum(dim=1, keepdim=True)  # >= 1: the max term is exp(0)
        loss = (peak + total.log()).squeeze(1).sub(target).mean()
        # gradient w.r.t. logits, computed in place: (softmax - onehot) / M
        logits.div_(total * h.shape[0])
        logits[rows, y] -= 1.0 / h.shape[0]
        ctx.save_for_backward(h, z, logits)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        h, z, g = ctx.saved_tensors
        g = g * grad if grad.item() != 1.0 else g
        return g @ z, g.T @ h, None


def full_softmax_ce(h: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean CE of softmax(h . z^T) at targets y.  h (M, D), z (N, D), y (M,) in [0, N)."""
    if h.shape[0] == 0:
        return h.sum() * 0.0
    return _FusedSoftmaxCE.apply(h, z, y)


def sampled_softmax_ce(h: torch.Tensor, z_pos: torch.Tensor, y: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """In-batch sampled softmax with logQ correction.

    h (M, D) user vectors; z_pos (M, D) their positives' vectors, which double as the other rows' negatives;
    y (M,) the positives' item ids (a duplicate of a row's own positive is not its negative);
    log_q (M,) log of each positive's sampling probability (its share of the stream).
    """
    logits = h @ z_pos.T - log_q[None, :]  # (M, M)
    same = (y[:, None] == y[None, :]) & ~torch.eye(y.shape[0], dtype=torch.bool, device=y.device)
    return F.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(h.shape[0], device=h.device))
