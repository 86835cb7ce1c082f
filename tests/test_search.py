"""trainer.search: quotas, code choice, per-code soft/hard search (faiss IVF lists = level-1 codes, brute force)
against the brute-force reference of the same definition, exact LSE, serving a model."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from trainer.batches import make_batch, pad_histories
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.model import SparcModel
from trainer.search import (
    BruteForce,
    CodeIndex,
    allocate_quotas,
    allocate_quotas_rows,
    choose_codes,
    explore_ranking,
    hard_search,
    hard_search_reference,
    logsumexp,
    retrieve,
    served_scores,
    soft_search,
    soft_search_reference,
    top_order,
)
from trainer.step import Trainer


def scan_index(z, codes, num_codes):
    return CodeIndex.build(z, codes, num_codes, method="scan")


def faiss_index(z, codes, num_codes):
    return CodeIndex.build(z, codes, num_codes, method="faiss")


RETRIEVERS = [scan_index, faiss_index, BruteForce]
IDS = ["ivf-scan", "ivf-faiss", "brute"]


# ----------------------------------------------------------------- quotas and codes


def test_allocate_quotas_by_hand():
    # 3 guaranteed slots, 7 shared as 3.5 / 2.1 / 1.4 -> floors 3, 2, 1 and the largest remainder (0.5) wins
    assert allocate_quotas(np.array([0.5, 0.3, 0.2]), 10).tolist() == [5, 3, 2]
    assert allocate_quotas(np.array([0.2, 0.3, 0.5]), 10).tolist() == [2, 3, 5]  # the remainder goes last
    assert allocate_quotas(np.array([0.1, 0.3, 0.6]), 8).tolist() == [2, 2, 4]  # 0.5, 1.5, 3.0: tie -> first
    assert allocate_quotas(np.array([0.9, 0.05, 0.05]), 3).tolist() == [1, 1, 1]
    assert allocate_quotas(np.array([1.0]), 7).tolist() == [7]
    assert allocate_quotas(np.array([2.0, 2.0]), 6).tolist() == [3, 3]  # unnormalised weights are fine


def test_allocate_quotas_properties():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 8))
        k = int(rng.integers(n, 60))
        w = rng.dirichlet(np.ones(n))
        q = allocate_quotas(w, k)
        assert q.dtype.kind == "i"
        assert q.sum() == k
        assert (q >= 1).all()
        share = w / w.sum() * (k - n)
        assert (np.abs((q - 1) - share) < 1.0).all()  # proportional up to rounding
        extra = (q - 1) > np.floor(share)  # largest remainders get the leftover slots
        rem = share - np.floor(share)
        if extra.any() and (~extra).any():
            assert rem[extra].min() >= rem[~extra].max() - 1e-12


def test_allocate_quotas_needs_a_slot_per_code():
    with pytest.raises(ValueError, match="smaller than the number of codes"):
        allocate_quotas(np.array([0.5, 0.3, 0.2]), 2)


PROBS = np.array([0.1, 0.4, 0.05, 0.3, 0.15])


def test_choose_codes_without_exploration_is_top_k():
    codes, weights = choose_codes(PROBS, 3)
    assert codes.tolist() == [1, 3, 4]
    np.testing.assert_allclose(weights, np.array([0.4, 0.3, 0.15]) / 0.85)
    codes, weights = choose_codes(PROBS, 10)  # capped at the number of codes
    assert sorted(codes.tolist()) == [0, 1, 2, 3, 4]
    assert weights.sum() == pytest.approx(1.0)


def test_choose_codes_exploration_is_seeded_and_leaves_the_top_k():
    a = choose_codes(PROBS, 2, explore=0.5, rng=np.random.default_rng(3))
    b = choose_codes(PROBS, 2, explore=0.5, rng=np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    outside = 0
    for seed in range(50):
        codes, weights = choose_codes(PROBS, 2, explore=0.8, rng=np.random.default_rng(seed))
        assert len(set(codes.tolist())) == 2
        assert weights.sum() == pytest.approx(1.0)
        outside += bool(set(codes.tolist()) - {1, 3})
    assert outside > 0, "exploration never reached a code beyond the top-2"
    codes, weights = choose_codes(PROBS, 3, explore=1.0, rng=np.random.default_rng(0))
    np.testing.assert_allclose(weights, np.full(3, 1 / 3))  # fully flattened distribution


@pytest.mark.parametrize("explore", [-0.1, 1.5])
def test_choose_codes_rejects_bad_explore(explore):
    with pytest.raises(ValueError, match="explore"):
        choose_codes(PROBS, 2, explore=explore)


# ----------------------------------------------------------------- selection helpers


def test_top_order_breaks_ties_by_id_even_at_the_cut():
    dots = np.array([1.0, 3.0, 2.0, 3.0, 2.0, 2.0], dtype=np.float32)
    ids = np.array([10, 7, 5, 3, 9, 1])
    assert ids[top_order(dots, ids, 4)].tolist() == [3, 7, 1, 5]  # 3.0 (ids 3, 7), then 2.0 ties: ids 1, 5
    assert ids[top_order(dots, ids, 10)].tolist() == [3, 7, 1, 5, 9, 10]
    assert top_order(dots, ids, 0).tolist() == [] and top_order(dots[:0], ids[:0], 3).tolist() == []


def test_top_order_on_long_lists_equals_a_full_sort():
    rng = np.random.default_rng(0)
    for n, m in ((2000, 50), (5000, 7), (900, 200), (3000, 1)):
        dots = rng.integers(0, 40, size=n).astype(np.float32)  # hundreds of ties at every value
        ids = rng.permutation(n) + 1
        expected = np.lexsort((ids, -dots))[:m]
        np.testing.assert_array_equal(top_order(dots, ids, m), expected)
        real = rng.normal(size=n).astype(np.float32)
        np.testing.assert_array_equal(top_order(real, ids, m), np.lexsort((ids, -real))[:m])


def test_logsumexp_is_exact_and_stable():
    x = np.array([1000.0, 1000.0, 999.0], dtype=np.float32)
    assert logsumexp(x) == pytest.approx(1000 + np.log(2 + np.exp(-1.0)), rel=1e-12)
    assert logsumexp(np.zeros(0, np.float32)) == -np.inf
    assert logsumexp(np.array([-np.inf, -np.inf])) == -np.inf


# ----------------------------------------------------------------- per-code search vs the reference


def random_case(seed: int):
    """Items with random level-1 codes (some codes have no items), distinct chosen codes, k of any size."""
    rng = np.random.default_rng(seed)
    n_items, dim = int(rng.integers(20, 200)), int(rng.integers(4, 12))
    num_codes = int(rng.integers(2, 16))
    used = rng.choice(num_codes, size=int(rng.integers(1, num_codes + 1)), replace=False)  # others stay empty
    item_codes = rng.choice(used, size=n_items + 1)
    items = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    n_codes = int(rng.integers(1, min(5, num_codes) + 1))
    codes = rng.choice(num_codes, size=n_codes, replace=False)
    users = rng.normal(size=(n_codes, dim)).astype(np.float32)
    weights = rng.dirichlet(np.ones(n_codes))
    k = int(rng.integers(n_codes, 60))
    return items, item_codes, num_codes, users, weights, codes, k


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_soft_search_equals_reference(make):
    for seed in range(60):
        items, item_codes, num_codes, users, weights, codes, k = random_case(seed)
        got = soft_search(users, weights, codes, make(items, item_codes, num_codes), k)
        ref = soft_search_reference(users, weights, codes, items, item_codes, k)
        np.testing.assert_array_equal(got.items, ref.items, err_msg=f"seed {seed}")
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
        members = np.isin(item_codes[1:], codes).sum()
        assert len(got.items) == min(k, members) and len(set(got.items.tolist())) == len(got.items)
        assert (got.items > 0).all() and np.isin(item_codes[got.items], codes).all()  # only the chosen lists
        assert got.quotas.sum() == k
        np.testing.assert_array_equal(got.codes, codes)
        assert (np.diff(got.scores) <= 1e-6).all()  # best first
        for code, quota in zip(codes, got.quotas, strict=True):  # every code fills its quota when it can
            size = int((item_codes[1:] == code).sum())
            assert (item_codes[got.items] == code).sum() >= min(quota, size)


def test_allocate_quotas_rows_equals_allocate_quotas_row_by_row():
    rng = np.random.default_rng(3)
    for n in (1, 2, 4, 8):
        weights = rng.dirichlet(np.ones(n), size=50)
        weights[:5] = 1.0 / n  # equal weights: remainders tie, the stable order decides
        for k in (n, n + 3, 20, 50):
            rows = allocate_quotas_rows(weights, k)
            assert rows.tolist() == [allocate_quotas(w, k).tolist() for w in weights]
    with pytest.raises(ValueError, match="each needs a slot"):
        allocate_quotas_rows(np.full((2, 4), 0.25), 3)


def random_mixture(rng, items, item_codes, num_codes: int, rows: int):
    """`rows` users of up to 3 random distinct codes each: (codes (R, K), weights (R, K), user vectors (R, K, D),
    scores (R, N+1)): each row's log mixture probability log p_k + u_k.z - LSE_k on code c_k's items, -5 elsewhere
    and -inf at padding."""
    n_codes = min(3, num_codes)
    codes = np.stack([rng.choice(num_codes, size=n_codes, replace=False) for _ in range(rows)])
    weights = rng.dirichlet(np.ones(n_codes), size=rows)
    users = rng.normal(size=(rows, n_codes, items.shape[1])).astype(np.float32)
    scores = np.full((rows, len(items)), -5.0)
    for r in range(rows):
        for j in range(n_codes):
            member = np.flatnonzero(item_codes == codes[r, j])
            member = member[member > 0]
            dots = (items[member] @ users[r, j]).astype(np.float64)
            scores[r, member] = np.log(weights[r, j]) + dots - logsumexp(dots)
    scores[:, 0] = -np.inf
    return codes, weights, users, scores


def test_served_scores_keep_exactly_what_soft_search_serves():
    """The batched form (offline evaluation) against soft_search on a brute-force retriever, row by row."""
    for seed in range(40):
        items, item_codes, num_codes, _, _, _, k = random_case(seed)
        rng = np.random.default_rng(100 + seed)
        rows = 6
        codes, weights, users, scores = random_mixture(rng, items, item_codes, num_codes, rows)
        k = max(k, codes.shape[1])
        served = served_scores(torch.from_numpy(scores), torch.from_numpy(np.where(np.arange(len(items)) == 0, -1,
                                                                                    item_codes)),
                               torch.from_numpy(codes), weights, k).numpy()
        for r in range(rows):
            ref = soft_search(users[r], weights[r], codes[r], BruteForce(items, item_codes, num_codes), k)
            kept = np.flatnonzero(np.isfinite(served[r]))
            assert sorted(kept.tolist()) == sorted(ref.items.tolist()), f"seed {seed} row {r}"
            np.testing.assert_allclose(served[r, kept], scores[r, kept])


def test_served_scores_with_more_slots_than_items():
    items, item_codes, users = disjoint_codes([3, 2])  # 5 items in all, 20 slots asked
    retriever = BruteForce(items, item_codes, 2)
    for codes, weights in ((np.array([[0]]), np.array([[1.0]])), (np.array([[1, 0]]), np.array([[0.7, 0.3]]))):
        scores = np.full((1, len(items)), -np.inf)
        for j, code in enumerate(codes[0]):
            member = np.flatnonzero(item_codes == code)[1:] if code == 0 else np.flatnonzero(item_codes == code)
            dots = (items[member] @ users[code]).astype(np.float64)
            scores[0, member] = np.log(weights[0, j]) + dots - logsumexp(dots)
        served = served_scores(torch.from_numpy(scores), torch.from_numpy(np.where(np.arange(len(items)) == 0, -1,
                                                                                    item_codes)),
                               torch.from_numpy(codes), weights, 20).numpy()
        expected = soft_search(users[codes[0]], weights[0], codes[0], retriever, 20).items
        assert sorted(np.flatnonzero(np.isfinite(served[0])).tolist()) == sorted(expected.tolist())


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_soft_scores_are_log_mixture_probabilities_with_exact_lse(make):
    for seed in range(10):
        items, item_codes, num_codes, users, weights, codes, k = random_case(seed)
        retriever = make(items, item_codes, num_codes)
        result = soft_search(users, weights, codes, retriever, k)
        for item, score in zip(result.items, result.scores, strict=True):
            j = int(np.flatnonzero(codes == item_codes[item])[0])
            members = np.flatnonzero(item_codes == codes[j])
            members = members[members > 0]
            logits = (items[members] @ users[j]).astype(np.float64)
            softmax = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            expected = weights[j] * softmax[members == item][0]
            assert np.exp(score) == pytest.approx(expected, rel=1e-4)
        sizes = retriever.list_sizes(codes)
        for scan, code, u, size in zip(retriever.scan(users, codes, sizes), codes, users, sizes, strict=True):
            members = np.flatnonzero(item_codes == code)
            members = members[members > 0]
            assert len(scan.ids) == size and sorted(scan.ids.tolist()) == members.tolist()
            exact = np.log(np.exp((items[members] @ u).astype(np.float64)).sum()) if size else -np.inf
            assert scan.lse == pytest.approx(exact, rel=1e-6, abs=1e-6)


def disjoint_codes(sizes: list[int]):
    """Code c holds sizes[c] items along axis c with u.z = size, size-1, ..., 1; the user vectors are the axes."""
    rows, item_codes = [np.zeros(len(sizes))], [0]
    for c, n in enumerate(sizes):
        for v in range(n, 0, -1):
            rows.append(np.eye(len(sizes))[c] * v)
            item_codes.append(c)
    return np.array(rows, dtype=np.float32), np.array(item_codes), np.eye(len(sizes), dtype=np.float32)


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_each_code_fills_its_quota_from_its_own_list(make):
    items, item_codes, users = disjoint_codes([4, 4])  # code 0: items 1..4, code 1: items 5..8
    result = soft_search(users, np.array([0.75, 0.25]), np.array([0, 1]), make(items, item_codes, 2), 4)
    assert result.quotas.tolist() == [3, 1]
    lse = np.log(np.exp([4.0, 3.0, 2.0, 1.0]).sum())  # the same for both lists
    # code 0 gives 1, 2, 3 and code 1 gives 5; log .75 - 1 > log .25, so item 2 (code 0) ranks above item 5
    assert result.items.tolist() == [1, 2, 5, 3]
    np.testing.assert_allclose(result.scores, np.log([0.75, 0.75, 0.25, 0.75]) + [4, 3, 4, 2] - lse, rtol=1e-6)


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_free_slots_of_short_lists_go_to_the_best_remaining_candidates(make):
    items, item_codes, users = disjoint_codes([1, 6, 6])  # code 0 holds a single item (1)
    weights = np.array([0.5, 0.3, 0.2])
    result = soft_search(users, weights, np.array([0, 1, 2]), make(items, item_codes, 3), 8)
    assert result.quotas.tolist() == [4, 2, 2]  # code 0 can use 1 slot: 3 are free
    ref = soft_search_reference(users, weights, np.array([0, 1, 2]), items, item_codes, 8)
    np.testing.assert_array_equal(result.items, ref.items)
    assert len(result.items) == 8
    # after the quotas (1 | 2, 3 | 8, 9), the free slots take the best remaining by score: code 1 (p .3) beats
    # code 2 (p .2) at equal u.z, so 4 then 10 (log .2 + 5 > log .3 + 3), then 5
    assert sorted(result.items.tolist()) == [1, 2, 3, 4, 5, 8, 9, 10]


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_empty_lists_and_k_larger_than_the_lists(make):
    items, item_codes, users = disjoint_codes([3, 0, 2])  # code 1 is empty
    retriever = make(items, item_codes, 3)
    both = soft_search(users[1:], np.array([0.6, 0.4]), np.array([1, 2]), retriever, 5)  # the empty code's slots
    assert sorted(both.items.tolist()) == [4, 5]  # only code 2's items exist among the chosen lists
    everything = soft_search(users, np.full(3, 1 / 3), np.array([0, 1, 2]), retriever, 40)
    assert sorted(everything.items.tolist()) == [1, 2, 3, 4, 5]
    empty = soft_search(users[1:2], np.ones(1), np.array([1]), retriever, 10)
    assert empty.items.tolist() == [] and empty.scores.tolist() == []
    assert hard_search(users[1], 1, retriever, 10).items.tolist() == []
    assert hard_search(users[0], 0, retriever, 10).items.tolist() == [1, 2, 3]  # fewer than k


@pytest.mark.parametrize("make", [scan_index, BruteForce], ids=["ivf-scan", "brute"])
def test_ties_are_broken_by_id_like_the_reference(make):
    rng = np.random.default_rng(0)
    items = rng.integers(-2, 3, size=(120, 3)).astype(np.float32)  # many identical vectors: exact ties
    item_codes = rng.integers(0, 3, size=120)
    users = rng.integers(-2, 3, size=(2, 3)).astype(np.float32)
    retriever = make(items, item_codes, 3)
    for k in (2, 7, 15, 30):
        got = soft_search(users, np.array([0.7, 0.3]), np.array([0, 2]), retriever, k)
        ref = soft_search_reference(users, np.array([0.7, 0.3]), np.array([0, 2]), items, item_codes, k)
        np.testing.assert_array_equal(got.items, ref.items)
        hard = hard_search(users[0], 1, retriever, k)
        np.testing.assert_array_equal(hard.items, hard_search_reference(users[0], 1, items, item_codes, k))


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_hard_search_is_the_codes_list_top_k(make):
    for seed in range(20):
        items, item_codes, num_codes, users, _, codes, k = random_case(seed)
        result = hard_search(users[0], int(codes[0]), make(items, item_codes, num_codes), k)
        expected = hard_search_reference(users[0], int(codes[0]), items, item_codes, k)
        np.testing.assert_array_equal(result.items, expected)
        np.testing.assert_allclose(result.scores, items[expected] @ users[0], rtol=1e-5, atol=1e-5)
        assert result.codes.tolist() == [codes[0]] and result.quotas.tolist() == [k]


def test_search_rejects_repeated_codes_and_codes_out_of_range():
    items, item_codes, users = disjoint_codes([2, 2])
    with pytest.raises(ValueError, match="distinct"):
        soft_search(users, np.array([0.5, 0.5]), np.array([1, 1]), BruteForce(items, item_codes, 2), 4)
    with pytest.raises(ValueError, match="codes must lie"):
        CodeIndex.build(items, item_codes, 1)
    with pytest.raises(ValueError, match="method"):
        CodeIndex.build(items, item_codes, 2, method="hnsw")


# ----------------------------------------------------------------- serving a trained model

N_ITEMS, CODES = 40, 8
ENC = EncoderConfig(dim=16, max_len=8, layers=1, heads=1, ffn_mult=2, dropout=0.0)


@pytest.fixture(scope="module")
def model() -> SparcModel:
    torch.manual_seed(0)
    m = SparcModel(SparcConfig(num_items=N_ITEMS, encoder=ENC, levels=2, codes=CODES))
    trainer = Trainer(m, TrainConfig(lr=1e-2, seed=0))
    rng = np.random.default_rng(0)
    for _ in range(5):
        trainer.step(make_batch([rng.integers(1, N_ITEMS + 1, size=8) for _ in range(8)], ENC.max_len))
    m.eval()
    return m


def catalogue_arrays(m: SparcModel) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        cat = m.catalogue()
        return cat.z.numpy(), cat.codes[:, 0].numpy()


HISTORY = np.array([3, 17, 5, 22])


def by_hand(model: SparcModel, history: np.ndarray, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The interest distribution and the user vectors of `codes`, recomputed from the model's pieces."""
    with torch.no_grad():
        inputs, lengths = pad_histories([history], ENC.max_len)
        cat = model.catalogue()
        state = model.encode(inputs, lengths, cat.z)
        probs = torch.softmax(model.interest_logits(state.h, cat.z, cat.codes)[0], dim=-1).numpy()
        u = model.code_vectors(state, torch.from_numpy(np.asarray(codes))[None])[0].numpy()
    return probs, u


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_retrieve_soft_matches_the_reference_on_the_models_catalogue(model, make):
    z, item_codes = catalogue_arrays(model)
    result = retrieve(model, HISTORY, make(z, item_codes, CODES), k=12, top_codes=3)
    probs, _ = by_hand(model, HISTORY, np.zeros(1, np.int64))
    top = np.argsort(-probs, kind="stable")[:3]
    np.testing.assert_array_equal(result.codes, top)
    np.testing.assert_allclose(result.weights, probs[top] / probs[top].sum(), rtol=1e-5)
    _, u = by_hand(model, HISTORY, top)
    ref = soft_search_reference(u, result.weights, top, z, item_codes, 12)
    np.testing.assert_array_equal(result.items, ref.items)
    np.testing.assert_allclose(result.scores, ref.scores, rtol=1e-5, atol=1e-5)
    assert len(result.items) == min(12, np.isin(item_codes[1:], top).sum())
    assert ((result.items >= 1) & (result.items <= N_ITEMS)).all()


