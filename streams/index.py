"""The serving index: a frozen copy of the model from one snapshot, its catalogue (item vectors and level-1 codes,
computed once), a per-code retriever over them, and the version that built it. The worker builds a new one off
the event loop and swaps a single reference, so a request sees one whole index (old or new), never a mix.

The retriever is trainer.search.CodeIndex: a faiss IVF index whose inverted lists are the level-1 codes (soft
search probes the lists the interest module chose; architecture.md, "Index"), or trainer.search.BruteForce
(numpy over all items, the reference). A new snapshot's index is built incrementally from the one served:
only items whose code or vector changed move, into a copy, which is then swapped in (`update_index`).

Items: requests and answers speak external item ids (trainer.vocab); the model and the retriever speak rows. The
index holds the snapshot's vocabulary (LearnerState.item_ids) and translates at its edges: `retrieve` takes a
history of external ids, its SearchResult holds rows, and `ids_of` names them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from trainer.model import Catalogue, SparcModel
from trainer.online import LearnerState, load_model
from trainer.search import BruteForce, CodeIndex, CodeRetriever, IndexUpdate, SearchResult, retrieve
from trainer.vocab import ItemId

if TYPE_CHECKING:
    from codebook_store import Snapshot

MAX_POPULAR = 1000  # the longest answer for a user without history (= the web view's largest k)


@dataclass(frozen=True, eq=False)
class ServingIndex:
    version: int
    created_at: float  # unix seconds of the snapshot
    model: SparcModel  # eval mode; never trained
    retriever: CodeRetriever  # over catalogue.z and catalogue.codes[:, 0]
    top_codes: int
    popular: np.ndarray  # (P,) rows by interactions seen, most first: the answer for an empty history
    popularity: np.ndarray  # (P,) their interaction counts
    catalogue: Catalogue | None = None  # the model's catalogue, computed once (None: recomputed per request)
    update: IndexUpdate | None = None  # how the retriever was derived from the previous index (None: built)
    item_ids: tuple[ItemId, ...] | None = None  # the external id of rows 1..N (None: row i is item i)
    rows: dict[ItemId, int] | None = None  # external id -> row (None: row i is item i)

    @property
    def num_items(self) -> int:
        return int(self.retriever.vectors.shape[0]) - 1

    def row_of(self, item: ItemId) -> int | None:
        """The row of an external id (canonical, as the history table holds them), or None: not in the snapshot."""
        if self.rows is not None:
            return self.rows.get(item)
        return item if type(item) is int and 0 < item <= self.num_items else None

    def ids_of(self, rows: np.ndarray) -> list[ItemId]:
        """The external ids of rows (a SearchResult's items)."""
        if self.item_ids is None:
            return [int(r) for r in rows]
        return [self.item_ids[int(r) - 1] for r in rows]

    def retrieve(
        self,
        history: Sequence[ItemId],
        k: int,
        explore: float = 0.0,
        rng: np.random.Generator | None = None,
        exploit: int | None = None,
        lift: float = 1.0,
    ) -> SearchResult:
        """Soft search for one user's history (external ids, oldest first); the result holds rows (`ids_of`).
        Items the snapshot does not hold (newer than it, or evicted) are dropped from the history. With no
        history left, the most popular items (no codes searched): the sequence encoder needs at least one item.
        exploit < k: exploration slots (trainer.search, step 5): the slots after the first `exploit` go to items
        by p(i | u) / q(i)^lift."""
        known = np.asarray([r for r in map(self.row_of, history) if r is not None], dtype=np.int64)
        if known.size == 0:
            none, scores = np.zeros(0, dtype=np.int64), self.popularity[:k].astype(np.float32)
            return SearchResult(self.popular[:k], scores, codes=none, weights=np.zeros(0), quotas=none)
        return retrieve(
            self.model, known, self.retriever, k, top_codes=min(self.top_codes, k), explore=explore, rng=rng,
            catalogue=self.catalogue, exploit=exploit, lift=lift,
        )


def model_catalogue(model: SparcModel) -> Catalogue:
    """The frozen model's catalogue (z (N+1, D), codes (N+1, L)), computed once without gradients."""
    with torch.no_grad():
        cat = model.catalogue()
    return Catalogue(z=cat.z.detach().contiguous(), codes=cat.codes.detach().contiguous())


def build_retriever(
    catalogue: Catalogue, num_codes: int, kind: Literal["faiss", "brute"] = "faiss", centroids=None
) -> CodeRetriever:
    vectors, codes = catalogue.z.numpy(), catalogue.codes[:, 0].numpy()
    if kind == "faiss":
        return CodeIndex.build(vectors, codes, num_codes, centroids=centroids)
    if kind == "brute":
        return BruteForce(vectors, codes, num_codes)
    raise ValueError(f"unknown index kind {kind!r}; expected 'faiss' or 'brute'")


def build_index(
    state: LearnerState | Snapshot,
    version: int,
    created_at: float,
    top_codes: int,
    kind: Literal["faiss", "brute"] = "faiss",
    previous: ServingIndex | None = None,
) -> ServingIndex:
    """A serving index from a snapshot's state (the model is rebuilt from its config and weights; a stored
    codebook_store.Snapshot has the same config, weights and item_ids).

    previous: the index served now; when it is a faiss CodeIndex of the same shape, the new retriever is derived
    from it incrementally (CodeIndex.update: only changed items move) instead of being built from scratch.
    """
    model = load_model(state.config, state.weights)
    catalogue = model_catalogue(model)
    update = None
    if kind == "faiss" and previous is not None and _compatible(previous.retriever, model):
        retriever, update = previous.retriever.update(catalogue.z.numpy(), catalogue.codes[:, 0].numpy())
    else:
        retriever = build_retriever(
            catalogue, model.cfg.codes, kind, centroids=model.rq.levels[0].codebook.detach().numpy()
        )
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
        catalogue=catalogue,
        update=update,
        item_ids=state.item_ids,
        rows=None if state.item_ids is None else {item: row for row, item in enumerate(state.item_ids, start=1)},
    )


def _compatible(retriever: CodeRetriever, model: SparcModel) -> bool:
    return (
        isinstance(retriever, CodeIndex)
        and retriever.num_codes == model.cfg.codes
        and retriever.vectors.shape[1] == model.cfg.encoder.dim
    )


def update_index(previous: ServingIndex, state: LearnerState, version: int, created_at: float) -> ServingIndex:
    """The next serving index, derived incrementally from `previous` (see build_index); swap it in whole."""
    return build_index(state, version, created_at, previous.top_codes, "faiss", previous=previous)


class IndexHolder:
    """The current ServingIndex behind one reference (assignment is atomic; readers take `current` once)."""

    def __init__(self) -> None:
        self.current: ServingIndex | None = None

    def swap(self, index: ServingIndex) -> ServingIndex | None:
        old, self.current = self.current, index
        return old
