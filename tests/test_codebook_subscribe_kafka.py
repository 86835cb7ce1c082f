"""codebook_store.subscribe: the Follower's decisions without a broker (unmarked tests), then `subscribe` against
a real Kafka broker (marked kafka): versions in order, duplicates and a corrupted update skipped, a poisoned chunk
that does not block the genuine update, start from a version or from latest, live updates, a materialised store
that verifies, and an independent consumer."""

from __future__ import annotations

import hashlib
import uuid

import numpy as np
import pytest
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from codebook_store import Follower, Reassembler, Snapshot, open_store, subscribe
from codebook_store.messages import SCHEMA, encode


def make_snapshot(version: int, base: Snapshot | None = None, *, items: int = 50) -> Snapshot:
    """Version 0 from scratch; later ones change three items' codes of `base` and its padding row (as the model
    does), and add two items."""
    g = torch.Generator().manual_seed(version)
    if base is None:
        codes = torch.randint(0, 8, (items + 1, 2), generator=g)
    else:
        codes = torch.cat([base.item_codes, torch.randint(0, 8, (2, 2), generator=g)])
        codes[[0, 1 + version, 10 + version, 20]] = (codes[[0, 1 + version, 10 + version, 20]] + 1) % 8
    n = codes.shape[0]
    return Snapshot(
        model="sparc", version=version, parent=None if base is None else base.version,
        created_at=1_700_000_000.0 + version, watermark={"kafka": {"feedback-events:0": version}},
        config={"num_items": n - 1}, codebooks=torch.randn(2, 8, 4, generator=g), item_codes=codes,
        weights={"items.id_embedding": torch.randn(n, 4, generator=g)}, health={"finite": True},
    )


@pytest.fixture(scope="module")
def chain() -> list[Snapshot]:
    snaps = [make_snapshot(0)]
    for version in range(1, 5):
        snaps.append(make_snapshot(version, snaps[-1]))
    return snaps


def update_of(snapshot: Snapshot, base: Snapshot | None, **kw):
    """The verified update that `encode(snapshot, base)`'s records reassemble to."""
    r = Reassembler()
    (update,) = [u for u in (r.accept(*rec) for rec in encode(snapshot, base, **kw)) if u is not None]
    return update


# --- the Follower, no broker
def test_follower_resolves_codes_dedups_skips_below_start_and_mirrors(chain):
    v0, v1, v2 = (update_of(chain[0], None), update_of(chain[1], chain[0]), update_of(chain[2], chain[1]))
    store = open_store("memory://")
    f = Follower("sparc", start=1, store=store)
    assert f.offer(v0) is None  # below start: only a base
    got1 = f.offer(v1)
    assert np.array_equal(got1.item_codes, chain[1].item_codes)
    assert f.offer(v1) is None and f.offer(v0) is None  # a duplicate, then a stale version
    got2 = f.offer(v2)
    assert np.array_equal(got2.item_codes, chain[2].item_codes)
    s = f.stats
    assert (s.updates, s.duplicates, s.stale, s.skipped, s.unresolved, s.materialised) == (2, 1, 1, 1, 0, 2)
    assert store.versions() == [1, 2] and store.latest_version() == 2
    mirror = store.get(1)  # codes-only: what the message carried, and a note saying so
    assert torch.equal(mirror.item_codes, chain[1].item_codes) and mirror.weights == {}
    assert mirror.health["materialised"]["weights"] is False and mirror.watermark == chain[1].watermark
    assert mirror.health["materialised"]["omitted"] == ["weights.safetensors"]


def test_follower_without_a_base_yields_the_remap_but_stores_nothing(chain):
    store = open_store("memory://")
    f = Follower("sparc", start=0, store=store)
    got = f.offer(update_of(chain[2], chain[1]))
    assert got.version == 2 and got.item_codes is None and got.remap.changed_items.tolist() == [0, 3, 12, 20]
    assert (f.stats.unresolved, f.stats.unmaterialised, store.versions()) == (1, 1, [])
    full = f.offer(update_of(chain[3], chain[2], full_codes=True, with_weights=True))  # the whole table again
    assert full.complete and store.get(3).same_as(chain[3])  # the publisher's exact snapshot


def test_follower_finds_a_base_in_its_store(chain):
    store = open_store("memory://")
    store.put(chain[1])
    f = Follower("sparc", start="latest", store=store)
    got = f.offer(update_of(chain[2], chain[1]))
    assert np.array_equal(got.item_codes, chain[2].item_codes) and f.stats.unresolved == 0


def test_follower_ignores_other_models(chain):
    f = Follower("other", start=0)
    assert f.offer(update_of(chain[0], None)) is None and f.stats.skipped == 1


# --- against a real broker
def produce(bootstrap: str, topic: str, records) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", client_id="sparc-tests-updates")
    try:
        for key, value, headers in records:
            producer.send(topic, key=key, value=value, headers=headers)
        producer.flush()
    finally:
        producer.close()