@pytest.mark.parametrize("explore", [0.3, 1.0])
def test_retrieve_with_exploration_matches_the_reference_with_the_same_rng(model, explore):
    z, item_codes = catalogue_arrays(model)
    index = CodeIndex.build(z, item_codes, CODES)
    for seed in range(5):
        got = retrieve(model, HISTORY, index, k=10, top_codes=3, explore=explore, rng=np.random.default_rng(seed))
        probs, _ = by_hand(model, HISTORY, np.zeros(1, np.int64))
        codes, weights = choose_codes(probs, 3, explore, np.random.default_rng(seed))
        _, u = by_hand(model, HISTORY, codes)
        np.testing.assert_array_equal(got.codes, codes)
        np.testing.assert_array_equal(got.items, soft_search_reference(u, weights, codes, z, item_codes, 10).items)
        again = retrieve(model, HISTORY, index, k=10, top_codes=3, explore=explore, rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(again.items, got.items)


def test_retrieve_hard_is_the_argmax_codes_list(model):
    z, item_codes = catalogue_arrays(model)
    result = retrieve(model, HISTORY, CodeIndex.build(z, item_codes, CODES), k=10, hard=True)
    probs, _ = by_hand(model, HISTORY, np.zeros(1, np.int64))
    code = int(probs.argmax())
    _, u = by_hand(model, HISTORY, np.array([code]))
    assert result.codes.tolist() == [code]
    np.testing.assert_array_equal(result.items, hard_search_reference(u[0], code, z, item_codes, 10))
    assert (item_codes[result.items] == code).all()


def test_retrieve_with_a_precomputed_catalogue_is_the_same(model):
    z, item_codes = catalogue_arrays(model)
    index = CodeIndex.build(z, item_codes, CODES)
    with torch.no_grad():
        cat = model.catalogue()
    a = retrieve(model, HISTORY, index, k=10, top_codes=3)
    b = retrieve(model, HISTORY, index, k=10, top_codes=3, catalogue=cat)
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.scores, b.scores)
    with pytest.raises(ValueError, match="rebuild it"):
        retrieve(model, HISTORY, CodeIndex.build(z[:-1], item_codes[:-1], CODES), k=10)


