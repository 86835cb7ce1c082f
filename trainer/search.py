"""Soft search (SPARC) and hard search (SPARC-Hard) for serving, with a brute-force reference.

soft_search for one user:
  1. choose K level-1 codes from the interest distribution p: the top-K, or, with explore > 0, K codes drawn
     without replacement (Gumbel top-K) from (1 - explore) * p + explore * uniform;
  2. quota per chosen code proportional to its (renormalised) probability, at least one slot each;
  3. retrieve each code's candidates with its own user vector u_k (any `Retriever`: brute force or faiss);
  4. merge: every candidate's score is sum_k p_k * (u_k . z); each code contributes its best `quota_k` unseen
     candidates, and the final list is sorted by the merged score.
hard_search: the argmax code alone, its user vector, top-k by u . z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class Retriever(Protocol):
    vectors: np.ndarray  # (N+1, D) the item vectors searched; row 0 is padding

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries (Q, D) float32 -> (scores (Q, k), ids (Q, k)) by inner product, best first."""


class BruteForce:
    """Exact inner-product top-k over item vectors (N+1, D); row 0 (padding) is never returned."""

    def __init__(self, item_vectors: np.ndarray):
        self.vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores = queries.astype(np.float32) @ self.vectors.T  # (Q, N+1)
        scores[:, 0] = -np.inf
        k = min(k, self.vectors.shape[0] - 1)
        ids = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        part = np.take_along_axis(scores, ids, axis=1)
        order = np.lexsort((ids, -part), axis=1)  # score descending, then id ascending: deterministic ties
        ids = np.take_along_axis(ids, order, axis=1)
        return np.take_along_axis(scores, ids, axis=1), ids


class FaissFlat:
    """The same search through faiss (exact inner product); ids are the row numbers of item_vectors."""

    def __init__(self, item_vectors: np.ndarray):
        import faiss

        self.vectors = np.ascontiguousarray(item_vectors, dtype=np.float32)
        self.index = faiss.IndexFlatIP(self.vectors.shape[1])
        self.index.add(self.vectors[1:])

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids + 1


@dataclass
class SearchResult:
    items: np.ndarray  # (k,) item ids, best first
    scores: np.ndarray  # (k,) merged scores
    codes: np.ndarray  # (K,) the level-1 codes searched
    weights: np.ndarray  # (K,) their renormalised probabilities
    quotas: np.ndarray  # (K,) slots given to each code


def allocate_quotas(weights: np.ndarray, k: int) -> np.ndarray:
    """Slots per code proportional to weights (K,), at least one each, summing to k (largest remainder)."""
    n = len(weights)
    if k < n:
        raise ValueError(f"k={k} is smaller than the number of codes searched ({n}); each needs a slot")
    share = weights / weights.sum() * (k - n)
    quotas = np.floor(share).astype(np.int64)
    rest = k - n - quotas.sum()
    quotas[np.argsort(-(share - quotas), kind="stable")[:rest]] += 1
    return quotas + 1


def choose_codes(
    probs: np.ndarray, top_codes: int, explore: float = 0.0, rng: np.random.Generator | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """probs (C,) -> (codes (K,), renormalised weights (K,)). explore in [0, 1] flattens and samples."""
    if not 0.0 <= explore <= 1.0:
        raise ValueError(f"explore must be in [0, 1], got {explore}")
    p = (1.0 - explore) * probs + explore / len(probs)
    keys = np.log(np.maximum(p, 1e-30))
    if explore > 0:
        rng = rng or np.random.default_rng()
        keys = keys + rng.gumbel(size=len(p))
    codes = np.argsort(-keys, kind="stable")[: min(top_codes, len(p))]
    return codes, p[codes] / p[codes].sum()


def soft_search(
    user_vectors: np.ndarray, weights: np.ndarray, codes: np.ndarray, retriever: Retriever, k: int
) -> SearchResult:
    """user_vectors (K, D): one per chosen code; weights (K,) sum to 1. Returns the merged top-k."""
    quotas = allocate_quotas(weights, k)
    _, cand = retriever.search(user_vectors.astype(np.float32), k)  # (K, k) each code's own best
    pool = np.unique(cand[cand > 0])
    # merged score of every candidate: sum_k p_k u_k . z   (exact dot products on the candidate pool)
    z = retriever.vectors[pool]  # (P, D)
    merged = (weights[:, None] * (user_vectors @ z.T)).sum(0)  # (P,)
    merged_of = dict(zip(pool.tolist(), merged.tolist(), strict=True))
    taken: list[int] = []
    seen: set[int] = set()
    for row, quota in zip(cand, quotas, strict=True):
        got = 0
        for item in row.tolist():
            if got == quota:
                break
            if item > 0 and item not in seen:
                seen.add(item)
                taken.append(item)
                got += 1
    items = np.array(sorted(taken, key=lambda i: (-merged_of[i], i)), dtype=np.int64)
    scores = np.array([merged_of[i] for i in items], dtype=np.float32)
    return SearchResult(items=items, scores=scores, codes=codes, weights=weights, quotas=quotas)


def hard_search(user_vector: np.ndarray, code: int, retriever: Retriever, k: int) -> SearchResult:
    scores, ids = retriever.search(user_vector[None].astype(np.float32), k)
    return SearchResult(items=ids[0], scores=scores[0], codes=np.array([code]), weights=np.ones(1),
                        quotas=np.array([k]))


def soft_search_reference(
    user_vectors: np.ndarray, weights: np.ndarray, item_vectors: np.ndarray, k: int
) -> np.ndarray:
    """The definition above, computed by brute force over the whole catalogue with full sorts (for tests)."""
    quotas = allocate_quotas(weights, k)
    scores = user_vectors @ item_vectors.T  # (K, N+1)
    scores[:, 0] = -np.inf
    merged = (weights[:, None] * (user_vectors @ item_vectors.T)).sum(0)
    seen: list[int] = []
    for row, quota in zip(scores, quotas, strict=True):
        order = sorted(range(1, len(row)), key=lambda i: (-row[i], i))
        fresh = [i for i in order if i not in seen][:quota]
        seen.extend(fresh)
    return np.array(sorted(seen, key=lambda i: (-merged[i], i)), dtype=np.int64)


def retrieve(
    model,
    history: np.ndarray,
    retriever: Retriever,
    k: int = 50,
    *,
    top_codes: int = 4,
    explore: float = 0.0,
    temperature: float = 1.0,
    hard: bool = False,
    rng: np.random.Generator | None = None,
) -> SearchResult:
    """Serve one user with a trained SparcModel: interest distribution -> codes -> user vectors -> search.

    history: the user's items, oldest first. The retriever must index the model's current item vectors.
    """
    import torch

    from trainer.batches import pad_histories

    model.eval()
    with torch.no_grad():
        inputs, lengths = pad_histories([np.asarray(history, dtype=np.int64)], model.cfg.encoder.max_len)
        cat = model.catalogue()
        state = model.encode(inputs, lengths, cat.z)
        probs = torch.softmax(model.interest_logits(state.h, cat.z, cat.codes)[0] / temperature, dim=-1).numpy()
        if hard:
            code = int(probs.argmax())
            u = model.code_vectors(state, torch.tensor([[code]]))[0, 0].numpy()
            return hard_search(u, code, retriever, k)
        codes, weights = choose_codes(probs, top_codes, explore, rng)
        u = model.code_vectors(state, torch.from_numpy(codes)[None])[0].numpy()  # (K, D)
    return soft_search(u, weights, codes, retriever, k)