def corrupt(records, index: int):
    out = list(records)
    key, value, headers = out[index]
    flipped = bytearray(value)
    flipped[len(flipped) // 3] ^= 0x04
    out[index] = (key, bytes(flipped), headers)
    return out


@pytest.mark.kafka
def test_subscribe_against_a_real_broker(kafka_bootstrap, kafka_topic, tmp_path, chain):
    topic = kafka_topic()
    v0, v1, v2, v3, v4 = chain
    published = [
        encode(v0, None, 2048, with_weights=True),  # the whole table + weights: an exact copy downstream
        encode(v1, v0, 2048),  # a remap from v0
        encode(v1, v0, 2048),  # the same records again (a re-send)
        encode(v1, v0, 4096),  # the same version published again, chunked otherwise
        corrupt(encode(v2, v1, 2048), 1),  # a flipped byte in transit: v2 never arrives
        encode(v3, v2, 2048, full_codes=True, with_weights=True),  # remap from v2 + the whole table
    ]
    produce(kafka_bootstrap, topic, [r for records in published for r in records])
    total = sum(map(len, published))

    url = f"file://{tmp_path}/mirror"
    sub = subscribe(kafka_bootstrap, topic, start=0, store_url=url, group_id=f"mirror-{uuid.uuid4().hex[:8]}",
                    timeout=3)
    got = list(sub)
    assert [u.version for u in got] == [0, 1, 3]
    assert np.array_equal(got[1].item_codes, v1.item_codes)  # rebuilt from v0 + the remap, checked by sha256
    assert got[2].remap_from == 2 and got[2].complete
    s = sub.stats
    assert (s.records, s.updates, s.duplicates, s.rejected, s.unresolved, s.materialised) == (total, 3, 1, 1, 0, 3)
    assert s.repeated_records == len(published[1])
    with open_store(url, read_only=True) as store:  # every read verifies every checksum
        assert store.versions() == [0, 1, 3] and store.latest_version() == 3
        assert store.get(0).same_as(v0) and store.get(3).same_as(v3)
        assert torch.equal(store.get(1).item_codes, v1.item_codes) and store.get(1).weights == {}
    probe = KafkaConsumer(bootstrap_servers=kafka_bootstrap, group_id=sub.group_id)  # positions committed
    try:
        assert probe.committed(TopicPartition(topic, 0)) == total
    finally:
        probe.close()

    assert [u.version for u in subscribe(kafka_bootstrap, topic, start=2, timeout=3)] == [3]  # v2 is corrupt

    # from latest: the highest version on the topic first, then each new one as it arrives
    live = iter(subscribe(kafka_bootstrap, topic, start="latest", timeout=10))
    first = next(live)
    assert first.version == 3 and np.array_equal(first.item_codes, v3.item_codes)
    produce(kafka_bootstrap, topic, encode(v4, v3, 2048) + encode(v3, v2, 2048))  # v4, then a stale v3
    fourth = next(live)
    assert fourth.version == 4 and np.array_equal(fourth.item_codes, v4.item_codes)
    live.close()

    # an independent consumer (its own group) sees every record, each labelled with the schema
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=f"other-{uuid.uuid4().hex[:8]}",
                             auto_offset_reset="earliest", consumer_timeout_ms=5000)
    try:
        seen = list(consumer)
    finally:
        consumer.close()
    assert len(seen) == total + len(encode(v4, v3, 2048)) + len(encode(v3, v2, 2048))
    assert {dict(r.headers)["schema"] for r in seen} == {SCHEMA.encode()} and {r.key for r in seen} == {b"sparc"}


@pytest.mark.kafka
def test_attacks_on_a_real_broker_leave_the_genuine_versions_intact(kafka_bootstrap, kafka_topic, tmp_path, chain):
    """The three measured attacks, as records on a real topic ahead of the genuine ones: poisoned copies of v1's
    chunks (each with its own correct chunk sha256), a self-consistent far-future v1e9 with NaN codebooks, and a
    finite far-future forgery. The subscriber yields v0, v1 and v2 (v2 a remap from v1) with their codes, its
    mirror's latest is v2, and it says what it refused."""
    topic = kafka_topic()
    v0, v1, v2 = chain[:3]
    genuine_v1 = encode(v1, v0, 2048)
    poisoned = [(k, v[:-7], [(n, hashlib.sha256(v[:-7]).hexdigest().encode() if n == "chunk-sha256" else x)
                             for n, x in h]) for k, v, h in genuine_v1[1:]]
    nan = Snapshot(**{**v2.__dict__, "version": 1_000_000_000, "parent": None,
                      "codebooks": torch.full_like(v2.codebooks, float("nan"))})
    leap = Snapshot(**{**v2.__dict__, "version": 999_999_999, "parent": None})
    produce(kafka_bootstrap, topic, [*encode(v0, None, 2048), *poisoned, *encode(nan, None, 2048),
                                     *encode(leap, None, 2048), *genuine_v1, *encode(v2, v1, 2048)])
    url = f"file://{tmp_path}/mirror"
    sub = subscribe(kafka_bootstrap, topic, start="earliest", store_url=url, timeout=3, max_version_jump=100)
    got = list(sub)
    assert [u.version for u in got] == [0, 1, 2] and all(u.item_codes is not None for u in got)
    assert np.array_equal(got[2].item_codes, v2.item_codes)
    assert (sub.stats.rejected, sub.stats.refused) == (1, 1)  # the NaN update; the leap
    with open_store(url, read_only=True) as store:
        assert store.versions() == [0, 1, 2] and store.latest_version() == 2