@pytest.mark.parametrize("search,temperature", [("soft", 1.0), ("soft", 2.0), ("hard", 1.0)])
def test_served_scores_of_the_model_are_what_retrieve_serves(model, search, temperature):
    """SparcModel.score(served=k), the offline form, keeps exactly the items `retrieve` serves, with the model's
    factorised scores (their order is the served order)."""
    z, item_codes = catalogue_arrays(model)
    rng = np.random.default_rng(1)
    histories = [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(1, ENC.max_len + 1))) for _ in range(12)]
    inputs, lengths = pad_histories(histories, ENC.max_len)
    kw = dict(search=search, top_codes=3, temperature=temperature)
    full = model.score(inputs, lengths, **kw).numpy()
    served = model.score(inputs, lengths, served=10, **kw).numpy()
    for row, history in enumerate(histories):
        result = retrieve(model, history, BruteForce(z, item_codes, CODES), k=10, top_codes=3,
                          temperature=temperature, hard=search == "hard")
        kept = np.flatnonzero(np.isfinite(served[row]))
        assert sorted(kept.tolist()) == sorted(result.items.tolist())
        np.testing.assert_array_equal(served[row, kept], full[row, kept])
        order = kept[np.argsort(-served[row, kept], kind="stable")]
        np.testing.assert_array_equal(order, result.items)


