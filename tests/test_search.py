"""trainer.search: quotas, code choice, soft/hard search against brute-force references, serving a model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainer.batches import make_batch, pad_histories
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.model import SparcModel
from trainer.search import (
    BruteForce,
    FaissFlat,
    allocate_quotas,
    choose_codes,
    hard_search,
    retrieve,
    soft_search,
    soft_search_reference,
)
from trainer.step import Trainer

RETRIEVERS = [BruteForce, FaissFlat]


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


# ----------------------------------------------------------------- retrievers and search


def random_case(seed: int):
    rng = np.random.default_rng(seed)
    n_items, dim = int(rng.integers(20, 80)), int(rng.integers(4, 12))
    n_codes = int(rng.integers(1, 5))
    k = int(rng.integers(n_codes, 25))
    items = rng.normal(size=(n_items + 1, dim)).astype(np.float32)
    users = rng.normal(size=(n_codes, dim)).astype(np.float32)
    weights = rng.dirichlet(np.ones(n_codes))
    codes = rng.choice(16, size=n_codes, replace=False)
    return items, users, weights, codes, k


@pytest.mark.parametrize("make", RETRIEVERS, ids=["brute", "faiss"])
def test_retriever_is_exact_top_k_and_never_returns_padding(make):
    rng = np.random.default_rng(0)
    items = rng.normal(size=(41, 6)).astype(np.float32)
    items[0] = 100.0  # padding row would win every query
    queries = rng.normal(size=(5, 6)).astype(np.float32)
    scores, ids = make(items).search(queries, 10)
    assert ids.shape == scores.shape == (5, 10)
    for q, row_ids, row_scores in zip(queries, ids, scores, strict=True):
        exact = items[1:] @ q
        expected = np.argsort(-exact, kind="stable")[:10] + 1
        np.testing.assert_array_equal(row_ids, expected)
        np.testing.assert_allclose(row_scores, exact[expected - 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", RETRIEVERS, ids=["brute", "faiss"])
def test_soft_search_equals_reference(make):
    for seed in range(40):
        items, users, weights, codes, k = random_case(seed)
        got = soft_search(users, weights, codes, make(items), k)
        ref = soft_search_reference(users, weights, items, k)
        np.testing.assert_array_equal(got.items, ref, err_msg=f"seed {seed}")
        assert len(got.items) == k and len(set(got.items.tolist())) == k and (got.items > 0).all()
        assert got.quotas.sum() == k
        np.testing.assert_array_equal(got.codes, codes)
        merged = (weights[:, None] * (users @ items[got.items].T)).sum(0)
        np.testing.assert_allclose(got.scores, merged, rtol=1e-5, atol=1e-5)
        assert (np.diff(got.scores) <= 1e-6).all()  # best first


def test_soft_search_takes_each_codes_quota_from_its_own_best():
    # two codes pointing at disjoint halves of the catalogue: each must contribute its quota
    items = np.zeros((9, 2), dtype=np.float32)
    items[1:5] = [[4, 0], [3, 0], [2, 0], [1, 0]]
    items[5:9] = [[0, 4], [0, 3], [0, 2], [0, 1]]
    users = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    result = soft_search(users, np.array([0.75, 0.25]), np.array([0, 1]), BruteForce(items), 4)
    assert result.quotas.tolist() == [3, 1]
    assert result.items.tolist() == [1, 2, 3, 5]  # merged: 3.0, 2.25, 1.5 from code 0; 1.0 from code 1
    np.testing.assert_allclose(result.scores, [3.0, 2.25, 1.5, 1.0])


@pytest.mark.parametrize("make", RETRIEVERS, ids=["brute", "faiss"])
def test_hard_search_equals_brute_force_top_k(make):
    for seed in range(10):
        items, users, _, _, k = random_case(seed)
        result = hard_search(users[0], 7, make(items), k)
        exact = items[1:] @ users[0]
        expected = np.argsort(-exact, kind="stable")[:k] + 1
        np.testing.assert_array_equal(result.items, expected)
        np.testing.assert_allclose(result.scores, exact[expected - 1], rtol=1e-5, atol=1e-5)
        assert result.codes.tolist() == [7] and result.quotas.tolist() == [k]


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


def item_vectors(m: SparcModel) -> np.ndarray:
    with torch.no_grad():
        return m.catalogue().z.numpy()


HISTORY = np.array([3, 17, 5, 22])


def test_retrieve_soft_matches_the_reference_on_the_models_vectors(model):
    z = item_vectors(model)
    result = retrieve(model, HISTORY, BruteForce(z), k=12, top_codes=3)
    assert len(result.items) == 12 and len(set(result.items.tolist())) == 12
    assert ((result.items >= 1) & (result.items <= N_ITEMS)).all()
    assert len(result.codes) == 3 and result.weights.sum() == pytest.approx(1.0)
    assert result.quotas.sum() == 12
    with torch.no_grad():  # recompute the pieces by hand from the model
        inputs, lengths = pad_histories([HISTORY], ENC.max_len)
        cat = model.catalogue()
        state = model.encode(inputs, lengths, cat.z)
        probs = torch.softmax(model.interest_logits(state.h, cat.z, cat.codes)[0], dim=-1).numpy()
        top = np.argsort(-probs, kind="stable")[:3]
        u = model.code_vectors(state, torch.from_numpy(top)[None])[0].numpy()
    np.testing.assert_array_equal(result.codes, top)
    np.testing.assert_allclose(result.weights, probs[top] / probs[top].sum(), rtol=1e-5)
    np.testing.assert_array_equal(result.items, soft_search_reference(u, result.weights, z, 12))
    faiss_result = retrieve(model, HISTORY, FaissFlat(z), k=12, top_codes=3)
    np.testing.assert_array_equal(faiss_result.items, result.items)


def test_retrieve_hard_is_the_models_hard_score(model):
    z = item_vectors(model)
    result = retrieve(model, HISTORY, BruteForce(z), k=10, hard=True)
    scores = model.score(torch.from_numpy(HISTORY)[None], torch.tensor([len(HISTORY)]), search="hard")[0]
    expected = np.argsort(-scores[1:].numpy(), kind="stable")[:10] + 1
    np.testing.assert_array_equal(result.items, expected)
    assert len(result.codes) == 1


def test_retrieve_with_exploration_is_reproducible(model):
    z = BruteForce(item_vectors(model))
    a = retrieve(model, HISTORY, z, k=10, top_codes=3, explore=0.5, rng=np.random.default_rng(1))
    b = retrieve(model, HISTORY, z, k=10, top_codes=3, explore=0.5, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.items, b.items)
    np.testing.assert_array_equal(a.codes, b.codes)
