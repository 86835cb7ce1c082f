"""trainer.search.CodeIndex (faiss IVF lists = level-1 codes) and its incremental update; streams.index (the
serving index built from a snapshot, derived incrementally from the served one, swapped whole)."""

from __future__ import annotations

import gc
from dataclasses import replace

import numpy as np
import pytest

from replay.synthetic import SyntheticConfig, generate
from streams.index import IndexHolder, ServingIndex, build_index, update_index
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.online import OnlineLearner, advance_histories
from trainer.search import CodeIndex, hard_search, soft_search, soft_search_reference

DIM, CODES = 8, 12


def catalogue(seed: int, n: int = 300):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n + 1, DIM)).astype(np.float32)
    codes = rng.integers(0, CODES - 2, size=n + 1)  # the last two codes start empty
    return z, codes


def lists_of(index: CodeIndex) -> dict[int, list[int]]:
    return {c: sorted(index.list_members(c)[0].tolist()) for c in range(CODES)}


def assert_same_answers(a: CodeIndex, b: CodeIndex, seed: int = 0, queries: int = 30) -> None:
    """Same lists (as sets), same soft and hard answers for random queries over random codes."""
    assert lists_of(a) == lists_of(b)
    np.testing.assert_array_equal(a.list_sizes(np.arange(CODES)), b.list_sizes(np.arange(CODES)))
    rng = np.random.default_rng(seed)
    for _ in range(queries):
        n_codes = int(rng.integers(1, 5))
        codes = rng.choice(CODES, size=n_codes, replace=False)
        users = rng.normal(size=(n_codes, DIM)).astype(np.float32)
        weights = rng.dirichlet(np.ones(n_codes))
        k = int(rng.integers(n_codes, 80))
        ra, rb = soft_search(users, weights, codes, a, k), soft_search(users, weights, codes, b, k)
        np.testing.assert_array_equal(ra.items, rb.items)
        np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-6, atol=1e-6)
        ha, hb = hard_search(users[0], int(codes[0]), a, k), hard_search(users[0], int(codes[0]), b, k)
        np.testing.assert_array_equal(ha.items, hb.items)


def test_lists_are_the_level1_codes():
    z, codes = catalogue(0)
    index = CodeIndex.build(z, codes, CODES)
    assert index.index.ntotal == 300 and index.num_items == 300 and index.num_codes == CODES
    for c in range(CODES):
        ids, vectors = index.list_members(c)
        expected = np.flatnonzero(codes == c)
        expected = expected[expected > 0]
        assert ids.tolist() == expected.tolist()  # built in id order
        np.testing.assert_array_equal(vectors, z[ids])
        assert not vectors.flags.writeable and not ids.flags.writeable
    assert index.list_sizes(np.array([CODES - 1, CODES - 2])).tolist() == [0, 0]


def test_list_views_keep_the_faiss_memory_alive():
    z, codes = catalogue(7)
    index = CodeIndex.build(z, codes, CODES)
    ids, vectors = index.list_members(2)
    del index
    gc.collect()
    junk = [np.ones((50, DIM), np.float32) for _ in range(100)]  # reuse of freed memory would show here
    np.testing.assert_array_equal(vectors, z[ids])
    assert (codes[ids] == 2).all() and len(junk) == 100


@pytest.mark.parametrize("method", ["scan", "faiss"])
def test_incremental_update_answers_exactly_like_a_rebuild(method):
    z, codes = catalogue(1)
    old = CodeIndex.build(z, codes, CODES, method=method)
    rng = np.random.default_rng(1)
    new_z, new_codes = z.copy(), codes.copy()
    recoded = rng.choice(np.arange(1, 301), size=20, replace=False)
    new_codes[recoded] = (codes[recoded] + 1 + rng.integers(0, CODES - 1, size=20)) % CODES  # a different code
    moved_vector = np.setdiff1d(rng.choice(np.arange(1, 301), size=15, replace=False), recoded)
    new_z[moved_vector] += 0.5
    both = recoded[:5]
    new_z[both] *= 2.0  # code and vector changed: moved once
    extra_z = rng.normal(size=(7, DIM)).astype(np.float32)
    new_z = np.concatenate([new_z, extra_z])
    new_codes = np.concatenate([new_codes, [CODES - 1] * 7])  # new items, into a list that was empty

    updated, stats = old.update(new_z, new_codes)
    rebuilt = CodeIndex.build(new_z, new_codes, CODES, method=method)
    assert not stats.rebuilt and updated.method == method
    assert stats.moved == len(np.union1d(recoded, moved_vector)) and stats.code_changed == 20
    assert (stats.added, stats.removed, stats.written) == (7, 0, stats.moved + 7)
    assert stats.changed == stats.moved + 7 and stats.seconds["total"] >= 0
    assert updated.index.ntotal == 307
    assert_same_answers(updated, rebuilt, seed=1)
    for c in range(CODES):  # list vectors are the new snapshot's
        ids, vectors = updated.list_members(c)
        np.testing.assert_array_equal(vectors, new_z[ids])