def test_served_scores_need_the_factorised_model():
    m = SparcModel(SparcConfig(num_items=N_ITEMS, encoder=ENC, levels=2, codes=CODES,
                               conditioned_scope="catalogue"))
    inputs, lengths = pad_histories([HISTORY], ENC.max_len)
    with pytest.raises(ValueError, match="served lists"):
        m.score(inputs, lengths, served=10)


# ----------------------------------------------------------------- exploration slots


@pytest.mark.parametrize("make", RETRIEVERS, ids=IDS)
def test_soft_search_with_exploration_slots_equals_the_reference(make):
    explored = 0
    for seed in range(40):
        items, item_codes, num_codes, users, weights, codes, k = random_case(seed)
        bias = np.random.default_rng(seed).normal(scale=2.0, size=len(items))
        exploit = int(np.random.default_rng(seed).integers(len(codes), k + 1))
        retriever = make(items, item_codes, num_codes)
        got = soft_search(users, weights, codes, retriever, k, exploit=exploit, bias=bias)
        ref = soft_search_reference(users, weights, codes, items, item_codes, k, exploit=exploit, bias=bias)
        np.testing.assert_array_equal(got.items, ref.items, err_msg=f"seed {seed}")
        np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-5, atol=1e-5)
        assert got.explored == ref.explored
        plain = soft_search(users, weights, codes, retriever, exploit)
        head = len(got.items) - got.explored
        np.testing.assert_array_equal(got.items[:head], plain.items)  # the first slots are plain soft search's
        assert len(got.items) == min(k, np.isin(item_codes[1:], codes).sum())
        assert len(set(got.items.tolist())) == len(got.items) and np.isin(item_codes[got.items], codes).all()
        lift = got.scores[head:].astype(np.float64) + bias[got.items[head:]]
        assert (np.diff(lift) <= 1e-5).all()  # explored slots by score + bias
        explored += got.explored
    assert explored > 100
    with pytest.raises(ValueError, match="exploration slots need"):
        soft_search(users, weights, codes, retriever, k + 1, exploit=k)  # no bias


