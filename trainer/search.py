"""Soft search (SPARC) and hard search (SPARC-Hard) for serving: per-code retrieval over a code -> item index,
with a brute-force reference of the same definition.

Every item i >= 1 sits in exactly one list: the list of its level-1 code c(i) (row 0 is padding, never returned).

soft_search for one user, given chosen codes c_1..c_K (distinct), renormalised weights p_k and user vectors u_k:
  1. code k's candidates come ONLY from list c_k; a candidate's score is
         score_k(i) = log p_k + u_k . z_i - LSE_k,     LSE_k = logsumexp_{j in list c_k} u_k . z_j   (exact)
     so exp(score) = p_k * softmax-within-code: the item's probability under the mixture of the chosen codes;
  2. quotas: allocate_quotas(p, k) (proportional to p_k, at least one slot each); code k contributes its best
     min(quota_k, |list c_k|) items ("best" = u_k . z descending, then id ascending);
  3. free slots: when lists are shorter than their quotas, the slots left over go to the best remaining items
     of ALL chosen lists (those beyond their code's quota) by the same score (score descending, then id
     ascending); fewer than k items come back only when the chosen lists hold fewer than k items together;
  4. the answer is sorted by score descending, ties by id ascending;
  5. exploration slots (exploit = E < k, and an item bias b, e.g. -lift * log popularity): steps 1-4 fill the first
     E slots (the model's most probable items), and the k - E slots after them go to the best remaining items of
     the same lists by score(i) + b(i) (ties by id), e.g. by p(i) / q(i)^lift: items this user is unusually likely
     to take for how popular they are. Their scores stay log mixture probabilities; the order is the slots'.
hard_search: the argmax code's list only, top-k by u . z (fewer than k when the list is smaller).

Retrievers (the `CodeRetriever` protocol: per-list scans with exact LSE):
  CodeIndex   faiss IndexIVFFlat (inner product) whose inverted lists ARE the level-1 codes (items added with
              their preassigned list ids); each code's list is scanned through zero-copy numpy views of the
              list's vectors (method "scan": one pass gives the top candidates and LSE, ties broken by id), or
              searched with faiss search_preassigned (method "faiss"; LSE from the same views). `update` moves
              only the items whose code or vector changed, into a copy: the old index stays valid for readers.
  BruteForce  numpy over ALL items (U @ Z^T), then per-code masks: the slow baseline.
soft_search_reference is an independent, plain implementation of the definition over all items (tests, recall).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np

NO_CODE = -1  # the code of row 0 (padding): in no list
Method = Literal["scan", "faiss"]


# ----------------------------------------------------------------- selection helpers


def top_order(dots: np.ndarray, ids: np.ndarray, m: int) -> np.ndarray:
    """Positions of the best min(m, n) entries by dot descending, then id ascending (exact under ties)."""
    n = len(dots)
    if m <= 0 or n == 0:
        return np.zeros(0, dtype=np.int64)
    if n <= 512 or 4 * m >= n:  # small: one full sort is cheaper than partitioning first
        return np.lexsort((ids, -dots))[:m]
    cut = dots[np.argpartition(-dots, m - 1)[:m]].min()  # the m-th best value
    above = np.flatnonzero(dots > cut)
    tied = np.flatnonzero(dots == cut)
    tied = tied[np.argsort(ids[tied], kind="stable")[: m - len(above)]]  # a tie at the cut: lowest ids win
    sel = np.concatenate([above, tied])
    return sel[np.lexsort((ids[sel], -dots[sel]))]


def logsumexp(values: np.ndarray) -> float:
    """log sum exp(values) in float64 (-inf for an empty array)."""
    if len(values) == 0:
        return -np.inf
    top = float(values.max())
    if not np.isfinite(top):
        return top
    return top + float(np.log(np.exp(values.astype(np.float64) - top).sum()))


# ----------------------------------------------------------------- retrievers


@dataclass(frozen=True)
class ListScan:
    """One code's list scanned with one user vector."""

    ids: np.ndarray  # (m,) item ids, best first (u . z descending, then id ascending)
    dots: np.ndarray  # (m,) their u . z
    lse: float  # logsumexp of u . z over the WHOLE list (-inf for an empty list)