def test_the_old_index_is_untouched_by_an_update():
    z, codes = catalogue(2)
    old = CodeIndex.build(z, codes, CODES)
    before = lists_of(old)
    copy_of_old = CodeIndex.build(z.copy(), codes.copy(), CODES)
    new_codes = codes.copy()
    new_codes[1:100] = (codes[1:100] + 1) % CODES
    _, stats = old.update(z, new_codes)
    assert stats.moved == 99 and stats.code_changed == 99
    assert lists_of(old) == before  # readers of the served index see it whole until the swap
    assert_same_answers(old, copy_of_old, seed=2, queries=10)


def test_new_items_become_retrievable_in_their_codes_list():
    z, codes = catalogue(3)
    old = CodeIndex.build(z, codes, CODES)
    star = np.full((1, DIM), 10.0, dtype=np.float32)  # scores far above every other item for u = ones
    updated, stats = old.update(np.concatenate([z, star]), np.concatenate([codes, [4]]))
    assert (stats.added, stats.moved) == (1, 0)
    u = np.ones(DIM, dtype=np.float32)
    assert hard_search(u, 4, updated, 5).items[0] == 301
    assert 301 not in hard_search(u, 5, updated, 300).items  # only in its own list
    soft = soft_search(np.stack([u, u]), np.array([0.5, 0.5]), np.array([5, 4]), updated, 10)
    assert soft.items[0] == 301


def test_nothing_changed_moves_nothing_and_a_shorter_catalogue_removes_items():
    z, codes = catalogue(4)
    old = CodeIndex.build(z, codes, CODES)
    same, stats = old.update(z.copy(), codes.copy())
    assert (stats.moved, stats.added, stats.removed, stats.written, stats.rebuilt) == (0, 0, 0, 0, False)
    assert_same_answers(same, old, seed=4, queries=5)
    shorter, stats = old.update(z[:291], codes[:291])
    assert (stats.removed, stats.moved) == (10, 0) and shorter.index.ntotal == 290
    assert_same_answers(shorter, CodeIndex.build(z[:291], codes[:291], CODES), seed=4, queries=10)


def test_a_large_change_is_rebuilt_and_still_equal():
    z, codes = catalogue(5)
    old = CodeIndex.build(z, codes, CODES)
    new_z = z + 0.01  # every vector changed (what an online step with full softmax does to the item table)
    updated, stats = old.update(new_z, codes)
    assert stats.rebuilt and stats.moved == 300 and stats.written == 300
    assert_same_answers(updated, CodeIndex.build(new_z, codes, CODES), seed=5, queries=10)
    forced, stats = old.update(new_z, codes, rebuild_fraction=1.0)  # incremental all the same
    assert not stats.rebuilt and stats.moved == 300
    assert_same_answers(forced, updated, seed=5, queries=10)


def test_update_matches_the_reference_after_many_rounds():
    z, codes = catalogue(6)
    index = CodeIndex.build(z, codes, CODES)
    rng = np.random.default_rng(6)
    for _ in range(5):
        z, codes = z.copy(), codes.copy()
        touched = rng.choice(np.arange(1, len(z)), size=25, replace=False)
        z[touched] = rng.normal(size=(25, DIM))
        codes[touched[:10]] = rng.integers(0, CODES, size=10)
        z = np.concatenate([z, rng.normal(size=(3, DIM)).astype(np.float32)])
        codes = np.concatenate([codes, rng.integers(0, CODES, size=3)])
        index, stats = index.update(z, codes)
        assert stats.moved == 25 and stats.added == 3
    users = rng.normal(size=(3, DIM)).astype(np.float32)
    chosen = np.array([0, 3, CODES - 1])
    got = soft_search(users, np.array([0.5, 0.3, 0.2]), chosen, index, 40)
    ref = soft_search_reference(users, np.array([0.5, 0.3, 0.2]), chosen, z, codes, 40)
    np.testing.assert_array_equal(got.items, ref.items)


# ----------------------------------------------------------------- the serving index of a snapshot


@pytest.fixture(scope="module")
def trained():
    """A learner trained on part of a synthetic stream, and the rest of the stream to train on later."""
    stream = generate(SyntheticConfig(n_users=30, n_events=600, n_initial_items=80, n_new_items=8, seed=5))
    events = list(stream.iter_events())
    cfg = SparcConfig(
        num_items=0, num_attributes=100, codes=8, encoder=EncoderConfig(dim=16, max_len=5, layers=1),
    )
    learner = OnlineLearner(cfg, TrainConfig(seed=0))
    learner.observe_items([e for e in events if "event_id" not in e])
    feedback = [e for e in events if "event_id" in e]
    histories: dict = {}
    for start in range(0, 480, 32):
        learner.learn(feedback[start : start + 32], histories)
        advance_histories(histories, feedback[start : start + 32], 5)
    return learner, feedback[480:], histories