def test_exploration_slots_by_lift_reach_unpopular_items():
    """Two lists; with a popularity bias the slots after the first go to the items the user likes for their
    popularity, not to the most probable ones."""
    items, item_codes, users = disjoint_codes([4, 4])
    retriever = BruteForce(items, item_codes, 2)
    plain = soft_search(users, np.array([0.5, 0.5]), np.array([0, 1]), retriever, 6)
    popular = np.zeros(len(items))
    popular[plain.items[2:]] = 50.0  # the plain list's slots 3-6 are very popular items
    bias = -1.0 * np.log1p(popular)
    explored = soft_search(users, np.array([0.5, 0.5]), np.array([0, 1]), retriever, 6, exploit=2, bias=bias)
    np.testing.assert_array_equal(explored.items[:2], soft_search(users, np.array([0.5, 0.5]), np.array([0, 1]),
                                                                  retriever, 2).items)
    assert explored.explored == 4
    unpopular = set(range(1, len(items))) - set(plain.items[2:].tolist()) - set(explored.items[:2].tolist())
    assert set(explored.items[2:4].tolist()) == unpopular  # the two unpopular items come before the popular


def test_served_scores_with_exploration_keep_soft_searchs_slots_in_order():
    for seed in range(30):
        items, item_codes, num_codes, _, _, _, k = random_case(seed)
        rng = np.random.default_rng(200 + seed)
        rows = 5
        codes, weights, users, scores = random_mixture(rng, items, item_codes, num_codes, rows)
        n_codes = codes.shape[1]
        k = max(k, n_codes + 1)
        exploit = int(rng.integers(n_codes, k))
        bias = rng.normal(scale=2.0, size=len(items))
        served = served_scores(torch.from_numpy(scores), torch.from_numpy(np.where(np.arange(len(items)) == 0, -1,
                                                                                    item_codes)),
                               torch.from_numpy(codes), weights, k, exploit=exploit,
                               bias=torch.from_numpy(bias)).numpy()
        for r in range(rows):
            ref = soft_search(users[r], weights[r], codes[r], BruteForce(items, item_codes, num_codes), k,
                              exploit=exploit, bias=bias)
            kept = np.flatnonzero(np.isfinite(served[r]))
            order = kept[np.argsort(-served[r, kept], kind="stable")]
            np.testing.assert_array_equal(order, ref.items, err_msg=f"seed {seed} row {r}")