class CodeRetriever(Protocol):
    vectors: np.ndarray  # (N+1, D) float32 the item vectors indexed; row 0 is padding
    codes: np.ndarray  # (N+1,) int64 level-1 code of every item; row 0 is NO_CODE
    num_codes: int

    def list_sizes(self, codes: np.ndarray) -> np.ndarray:
        """(K,) codes -> (K,) number of items in each code's list."""

    def scan(
        self, user_vectors: np.ndarray, codes: np.ndarray, m: np.ndarray, bias: np.ndarray | None = None
    ) -> list[ListScan]:
        """user_vectors (K, D), codes (K,), m (K,): the best m[k] items of list codes[k] by user_vectors[k] . z
        (+ bias[item] when a bias (N+1,) is given), and the exact logsumexp of u . z over that whole list."""


def _scan_list(ids: np.ndarray, dots: np.ndarray, want: int, bias: np.ndarray | None = None) -> ListScan:
    """A whole list's u . z (`dots` over `ids`) -> its best `want` items (by dots + bias[ids] with a bias) and the
    exact LSE of the dots."""
    order = top_order(dots if bias is None else dots + bias[ids], ids, want)
    return ListScan(ids=ids[order], dots=dots[order], lse=logsumexp(dots))


def _check_catalogue(vectors: np.ndarray, codes: np.ndarray, num_codes: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    codes = np.asarray(codes, dtype=np.int64).copy()
    if vectors.ndim != 2 or codes.shape != (vectors.shape[0],) or len(codes) < 1:
        raise ValueError(f"vectors (N+1, D) and codes (N+1,) expected, got {vectors.shape} and {codes.shape}")
    codes[0] = NO_CODE
    if len(codes) > 1 and (codes[1:].min() < 0 or codes[1:].max() >= num_codes):
        raise ValueError(f"item codes must lie in [0, {num_codes})")
    vectors = vectors.view()
    vectors.flags.writeable = False
    codes.flags.writeable = False
    return vectors, codes


class BruteForce:
    """The baseline: u . z for ALL items with numpy (U @ Z^T), then each code's members picked by mask."""

    def __init__(self, item_vectors: np.ndarray, item_codes: np.ndarray, num_codes: int):
        self.vectors, self.codes = _check_catalogue(item_vectors, item_codes, num_codes)
        self.num_codes = num_codes
        self._sizes = np.bincount(self.codes[1:], minlength=num_codes)

    def list_sizes(self, codes: np.ndarray) -> np.ndarray:
        return self._sizes[np.asarray(codes, dtype=np.int64)]

    def scan(
        self, user_vectors: np.ndarray, codes: np.ndarray, m: np.ndarray, bias: np.ndarray | None = None
    ) -> list[ListScan]:
        dots = np.asarray(user_vectors, dtype=np.float32) @ self.vectors.T  # (K, N+1): the whole catalogue
        out = []
        for row, code, want in zip(dots, np.asarray(codes).tolist(), np.asarray(m).tolist(), strict=True):
            ids = np.flatnonzero(self.codes == code)
            out.append(_scan_list(ids, row[ids], want, bias))
        return out


@dataclass(frozen=True)
class IndexUpdate:
    """What CodeIndex.update did."""

    moved: int  # items removed and re-added (code or vector changed)
    code_changed: int  # of which the level-1 code changed
    added: int  # new items (beyond the old catalogue)
    removed: int  # items gone (the new catalogue is shorter)
    rebuilt: bool  # too much changed: a full build was cheaper
    written: int  # items written into the index (moved + added, or the whole catalogue when rebuilt)
    seconds: dict  # phases: detect, copy, remove, add, views, total

    @property
    def changed(self) -> int:
        return self.moved + self.added + self.removed


class CodeIndex:
    """A faiss IndexIVFFlat (inner product) whose list c holds exactly the items with level-1 code c.

    Faiss ids are item ids. The object is immutable once built (its faiss index is never modified after the
    constructor), so readers may use it while `update` prepares its successor; swap the reference to publish.
    method: "scan" (numpy over each list's zero-copy view: one pass for the candidates and LSE, exact ties) or
    "faiss" (search_preassigned for the candidates, LSE from the view; ties at the cut follow list order).
    """

    def __init__(self, index, item_vectors: np.ndarray, item_codes: np.ndarray, method: Method = "scan"):
        if method not in ("scan", "faiss"):
            raise ValueError(f"unknown method {method!r}; expected 'scan' or 'faiss'")
        self.index = index
        self.num_codes = int(index.nlist)
        self.vectors, self.codes = _check_catalogue(item_vectors, item_codes, self.num_codes)
        self.method = method
        index.nprobe = 1
        self._views()

    # ------------------------------------------------------------- construction
    @staticmethod
    def _empty(dim: int, num_codes: int, centroids: np.ndarray | None):
        import faiss

        quantizer = faiss.IndexFlatIP(dim)  # never used to assign: lists are preassigned (it only has to exist)
        cent = np.zeros((num_codes, dim), np.float32) if centroids is None else centroids
        quantizer.add(np.ascontiguousarray(cent, dtype=np.float32))
        index = faiss.IndexIVFFlat(quantizer, dim, num_codes, faiss.METRIC_INNER_PRODUCT)
        index.is_trained = True
        return index

    @staticmethod
    def _add(index, vectors: np.ndarray, ids: np.ndarray, codes: np.ndarray) -> None:
        import faiss

        if len(ids) == 0:
            return
        x = np.ascontiguousarray(vectors, dtype=np.float32)
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        lists = np.ascontiguousarray(codes, dtype=np.int64)
        index.add_core(len(ids), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))

    @classmethod
    def build(
        cls,
        item_vectors: np.ndarray,
        item_codes: np.ndarray,
        num_codes: int,
        *,
        centroids: np.ndarray | None = None,
        method: Method = "scan",
    ) -> CodeIndex:
        """item_vectors (N+1, D), item_codes (N+1,) level-1 codes (row 0 ignored). Lists hold ids ascending.
        centroids (C, D): optional level-1 codebook for the (unused) coarse quantiser. item_vectors is kept by
        reference (a read-only view, compared by `update`): the caller must not modify it afterwards."""
        vectors, codes = _check_catalogue(item_vectors, item_codes, num_codes)
        index = cls._empty(vectors.shape[1], num_codes, centroids)
        order = np.argsort(codes[1:], kind="stable") + 1  # by list, ids ascending inside each list
        cls._add(index, vectors[order], order, codes[order])
        return cls(index, vectors, codes, method)

    def _views(self) -> None:
        """Zero-copy read-only numpy views of every list's vectors and ids (each keeps the faiss index alive)."""
        import faiss

        inv = self.index.invlists
        d = self.vectors.shape[1]
        self._list_vectors, self._list_ids = [], []
        sizes = np.zeros(self.num_codes, dtype=np.int64)
        for c in range(self.num_codes):
            n = int(inv.list_size(c))
            sizes[c] = n
            if n == 0:
                v, i = np.zeros((0, d), np.float32), np.zeros(0, np.int64)
            else:
                v = _Memory.view(self.index, faiss.rev_swig_ptr(inv.get_codes(c), n * d * 4), (n, d), "<f4")
                i = _Memory.view(self.index, faiss.rev_swig_ptr(inv.get_ids(c), n), (n,), "<i8")
            v.flags.writeable = False
            i.flags.writeable = False
            self._list_vectors.append(v)
            self._list_ids.append(i)
        self._sizes = sizes

    # ------------------------------------------------------------- reading
    @property
    def num_items(self) -> int:
        return len(self.codes) - 1

    def list_sizes(self, codes: np.ndarray) -> np.ndarray:
        return self._sizes[np.asarray(codes, dtype=np.int64)]

    def list_members(self, code: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids (n,), vectors (n, D)) of one list: read-only zero-copy views, in the index's own order."""
        return self._list_ids[code], self._list_vectors[code]

    def scan(
        self, user_vectors: np.ndarray, codes: np.ndarray, m: np.ndarray, bias: np.ndarray | None = None
    ) -> list[ListScan]:
        user_vectors = np.ascontiguousarray(user_vectors, dtype=np.float32)
        codes = np.asarray(codes, dtype=np.int64)
        wants = np.asarray(m, dtype=np.int64).tolist()
        if self.method == "faiss" and bias is None:  # faiss ranks by u . z alone: a bias takes the numpy scan
            return self._scan_faiss(user_vectors, codes, wants)
        out = []
        for u, code, want in zip(user_vectors, codes.tolist(), wants, strict=True):
            out.append(_scan_list(self._list_ids[code], self._list_vectors[code] @ u, want, bias))
        return out

    def _scan_faiss(self, user_vectors: np.ndarray, codes: np.ndarray, wants: list[int]) -> list[ListScan]:
        top = max(wants, default=0)
        if top > 0:
            dots, ids = self.index.search_preassigned(user_vectors, top, codes[:, None], None)
        out = []
        for k, (u, code, want) in enumerate(zip(user_vectors, codes.tolist(), wants, strict=True)):
            lse = logsumexp(self._list_vectors[code] @ u)
            if want <= 0:
                out.append(ListScan(ids=np.zeros(0, np.int64), dots=np.zeros(0, np.float32), lse=lse))
                continue
            got_ids, got = ids[k, :want], dots[k, :want]
            keep = got_ids >= 0
            got_ids, got = got_ids[keep], got[keep]
            order = np.lexsort((got_ids, -got))
            out.append(ListScan(ids=got_ids[order], dots=got[order], lse=lse))
        return out

    # ------------------------------------------------------------- updating
    def update(
        self, item_vectors: np.ndarray, item_codes: np.ndarray, *, rebuild_fraction: float = 0.5
    ) -> tuple[CodeIndex, IndexUpdate]:
        """A new CodeIndex for a new snapshot's item vectors (N'+1, D) and level-1 codes (N'+1,).

        Only items whose code changed or whose vector changed (bitwise) are moved (removed, then re-added to
        their new list); items beyond the old catalogue are added, items beyond the new one removed. The work
        happens on a copy of the faiss index, so `self` keeps answering unchanged until the caller swaps the
        reference. When more than `rebuild_fraction` of the catalogue would move, a full build is done instead
        (IndexUpdate.rebuilt). The result answers exactly like CodeIndex.build on the new arrays.
        """
        import faiss

        t0 = time.perf_counter()
        vectors, codes = _check_catalogue(item_vectors, item_codes, self.num_codes)
        if vectors.shape[1] != self.vectors.shape[1]:
            raise ValueError(f"dimension changed ({self.vectors.shape[1]} -> {vectors.shape[1]}): rebuild")
        n_old, n_new = self.num_items, len(codes) - 1
        common = min(n_old, n_new)
        code_changed = self.codes[1 : common + 1] != codes[1 : common + 1]
        changed = code_changed | _rows_differ(self.vectors[1 : common + 1], vectors[1 : common + 1])
        moved = np.flatnonzero(changed) + 1
        added = np.arange(common + 1, n_new + 1, dtype=np.int64)
        removed = np.arange(common + 1, n_old + 1, dtype=np.int64)
        t_detect = time.perf_counter()
        counts = {"moved": len(moved), "code_changed": int(code_changed.sum()), "added": len(added),
                  "removed": len(removed)}
        if len(moved) + len(added) + len(removed) > rebuild_fraction * max(n_new, 1):
            new = CodeIndex.build(vectors, codes, self.num_codes, method=self.method)
            t_end = time.perf_counter()
            seconds = {"detect": t_detect - t0, "build": t_end - t_detect, "total": t_end - t0}
            return new, IndexUpdate(**counts, rebuilt=True, written=n_new, seconds=seconds)
        index = faiss.clone_index(self.index)  # the served index is never touched
        t_copy = time.perf_counter()
        gone = np.concatenate([moved, removed])
        if len(gone):
            n_gone = index.remove_ids(faiss.IDSelectorBatch(len(gone), faiss.swig_ptr(gone)))
            if n_gone != len(gone):
                raise RuntimeError(f"index out of sync: removed {n_gone} of {len(gone)} ids")
        t_remove = time.perf_counter()
        put = np.concatenate([moved, added])
        self._add(index, vectors[put], put, codes[put])
        t_add = time.perf_counter()
        new = CodeIndex(index, vectors, codes, self.method)
        t_end = time.perf_counter()
        seconds = {
            "detect": t_detect - t0, "copy": t_copy - t_detect, "remove": t_remove - t_copy,
            "add": t_add - t_remove, "views": t_end - t_add, "total": t_end - t0,
        }
        return new, IndexUpdate(**counts, rebuilt=False, written=len(put), seconds=seconds)


