"""streams.publisher (gate, versions, codebook-updates records); streams.index (fast path vs brute force)."""

from __future__ import annotations

import numpy as np
import pytest

from codebook_store import Reassembler, open_store
from codebook_store.messages import SCHEMA
from replay.synthetic import SyntheticConfig, generate
from streams.index import IndexHolder, build_index
from streams.publisher import Publisher, gate
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.online import OnlineLearner, advance_histories

HEALTHY = {"finite": True, "initialised": True, "items": 10, "level1_utilisation": 0.5}


@pytest.fixture(scope="module")
def learner():
    stream = generate(SyntheticConfig(n_users=30, n_events=600, n_initial_items=80, n_new_items=8, seed=5))
    events = list(stream.iter_events())
    cfg = SparcConfig(
        num_items=0, num_attributes=100, codes=8, encoder=EncoderConfig(dim=16, max_len=5, layers=1)
    )
    learner = OnlineLearner(cfg, TrainConfig(seed=0))
    learner.observe_items([e for e in events if "event_id" not in e])
    feedback = [e for e in events if "event_id" in e]
    histories: dict = {}
    for start in range(0, len(feedback), 32):
        learner.learn(feedback[start : start + 32], histories)
        advance_histories(histories, feedback[start : start + 32], 5)
    return learner


def announced(published):
    """The one update that a publish's records reassemble to."""
    r = Reassembler()
    updates = [u for key, value, headers in published.messages if (u := r.accept(key, value, headers))]
    assert len(updates) == 1 and r.pending == []
    return updates[0]


def test_gate_names_every_problem():
    assert gate(HEALTHY, 0.1) == []
    reasons = gate({"finite": False, "initialised": False, "items": 0, "level1_utilisation": 0.0}, 0.1)
    assert len(reasons) == 4
    assert gate({**HEALTHY, "level1_utilisation": 0.05}, 0.1) == [
        "level-1 utilisation 0.050 is below the floor 0.1"
    ]


def test_versions_lineage_gate_and_messages(tmp_path, learner):
    url = f"file://{tmp_path}/store"
    state, health = learner.snapshot_state(), learner.health()
    assert gate(health, 0.1) == []

    pub = Publisher(url, "sparc", 0.1)
    first = pub.publish(state, health, {"fb:0": 10}, 1_700_000_000.0)
    held = pub.publish(state, {**health, "finite": False}, {"fb:0": 20}, 1_700_000_001.0)
    third = pub.publish(state, health, {"fb:0": 30}, 1_700_000_002.0)
    pub.close()
    assert (first.version, held.version, third.version) == (0, 1, 2)
    assert first.accepted and not held.accepted and held.messages == [] and third.accepted
    assert held.reasons == ["non-finite values in the codebooks or item vectors"]

    key, _, headers = first.messages[0]
    assert key == b"sparc" and dict(headers)["schema"] == SCHEMA.encode()
    m1, m3 = announced(first), announced(third)
    assert (m1.version, m1.parent, m1.remap_from, m1.remap) == (0, None, None, None)  # nothing announced before
    assert np.array_equal(m1.item_codes, state.item_codes) and m1.weights is None  # the whole table, no weights
    assert m3.parent == 1 and m3.remap_from == 0  # remap since the last ANNOUNCED version
    assert m3.remap.changed_items.size == 0 and m3.remap.added_items.size == 0  # same state
    assert m3.item_codes is None and np.array_equal(m3.with_base(m1.item_codes).item_codes, state.item_codes)
    assert m3.watermark == {"kafka": {"fb:0": 30}}
    assert m3.health["drift"]["parent_version"] == 1

    with open_store(url, read_only=True) as store:
        assert store.versions() == [0, 1, 2] and store.latest_version() == 2
        assert m3.manifest_raw == store.read_raw(2)[0]  # the stored manifest, byte for byte
        assert store.manifest(1).health["gate"]["passed"] is False
        snap = store.get(2)
        assert snap.item_codes.shape == (learner.num_items + 1, 3)
        assert snap.config["num_items"] == learner.num_items

    again = Publisher(url, "sparc", 0.1)  # a restarted worker never reuses a version
    fourth = again.publish(state, health, {}, 1_700_000_003.0)
    m4 = announced(fourth)
    assert (m4.version, m4.parent, m4.remap_from) == (3, None, None) and m4.item_codes is not None
    assert again.latest()["version"] == 3
    again.close()


def test_records_fit_the_size_limit_and_carry_the_exact_snapshot(learner):
    state, health = learner.snapshot_state(), learner.health()
    pub = Publisher("memory://", "sparc", 0.1, max_message_bytes=8192, full_codes_every=2, announce_weights=True)
    published = [pub.publish(state, health, {"fb:0": i}, 1_700_000_000.0 + i) for i in range(3)]
    for p in published:
        assert len(p.messages) > 2
        assert all(len(k) + len(v) + sum(len(n) + len(b) for n, b in h) <= 8192 for k, v, h in p.messages)
    updates = [announced(p) for p in published]
    assert [u.item_codes is not None for u in updates] == [True, False, True]  # every 2nd has the whole table
    mirror = open_store("memory://")
    for u in (updates[0], updates[1].with_base(updates[0].item_codes), updates[2]):
        assert u.complete and mirror.put_raw(u.manifest_raw, u.blobs)  # the very bytes the publisher stored
        assert mirror.get(u.version).same_as(pub.store.get(u.version))
    pub.close()


def test_faiss_index_serves_like_the_brute_force_reference(learner):
    state = learner.snapshot_state()
    fast = build_index(state, 7, 1.0, top_codes=4, kind="faiss")
    exact = build_index(state, 7, 1.0, top_codes=4, kind="brute")
    for history in ([1, 2, 3], [40, 41], [], [5, 10**6]):  # an unknown item id is ignored
        a, b = fast.retrieve(history, 20), exact.retrieve(history, 20)
        np.testing.assert_array_equal(a.items, b.items)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5)
    counts = state.weights["items.counts"]
    cold = fast.retrieve([], 5)  # no history: the most popular items, no codes searched
    assert cold.codes.size == 0 and cold.scores.tolist() == sorted(counts[1:].tolist(), reverse=True)[:5]
    assert counts[cold.items].tolist() == cold.scores.tolist()
    holder = IndexHolder()
    assert holder.swap(fast) is None and holder.swap(exact) is fast and holder.current is exact


def test_the_publisher_signs_with_its_key_file(tmp_path, learner):
    from codebook_store import KeyFileError, load_verifier

    key = tmp_path / "updates.key"
    key.write_bytes(b"s" * 32)
    pub = Publisher("memory://", "sparc", 0.1, signing_key=key)
    published = pub.publish(learner.snapshot_state(), learner.health(), {"fb:0": 1}, 1_700_000_000.0)
    pub.close()
    r = Reassembler(verifier=load_verifier([key]))
    (update,) = [u for record in published.messages if (u := r.accept(*record))]
    assert update.signed_by == pub.signer.key_id
    key.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="at least 32 bytes"):
        Publisher("memory://", "sparc", 0.1, signing_key=key)