def test_explore_ranking_keeps_the_best_first_then_ranks_by_lift():
    scores = torch.tensor([[-math.inf, -1.0, -2.0, -3.0, -4.0, -math.inf]])
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 5.0, 9.0])
    ranked = explore_ranking(scores, bias, 2)[0]
    order = torch.argsort(ranked, descending=True).tolist()
    assert order[:4] == [1, 2, 4, 3]  # items 1, 2 kept first; then item 4 (lift 1.0) before item 3 (-3.0)
    assert torch.isinf(ranked[[0, 5]]).all()  # padding and an excluded item stay -inf
    assert torch.equal(explore_ranking(scores, torch.zeros(6), 2)[0].argsort(descending=True)[:5],
                       scores[0].argsort(descending=True)[:5])  # no bias: the order is the scores'


def test_the_models_exploration_slots_are_what_retrieve_serves(model):
    """SparcModel.score(served=k, exploit=E, lift=...) orders exactly the items `retrieve` serves with the same
    exploration slots (the model's own popularity bias), and the ranked form keeps the E best first."""
    model = copy.deepcopy(model)  # the fixture is shared: popularity counts of our own
    z, item_codes = catalogue_arrays(model)
    model.items.counts.copy_(torch.arange(N_ITEMS + 1, dtype=torch.float) % 7 * 10)
    rng = np.random.default_rng(2)
    histories = [rng.integers(1, N_ITEMS + 1, size=int(rng.integers(1, ENC.max_len + 1))) for _ in range(12)]
    inputs, lengths = pad_histories(histories, ENC.max_len)
    served = model.score(inputs, lengths, top_codes=3, served=10, exploit=4, lift=1.0).numpy()
    plain = model.score(inputs, lengths, top_codes=3).numpy()
    ranked = model.score(inputs, lengths, top_codes=3, exploit=4, lift=1.0).numpy()
    bias = model.lift_bias(1.0).numpy()
    differs = 0
    for row, history in enumerate(histories):
        result = retrieve(model, history, BruteForce(z, item_codes, CODES), k=10, top_codes=3, exploit=4, lift=1.0)
        kept = np.flatnonzero(np.isfinite(served[row]))
        np.testing.assert_array_equal(kept[np.argsort(-served[row, kept], kind="stable")], result.items)
        order = np.argsort(-ranked[row], kind="stable")
        np.testing.assert_array_equal(order[:4], np.argsort(-plain[row], kind="stable")[:4])
        rest = order[4:][np.isfinite(ranked[row, order[4:]])]
        assert (np.diff(plain[row, rest] + bias[rest]) <= 1e-5).all()  # then by lift
        differs += not np.array_equal(order[:10], np.argsort(-plain[row], kind="stable")[:10])
    assert differs > 0  # the bias changed some lists
    with pytest.raises(ValueError, match="exploration slots are soft search's"):
        model.score(inputs, lengths, search="hard", exploit=4)