class _Memory:
    """A numpy view of memory owned by a faiss object, holding a reference to that object (the view's base)."""

    def __init__(self, owner, address: int, shape: tuple[int, ...], typestr: str):
        self.owner = owner
        self.__array_interface__ = {"shape": shape, "typestr": typestr, "data": (address, False), "version": 3}

    @classmethod
    def view(cls, owner, raw: np.ndarray, shape: tuple[int, ...], typestr: str) -> np.ndarray:
        """raw: faiss.rev_swig_ptr's (non-owning) array over the memory."""
        return np.asarray(cls(owner, raw.__array_interface__["data"][0], shape, typestr))


def _rows_differ(a: np.ndarray, b: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """(n,) True where rows of a and b differ bitwise (in chunks: no n x D temporary)."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    out = np.zeros(a.shape[0], dtype=bool)
    if a.shape[0] == 0:
        return out
    ia, ib = a.view(np.uint32), b.view(np.uint32)
    for start in range(0, a.shape[0], chunk):
        out[start : start + chunk] = (ia[start : start + chunk] != ib[start : start + chunk]).any(axis=1)
    return out


# ----------------------------------------------------------------- search


@dataclass
class SearchResult:
    items: np.ndarray  # (n,) item ids, best first; n <= k
    scores: np.ndarray  # (n,) soft: log p_k + u_k.z - LSE_k (log mixture probability); hard: u.z
    codes: np.ndarray  # (K,) the level-1 codes searched
    weights: np.ndarray  # (K,) their renormalised probabilities
    quotas: np.ndarray  # (K,) slots given to each code before free slots were redistributed
    explored: int = 0  # exploration slots: the last `explored` items, ordered by score + bias (module doc)


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


def _log(weights: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(np.asarray(weights, dtype=np.float64))


def _sorted_by_score(items: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((items, -scores))
    return items[order], scores[order]


def soft_search(
    user_vectors: np.ndarray,
    weights: np.ndarray,
    codes: np.ndarray,
    retriever: CodeRetriever,
    k: int,
    *,
    exploit: int | None = None,
    bias: np.ndarray | None = None,
) -> SearchResult:
    """user_vectors (K, D): one per chosen code; weights (K,) sum to 1; codes (K,) distinct. The merged top-k
    (module docstring: per-code lists, exact LSE, quotas, free slots to the best remaining candidates); with
    `exploit` < k and an item `bias` (N+1,), the slots after the first `exploit` explore (module doc, step 5)."""
    if exploit is not None and exploit < k:
        if bias is None or exploit < len(codes):
            raise ValueError(f"exploration slots need an item bias and exploit >= the codes searched ({len(codes)})")
        head = soft_search(user_vectors, weights, codes, retriever, exploit)
        items, scores = _explore(user_vectors, weights, np.asarray(codes, dtype=np.int64), retriever,
                                 k - len(head.items), bias, head.items)
        return SearchResult(items=np.concatenate([head.items, items]),
                            scores=np.concatenate([head.scores, scores.astype(np.float32)]), codes=head.codes,
                            weights=weights, quotas=head.quotas, explored=len(items))
    codes = np.asarray(codes, dtype=np.int64)
    if len(np.unique(codes)) != len(codes):
        raise ValueError(f"codes searched must be distinct, got {codes.tolist()}")
    if len(user_vectors) != len(codes) or len(weights) != len(codes):
        raise ValueError(f"one user vector and one weight per code: {len(user_vectors)}, {len(weights)}, "
                         f"{len(codes)}")
    quotas = allocate_quotas(weights, k)
    sizes = retriever.list_sizes(codes)
    free = int(k - np.minimum(quotas, sizes).sum())  # slots short lists cannot fill
    scans = retriever.scan(user_vectors, codes, np.minimum(sizes, quotas + free))
    logw = _log(weights)
    items, scores, rest_items, rest_scores = [], [], [], []
    for scan, quota, lw in zip(scans, quotas.tolist(), logw.tolist(), strict=True):
        s = lw + scan.dots.astype(np.float64) - scan.lse
        items.append(scan.ids[:quota])
        scores.append(s[:quota])
        rest_items.append(scan.ids[quota:])
        rest_scores.append(s[quota:])
    if free > 0:
        pool_items, pool_scores = _sorted_by_score(np.concatenate(rest_items), np.concatenate(rest_scores))
        items.append(pool_items[:free])
        scores.append(pool_scores[:free])
    items, merged = _sorted_by_score(np.concatenate(items).astype(np.int64), np.concatenate(scores))
    return SearchResult(items=items, scores=merged.astype(np.float32), codes=codes, weights=weights, quotas=quotas)


def _explore(user_vectors, weights, codes, retriever: CodeRetriever, n: int, bias: np.ndarray,
             taken: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The best n items of the chosen lists that are not `taken`, by log p_k + u_k.z - LSE_k + bias (ties by id):
    (ids, their log mixture probabilities), best first."""
    if n <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    wants = np.minimum(retriever.list_sizes(codes), n + len(taken))  # enough left after the taken ones
    ids, scores = [], []
    for scan, lw in zip(retriever.scan(user_vectors, codes, wants, bias), _log(weights).tolist(), strict=True):
        fresh = ~np.isin(scan.ids, taken)
        ids.append(scan.ids[fresh])
        scores.append(lw + scan.dots[fresh].astype(np.float64) - scan.lse)
    ids, scores = np.concatenate(ids).astype(np.int64), np.concatenate(scores)
    order = np.lexsort((ids, -(scores + bias[ids])))[:n]
    return ids[order], scores[order]


def hard_search(user_vector: np.ndarray, code: int, retriever: CodeRetriever, k: int) -> SearchResult:
    """The list of `code` only: its top-k by u . z (fewer when the list is smaller)."""
    (scan,) = retriever.scan(np.asarray(user_vector, dtype=np.float32)[None], np.array([code]), np.array([k]))
    return SearchResult(items=scan.ids, scores=scan.dots.astype(np.float32), codes=np.array([code]),
                        weights=np.ones(1), quotas=np.array([k]))


def soft_search_reference(
    user_vectors: np.ndarray,
    weights: np.ndarray,
    codes: np.ndarray,
    item_vectors: np.ndarray,
    item_codes: np.ndarray,
    k: int,
    *,
    exploit: int | None = None,
    bias: np.ndarray | None = None,
) -> SearchResult:
    """The definition (module docstring) by brute force with numpy over ALL items and full sorts: u_k . z for
    every item, members of each list by mask. Independent of the retrievers (tests; recall in the benchmark)."""
    if exploit is not None and exploit < k:
        head = soft_search_reference(user_vectors, weights, codes, item_vectors, item_codes, exploit)
        item_codes = np.asarray(item_codes, dtype=np.int64)
        ids, scores = [], []
        for u, code, lw in zip(np.asarray(user_vectors, dtype=np.float32), np.asarray(codes).tolist(),
                                _log(weights).tolist(), strict=True):
            members = np.flatnonzero(item_codes == code)
            members = members[members > 0]
            s = np.asarray(item_vectors, dtype=np.float32)[members] @ u
            fresh = ~np.isin(members, head.items)
            ids.append(members[fresh])
            scores.append(lw + s[fresh].astype(np.float64) - logsumexp(s))
        ids, scores = np.concatenate(ids).astype(np.int64), np.concatenate(scores)
        order = np.lexsort((ids, -(scores + np.asarray(bias)[ids])))[: k - len(head.items)]
        return SearchResult(items=np.concatenate([head.items, ids[order]]),
                            scores=np.concatenate([head.scores, scores[order].astype(np.float32)]),
                            codes=head.codes, weights=weights, quotas=head.quotas, explored=len(order))
    codes = np.asarray(codes, dtype=np.int64)
    item_codes = np.asarray(item_codes, dtype=np.int64)
    quotas = allocate_quotas(weights, k)
    dots = np.asarray(user_vectors, dtype=np.float32) @ np.asarray(item_vectors, dtype=np.float32).T  # (K, N+1)
    all_ids = np.arange(len(item_codes))
    chosen, rest = [], []  # (ids, scores) per code: within quota / beyond it
    for row, code, quota, lw in zip(dots, codes.tolist(), quotas.tolist(), _log(weights).tolist(), strict=True):
        member = all_ids[1:][item_codes[1:] == code]
        s = row[member]
        order = np.lexsort((member, -s))  # full sort of the list: u.z descending, id ascending
        score = lw + s[order].astype(np.float64) - logsumexp(s)
        chosen.append((member[order][:quota], score[:quota]))
        rest.append((member[order][quota:], score[quota:]))
    items = np.concatenate([c[0] for c in chosen])
    scores = np.concatenate([c[1] for c in chosen])
    free = k - len(items)
    if free > 0:
        pool_items, pool_scores = _sorted_by_score(np.concatenate([r[0] for r in rest]),
                                                   np.concatenate([r[1] for r in rest]))
        items = np.concatenate([items, pool_items[:free]])
        scores = np.concatenate([scores, pool_scores[:free]])
    items, scores = _sorted_by_score(items.astype(np.int64), scores)
    return SearchResult(items=items, scores=scores.astype(np.float32), codes=codes, weights=weights, quotas=quotas)


def allocate_quotas_rows(weights: np.ndarray, k: int) -> np.ndarray:
    """allocate_quotas for each row of weights (S, K): the same arithmetic, row by row, vectorised."""
    weights = np.asarray(weights)
    rows, n = weights.shape
    if k < n:
        raise ValueError(f"k={k} is smaller than the number of codes searched ({n}); each needs a slot")
    share = weights / weights.sum(axis=1, keepdims=True) * (k - n)
    quotas = np.floor(share).astype(np.int64)
    rest = k - n - quotas.sum(axis=1)
    order = np.argsort(-(share - quotas), axis=1, kind="stable")
    position = np.empty_like(order)
    np.put_along_axis(position, order, np.arange(n)[None, :].repeat(rows, 0), axis=1)
    return quotas + (position < rest[:, None]) + 1


def served_scores(scores, item_codes, codes, weights, k: int, *, exploit: int | None = None, bias=None):
    """soft_search's answers for a batch, from full-catalogue scores: what a user is served, as a score matrix.

    scores (S, N+1): each row's log mixture probability of every item (torch; only the order within each list
    matters, so log p_k + u_k.z - LSE_k up to a per-row constant, as SparcModel's factorised scores are);
    item_codes (N+1,) level-1 code per item (-1 for row 0); codes (S, K) the codes searched; weights (S, K) their
    probabilities (any positive scale per row). Returns scores (S, N+1) equal to `scores` on the items soft search
    serves with k slots (quotas, free slots: the module docstring) and -inf elsewhere. Ties are broken by torch's
    topk, not by id: exact equality with soft_search holds where scores are distinct.
    With exploration slots (exploit < k, bias (N+1,) torch; module doc, step 5) the served items get values that
    encode their slots instead (the first `exploit` by score, then the explored ones by score + bias: higher is
    earlier), -inf elsewhere; here `scores` must be exact log mixture probabilities within the chosen lists.
    """
    import torch

    if exploit is not None and exploit < k:
        head = served_scores(scores, item_codes, codes, weights, exploit)
        taken = torch.isfinite(head)
        member = (item_codes[None, None, :] == codes[:, :, None]).any(dim=1)  # (S, N+1) in a chosen list
        lift = (scores + bias).masked_fill(~member | taken, -math.inf)
        width = min(k, scores.shape[1])
        explore_v, explore_at = lift.topk(width, dim=1)
        room = k - taken.sum(dim=1, keepdim=True)  # (S, 1)
        explore_ok = (torch.arange(width, device=scores.device)[None, :] < room) & torch.isfinite(explore_v)
        head_v, head_at = head.topk(min(exploit, scores.shape[1]), dim=1)
        out = torch.full_like(scores, -math.inf)
        # 2k, 2k-1, ..., 1: a value per slot
        slots = torch.arange(2 * k, 0, -1, dtype=scores.dtype, device=scores.device)
        out.scatter_(1, head_at, torch.where(torch.isfinite(head_v), slots[None, : head_at.shape[1]], -math.inf))
        value = torch.where(explore_ok, slots[k : k + width][None, :], -math.inf)
        rows = torch.arange(scores.shape[0], device=scores.device)[:, None].expand_as(explore_at)
        out[rows[explore_ok], explore_at[explore_ok]] = value[explore_ok]
        return out
    S, K = codes.shape
    quotas = torch.from_numpy(allocate_quotas_rows(np.asarray(weights), k)).to(scores.device)  # (S, K)
    vals, ids = [], []
    for j in range(K):
        member = item_codes[None, :] == codes[:, j, None]  # (S, N+1)
        v, i = scores.masked_fill(~member, -math.inf).topk(min(k, scores.shape[1]), dim=1)
        vals.append(v)
        ids.append(i)
    vals, ids = torch.stack(vals, 1), torch.stack(ids, 1)  # (S, K, k)
    finite = torch.isfinite(vals)
    take = torch.minimum(quotas, finite.sum(-1))  # each code's own slots
    within = torch.arange(vals.shape[-1], device=scores.device)[None, None, :] < take[..., None]
    free = k - take.sum(1)  # slots short lists could not fill, for the best of the rest
    pool = vals.masked_fill(within | ~finite, -math.inf).reshape(S, -1)
    pool_v, pool_at = pool.topk(min(k, pool.shape[1]), dim=1)
    pool_keep = (torch.arange(pool_v.shape[1], device=scores.device)[None, :] < free[:, None]) & torch.isfinite(pool_v)
    chosen = torch.cat([ids.masked_fill(~within, 0).reshape(S, -1),
                        ids.reshape(S, -1).gather(1, pool_at).masked_fill(~pool_keep, 0)], dim=1)
    keep = torch.cat([within.reshape(S, -1), pool_keep], dim=1)
    out = torch.full_like(scores, -math.inf)
    rows = torch.arange(S, device=scores.device)[:, None].expand_as(chosen)
    out[rows[keep], chosen[keep]] = scores[rows[keep], chosen[keep]]
    return out


def explore_ranking(scores, bias, exploit: int):
    """Full-catalogue scores (S, N+1, torch) ranked with exploration slots (module doc, step 5, over the whole
    catalogue): the `exploit` highest-scoring items of each row first, in score order, then every other item by
    score + bias (N+1,). Returns values that encode this order (higher is earlier); -inf stays -inf."""
    import torch

    lift = scores + bias
    top_v, top_at = scores.topk(min(exploit, scores.shape[1]), dim=1)
    ceiling = lift.masked_fill(~torch.isfinite(lift), -math.inf).amax(dim=1, keepdim=True)
    steps = torch.arange(top_at.shape[1], 0, -1, dtype=scores.dtype, device=scores.device)
    above = ceiling + steps[None, :]  # ceiling + E, ..., + 1
    return lift.scatter(1, top_at, torch.where(torch.isfinite(top_v), above, -math.inf))


def hard_search_reference(
    user_vector: np.ndarray, code: int, item_vectors: np.ndarray, item_codes: np.ndarray, k: int
) -> np.ndarray:
    """Brute-force hard search: the items of `code`, by u . z descending then id, first k."""
    item_codes = np.asarray(item_codes, dtype=np.int64)
    member = np.flatnonzero(item_codes == code)
    member = member[member > 0]
    s = np.asarray(item_vectors, dtype=np.float32)[member] @ np.asarray(user_vector, dtype=np.float32)
    return member[np.lexsort((member, -s))][:k]


# ----------------------------------------------------------------- serving a model


def retrieve(
    model,
    history: np.ndarray,
    retriever: CodeRetriever,
    k: int = 50,
    *,
    top_codes: int = 4,
    explore: float = 0.0,
    temperature: float = 1.0,
    hard: bool = False,
    rng: np.random.Generator | None = None,
    catalogue=None,
    exploit: int | None = None,
    lift: float = 0.0,
) -> SearchResult:
    """Serve one user with a SparcModel: interest distribution -> codes -> user vectors -> per-code search.

    history: the user's items, oldest first. The retriever must index the model's current item vectors and
    level-1 codes (model.catalogue()); `catalogue` passes that catalogue in, computed once (a frozen model's
    catalogue does not change), instead of recomputing it for every request. exploit < k: the slots after the
    first `exploit` explore by p(i | u) / q(i)^lift (soft_search's step 5, model.lift_bias).
    """
    import torch

    from trainer.batches import pad_histories

    if model.training:
        model.eval()
    with torch.no_grad():
        inputs, lengths = pad_histories([np.asarray(history, dtype=np.int64)], model.cfg.encoder.max_len)
        cat = catalogue if catalogue is not None else model.catalogue()
        if cat.z.shape[0] != retriever.vectors.shape[0]:
            raise ValueError(f"the retriever indexes {retriever.vectors.shape[0] - 1} items, the model "
                             f"{cat.z.shape[0] - 1}: rebuild it from model.catalogue()")
        state = model.encode(inputs, lengths, cat.z)
        probs = torch.softmax(model.interest_logits(state.h, cat.z, cat.codes)[0] / temperature, dim=-1).numpy()
        if hard:
            code = int(probs.argmax())
            u = model.code_vectors(state, torch.tensor([[code]]))[0, 0].numpy()
            return hard_search(u, code, retriever, k)
        codes, weights = choose_codes(probs, top_codes, explore, rng)
        u = model.code_vectors(state, torch.from_numpy(codes)[None])[0].numpy()  # (K, D)
        bias = None if exploit is None else model.lift_bias(lift).double().numpy()
    return soft_search(u, weights, codes, retriever, k, exploit=exploit, bias=bias)
