"""Ranking metrics over the full catalogue (no sampled negatives).

A target's rank is the number of items scored strictly higher than it (0 = first), so ties count in the
target's favour; a target scored -inf (not in a served list, see SparcModel.score's `served`) is a miss at every k.
Recall@k = share of targets with rank < k; NDCG@k = mean of 1 / log2(rank + 2) over those.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

KS = (5, 10, 20)
TOP_N = 20

ScoreFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (inputs (B,T), lengths (B,)) -> (B, N+1)


def target_ranks(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (B, N+1), targets (B,) -> 0-based ranks (B,)."""
    target_scores = scores.gather(1, targets[:, None])  # (B, 1)
    ranks = (scores > target_scores).sum(dim=1)
    return ranks.masked_fill(target_scores[:, 0] == -math.inf, scores.shape[1])


def mask_history(scores: torch.Tensor, histories: Sequence[np.ndarray], targets: torch.Tensor) -> torch.Tensor:
    """Scores with each user's own history items set to -inf (the target itself is never masked)."""
    scores = scores.clone()
    rows = np.concatenate([np.full(len(h), r) for r, h in enumerate(histories)]) if histories else np.zeros(0)
    cols = np.concatenate(histories) if histories else np.zeros(0)
    if len(rows):
        r, c = torch.from_numpy(rows.astype(np.int64)), torch.from_numpy(cols.astype(np.int64))
        keep = c != targets[r]
        scores[r[keep], c[keep]] = -math.inf
    return scores


def ranking_metrics(ranks: np.ndarray, ks: Sequence[int] = KS) -> dict[str, float]:
    """0-based ranks (n,) -> {"recall@k", "ndcg@k"} for each k."""
    ranks = np.asarray(ranks)
    out: dict[str, float] = {}
    n = max(len(ranks), 1)
    for k in ks:
        out[f"recall@{k}"] = float((ranks < k).sum() / n)
    for k in ks:
        hit = ranks < k
        out[f"ndcg@{k}"] = float((1.0 / np.log2(ranks[hit] + 2.0)).sum() / n)
    return out


def coverage_and_tail(top_lists: np.ndarray, train_counts: np.ndarray, num_items: int) -> dict[str, float]:
    """top_lists (U, n) recommended items; train_counts (N+1,) popularity in training.

    coverage: share of the catalogue (items 1..N) appearing in at least one list;
    tail_share: share of recommended slots given to long-tail items (the bottom 80% by training popularity;
    ties broken by item id, so exactly 20% of items form the head).
    """
    n = top_lists.shape[1]
    slots = top_lists[top_lists > 0]  # 0 = an empty slot (a served list shorter than n)
    coverage = len(np.unique(slots)) / num_items
    order = np.lexsort((np.arange(1, num_items + 1), -train_counts[1:]))  # most popular first
    head = np.zeros(num_items + 1, dtype=bool)
    head[1 + order[: int(round(0.2 * num_items))]] = True
    tail_share = float((~head[slots]).mean()) if slots.size else 0.0
    return {f"coverage@{n}": float(coverage), f"tail_share@{n}": tail_share}


def interests_per_list(top_lists: np.ndarray, item_codes: np.ndarray) -> dict[str, float]:
    """top_lists (U, n) recommended items (0 = an empty slot); item_codes (N+1,) each item's level-1 code.

    interests@n: the mean number of distinct codes among a list's items, i.e. how many interests one list spans
    (a list of one code's items: 1).
    """
    n = top_lists.shape[1]
    codes = np.where(top_lists > 0, item_codes[top_lists], -1)
    ordered = np.sort(codes, axis=1)
    distinct = (ordered[:, 1:] != ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    counts = distinct.sum(axis=1) + (ordered[:, 0] >= 0)
    return {f"interests@{n}": float(counts.mean()) if len(counts) else 0.0}


def evaluate_ranking(
    score_fn: ScoreFn,
    histories: Sequence[np.ndarray],
    targets: np.ndarray,
    max_len: int,
    batch_size: int = 512,
    top_n: int = TOP_N,
) -> dict[str, np.ndarray]:
    """Scores every user once; returns raw ranks, masked ranks (own history excluded) and raw top-n lists."""
    from trainer.batches import pad_histories  # local: keeps this module importable without torch models

    raw, masked, tops = [], [], []
    for start in range(0, len(histories), batch_size):
        hist = list(histories[start : start + batch_size])
        tgt = torch.from_numpy(np.asarray(targets[start : start + batch_size], dtype=np.int64))
        inputs, lengths = pad_histories(hist, max_len)
        scores = score_fn(inputs, lengths).float()
        raw.append(target_ranks(scores, tgt).numpy())
        values, ids = scores.topk(top_n, dim=1)
        tops.append(ids.masked_fill(values == -math.inf, 0).numpy())  # an empty slot, not an arbitrary item
        masked.append(target_ranks(mask_history(scores, hist, tgt), tgt).numpy())
    return {"raw": np.concatenate(raw), "masked": np.concatenate(masked), "top": np.concatenate(tops)}