HISTORIES = ([1, 2, 3], [40, 41], [], [5, 10**6], [7])


def assert_same_serving(a: ServingIndex, b: ServingIndex) -> None:
    assert a.num_items == b.num_items
    for history in HISTORIES:
        for k in (1, 4, 20):
            ra, rb = a.retrieve(history, k), b.retrieve(history, k)
            np.testing.assert_array_equal(ra.items, rb.items)
            np.testing.assert_array_equal(ra.codes, rb.codes)
            np.testing.assert_allclose(ra.scores, rb.scores, rtol=1e-5, atol=1e-5)


def test_serving_index_faiss_equals_brute_and_the_reference(trained):
    learner, _, _ = trained
    state = learner.snapshot_state()
    fast = build_index(state, 7, 1.0, top_codes=4, kind="faiss")
    exact = build_index(state, 7, 1.0, top_codes=4, kind="brute")
    assert isinstance(fast.retriever, CodeIndex) and fast.update is None
    assert_same_serving(fast, exact)
    codes = fast.catalogue.codes[:, 0].numpy()
    np.testing.assert_array_equal(codes, state.item_codes[:, 0].numpy())  # the model's codes = the snapshot's
    result = fast.retrieve([1, 2, 3], 20)
    assert np.isin(codes[result.items], result.codes).all()  # only the chosen codes' lists
    with pytest.raises(ValueError, match="index kind"):
        build_index(state, 7, 1.0, top_codes=4, kind="hnsw")


def test_serving_index_speaks_external_ids(trained):
    """A snapshot's vocabulary (LearnerState.item_ids) travels into the index: histories of external ids in,
    external ids out; ids the snapshot does not hold are left out of the history, as with rows before."""
    learner, _, _ = trained
    state = learner.snapshot_state()
    n = state.item_codes.shape[0] - 1
    names = tuple(f"sku-{row}" if row % 2 else 10**15 + row for row in range(1, n + 1))  # row r's external id
    named = build_index(replace(state, item_ids=names), 3, 1.0, top_codes=4)
    plain = build_index(state, 3, 1.0, top_codes=4)
    for history in ([1, 2, 3], [40, 41], [7]):
        external = [names[r - 1] for r in history] + ["sku-unknown", 5 * 10**18]
        a, b = named.retrieve(external, 10), plain.retrieve(history, 10)
        np.testing.assert_array_equal(a.items, b.items)  # the same rows ...
        assert named.ids_of(a.items) == [names[r - 1] for r in b.items]  # ... named by their ids
    assert plain.ids_of(np.array([4, 2])) == [4, 2] and plain.row_of("4") is None and plain.row_of(n + 1) is None


def test_serving_index_updates_incrementally_and_swaps_whole(trained):
    learner, rest, histories = trained
    first_state = learner.snapshot_state()
    first = build_index(first_state, 1, 1.0, top_codes=4)
    holder = IndexHolder()
    assert holder.swap(first) is None

    learner.observe_items([{"item_id": first.num_items + 1}, {"item_id": first.num_items + 2, "attributes": [3]}])
    grown = learner.snapshot_state()
    second = update_index(first, grown, 2, 2.0)
    assert second.version == 2 and second.num_items == first.num_items + 2
    assert (second.update.added, second.update.moved, second.update.rebuilt) == (2, 0, False)
    assert_same_serving(second, build_index(grown, 2, 2.0, top_codes=4))
    assert holder.swap(second) is first and holder.current is second

    weights = dict(grown.weights)  # a few items' vectors move (and maybe their codes)
    table = weights["items.id_embedding"].clone()
    table[[3, 10, 11]] += 0.3
    weights["items.id_embedding"] = table
    nudged = replace(grown, weights=weights)
    third = update_index(second, nudged, 3, 3.0)
    assert (third.update.moved, third.update.added, third.update.rebuilt) == (3, 0, False)
    assert_same_serving(third, build_index(nudged, 3, 3.0, top_codes=4))

    learner.learn(rest[:32], histories)  # an online step moves (nearly) every item vector: rebuilt
    trained_state = learner.snapshot_state()
    fourth = update_index(third, trained_state, 4, 4.0)
    assert fourth.update.rebuilt and fourth.update.moved > fourth.num_items // 2
    assert_same_serving(fourth, build_index(trained_state, 4, 4.0, top_codes=4))
    # the indexes swapped out keep answering as before
    assert_same_serving(first, build_index(first_state, 1, 1.0, top_codes=4))
    assert_same_serving(second, build_index(grown, 2, 2.0, top_codes=4))
