"""The serving index: a frozen copy of the model from one snapshot, a retriever over its item vectors, and the
version that built it. The worker builds a new one off the event loop and swaps a single reference, so a
request sees one whole index (old or new), never a mix.

Start: exact search (trainer.search.FaissFlat, or BruteForce) over all item vectors. Incremental IVF lists
keyed by level-1 codes are the next step (architecture.md, "Index").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from trainer.model import SparcModel
from trainer.online import LearnerState, load_model
from trainer.search import BruteForce, FaissFlat, Retriever, SearchResult, retrieve

MAX_POPULAR = 1000  # the longest answer for a user without history (= the web view's largest k)


@dataclass(frozen=True, eq=False)
class ServingIndex:
    version: int
    created_at: float  # unix seconds of the snapshot
    model: SparcModel  # eval mode; never trained
    retriever: Retriever
    top_codes: int
    popular: np.ndarray  # (P,) item ids by interactions seen, most first: the answer for an empty history
    popularity: np.ndarray  # (P,) their interaction counts

    @property
    def num_items(self) -> int:
        return int(self.retriever.vectors.shape[0]) - 1

    def retrieve(
        self, history: Sequence[int], k: int, explore: float = 0.0, rng: np.random.Generator | None = None
    ) -> SearchResult:
        """Soft search for one user's history (oldest first). Items newer than the snapshot are dropped from
        the history (the frozen model has no row for them). With no history left, the most popular items
        (no codes searched): the sequence encoder needs at least one item."""
        known = np.asarray([i for i in history if 0 < i <= self.num_items], dtype=np.int64)
        if known.size == 0:
            none, scores = np.zeros(0, dtype=np.int64), self.popularity[:k].astype(np.float32)
            return SearchResult(self.popular[:k], scores, codes=none, weights=np.zeros(0), quotas=none)
        return retrieve(
            self.model, known, self.retriever, k, top_codes=min(self.top_codes, k), explore=explore, rng=rng
        )


def build_index(
    state: LearnerState,
    version: int,
    created_at: float,
    top_codes: int,
    kind: Literal["faiss", "brute"] = "faiss",
) -> ServingIndex:
    """A serving index from a snapshot's state (the model is rebuilt from its config and weights)."""
    model = load_model(state.config, state.weights)
    vectors = state.item_vectors.numpy()
    retriever = FaissFlat(vectors) if kind == "faiss" else BruteForce(vectors)
    counts = state.weights["items.counts"][1:].numpy()
    popular = np.lexsort((np.arange(len(counts)), -counts))[:MAX_POPULAR]  # count descending, then id
    return ServingIndex(
        version=version,
        created_at=created_at,
        model=model,
        retriever=retriever,
        top_codes=top_codes,
        popular=popular + 1,
        popularity=counts[popular],
    )


class IndexHolder:
    """The current ServingIndex behind one reference (assignment is atomic; readers take `current` once)."""

    def __init__(self) -> None:
        self.current: ServingIndex | None = None

    def swap(self, index: ServingIndex) -> ServingIndex | None:
        old, self.current = self.current, index
        return old
