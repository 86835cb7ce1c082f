"""streams.gate and streams.publisher (gate, versions, codebook-updates records, warm start with a corrupt
latest); streams.index (fast path vs brute force, external ids)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from codebook_store import CorruptSnapshotError, Reassembler, open_store
from codebook_store.messages import SCHEMA
from replay.synthetic import SyntheticConfig, generate
from streams.gate import GateThresholds, gate
from streams.index import IndexHolder, build_index
from streams.publisher import Publisher
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.online import OnlineLearner, advance_histories, model_health

HEALTHY = {"finite": True, "initialised": True, "items": 10, "level1_utilisation": 0.5, "level2_utilisation": 0.6,
           "level1_perplexity": 5.0, "collision_rate": 0.1}  # 10 items
GATE = GateThresholds()  # the defaults


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
    assert gate(HEALTHY, GATE, codes=64) == []
    broken = {"finite": False, "initialised": False, "items": 0, "level1_utilisation": 0.0}
    assert [r.reason for r in gate(broken, GATE, codes=64)] == [
        "non_finite", "not_initialised", "empty", "utilisation", "perplexity", "collisions"]  # missing: worst
    big = {**HEALTHY, "items": 5000}  # 64 codes can all be used: the floors are shares of 64
    low = gate({**big, "level1_utilisation": 0.2, "level2_utilisation": 0.05}, GATE, codes=64)
    assert [(r.reason, r.detail) for r in low] == [
        ("utilisation", "level-1 utilisation 0.200 is below the floor 0.250"),
        ("utilisation", "level-2 utilisation 0.050 is below the floor 0.100"),
        ("perplexity", "level-1 perplexity 5.00 is below the floor 6.40")]
    assert [r.reason for r in gate({**HEALTHY, "collision_rate": 0.999}, GATE, codes=64)] == ["collisions"]
    # 10 items can fill at most 10 of 64 codewords: utilisation 6/64 and perplexity 5 are healthy there
    assert gate({**HEALTHY, "level1_utilisation": 6 / 64, "level2_utilisation": 2 / 64}, GATE, codes=64) == []
    assert [r.reason for r in gate({**HEALTHY, "level1_perplexity": 0.9}, GATE, codes=64)] == ["perplexity"]


def collapsed(learner: OnlineLearner) -> tuple:
    """A copy of the learner whose codebooks collapsed: every codeword of a level is the same vector, so every
    item has the same full code. Its state and health (model_health, as the worker captures them)."""
    bad = copy.deepcopy(learner)
    with torch.no_grad():
        for level in bad.model.rq.levels:
            level.codebook.copy_(level.codebook[:1].expand_as(level.codebook))
    return bad.snapshot_state(), {**model_health(bad.model), "steps": bad.steps}


def test_the_gate_refuses_a_collapsed_codebook_and_latest_stays(learner):
    """The defect: the gate checked level-1 utilisation only (floor 0.05), so a snapshot with collision_rate
    0.999 passed. A collapsed codebook (every item on one code per level) uses 1 of 8 codewords here (0.125,
    above that old floor) and every item collides."""
    good_state, good_health = learner.snapshot_state(), learner.health()
    state, health = collapsed(learner)
    assert health["collision_rate"] == 1.0 and health["level1_utilisation"] == 1 / 8 and health["finite"]
    assert health["level1_perplexity"] == pytest.approx(1.0)
    pub = Publisher("memory://", "sparc", GATE)
    first = pub.publish(good_state, good_health, {}, 1_700_000_000.0)
    refused = pub.publish(state, health, {}, 1_700_000_001.0)
    assert first.accepted and not refused.accepted and refused.messages == []
    assert {r.reason for r in refused.refusals} == {"utilisation", "collisions"}
    assert pub.store.latest_version() == first.version  # never latest
    stored = pub.store.manifest(refused.version).health["gate"]
    assert stored["passed"] is False and stored["refused"] == ["utilisation", "collisions"]
    pub.close()


def corrupt_blob(store_dir: Path, version: int, blob: str = "weights.safetensors") -> None:
    path = store_dir / "sparc" / str(version) / blob
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_corrupt_latest_falls_back_to_the_newest_version_that_verifies(tmp_path, learner):
    """The defect: a warm start from a store whose latest version is corrupt refused to start. Now the newest
    earlier version that the gate passed and that verifies is used, latest is rolled back to it, and the bad
    ones are named; on_corrupt="refuse" keeps the old behaviour with the version to roll back to."""
    url = f"file://{tmp_path}/store"
    state, health = learner.snapshot_state(), learner.health()
    pub = Publisher(url, "sparc", GATE)
    for i in range(2):  # v0, v1: good
        pub.publish(state, health, {"fb:0": i}, 1_700_000_000.0 + i)
    pub.publish(*collapsed(learner), {"fb:0": 2}, 1_700_000_002.0)  # v2: held back by the gate
    pub.publish(state, health, {"fb:0": 3}, 1_700_000_003.0)  # v3: latest, about to be corrupted
    pub.close()
    corrupt_blob(tmp_path / "store", 3)
    cfg = learner.model.cfg
    refusing = Publisher(url, "sparc", GATE)
    with pytest.raises(CorruptSnapshotError, match=r"v3.*weights.safetensors.*rollback 1 "):
        refusing.warm_start(cfg, on_corrupt="refuse")
    assert refusing.store.latest_version() == 3  # refusing changes nothing
    refusing.close()
    corrupt_blob(tmp_path / "store", 1, "codebooks.safetensors")  # the one before is bad too
    pub = Publisher(url, "sparc", GATE)
    found = pub.warm_start(cfg)
    assert found.snapshot.version == 0 and pub.store.latest_version() == 0  # v2 never passed the gate
    assert [line.split(":")[0] for line in found.passed_over] == ["snapshot sparc v3", "snapshot sparc v1"]
    assert pub.parent == 0 and pub.publish(state, health, {}, 1_700_000_004.0).version == 4
    pub.close()
    for bad in (0, 4):
        corrupt_blob(tmp_path / "store", bad)
    with pytest.raises(CorruptSnapshotError, match="no snapshot of sparc .* to warm-start from"):
        Publisher(url, "sparc", GATE).warm_start(cfg)


def test_keep_versions_bounds_the_store_and_versions_never_repeat(tmp_path, learner):
    """Retention: after each put only the keep_versions highest versions and latest stay, so a learner that runs
    for days keeps a bounded store; a held-back version above latest does not push latest out, and a restarted
    publisher numbers on from the highest (never reusing a pruned number). keep_versions=0 keeps everything."""
    url = f"file://{tmp_path}/store"
    state, health = learner.snapshot_state(), learner.health()
    pub = Publisher(url, "sparc", GATE, keep_versions=2)
    for i in range(5):
        pub.publish(state, health, {"fb:0": i}, 1_700_000_000.0 + i)
        assert pub.store.versions() == list(range(max(0, i - 1), i + 1))
    pub.publish(state, {**health, "finite": False}, {}, 1_700_000_005.0)  # v5 held back; latest stays v4
    pub.publish(state, {**health, "finite": False}, {}, 1_700_000_006.0)  # v6 held back too
    assert pub.store.versions() == [4, 5, 6] and pub.store.latest_version() == 4
    pub.close()
    again = Publisher(url, "sparc", GATE, keep_versions=2)
    assert again.publish(state, health, {}, 1_700_000_007.0).version == 7
    assert again.store.versions() == [6, 7] and again.store.latest_version() == 7
    again.close()
    everything = Publisher(f"file://{tmp_path}/all", "sparc", GATE)  # the default of the class: keep all
    for i in range(4):
        everything.publish(state, health, {}, 1_700_000_000.0 + i)
    assert everything.store.versions() == [0, 1, 2, 3]
    everything.close()
    with pytest.raises(ValueError, match="keep_versions"):
        Publisher("memory://", "sparc", GATE, keep_versions=-1)


def test_versions_lineage_gate_and_messages(tmp_path, learner):
    url = f"file://{tmp_path}/store"
    state, health = learner.snapshot_state(), learner.health()
    assert gate(health, GATE, codes=8) == []

    pub = Publisher(url, "sparc", GATE)
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

    again = Publisher(url, "sparc", GATE)  # a restarted worker never reuses a version
    fourth = again.publish(state, health, {}, 1_700_000_003.0)
    m4 = announced(fourth)
    assert (m4.version, m4.parent, m4.remap_from) == (3, None, None) and m4.item_codes is not None
    assert again.latest()["version"] == 3
    again.close()


def test_records_fit_the_size_limit_and_carry_the_exact_snapshot(learner):
    state, health = learner.snapshot_state(), learner.health()
    pub = Publisher("memory://", "sparc", GATE, max_message_bytes=8192, full_codes_every=2, announce_weights=True)
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
    pub = Publisher("memory://", "sparc", GATE, signing_key=key)
    published = pub.publish(learner.snapshot_state(), learner.health(), {"fb:0": 1}, 1_700_000_000.0)
    pub.close()
    r = Reassembler(verifier=load_verifier([key]))
    (update,) = [u for record in published.messages if (u := r.accept(*record))]
    assert update.signed_by == pub.signer.key_id
    key.write_bytes(b"short")
    with pytest.raises(KeyFileError, match="at least 32 bytes"):
        Publisher("memory://", "sparc", GATE, signing_key=key)
