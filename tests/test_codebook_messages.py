"""codebook_store.messages: codebook-updates records round-trip, split under a size limit, reassemble in any
order, and a flipped byte anywhere is refused (nothing of that update comes out)."""

from __future__ import annotations

import hashlib
import json
import random

import pytest
import torch

from codebook_store import (
    CorruptUpdateError,
    IncompatibleSnapshotError,
    Reassembler,
    Snapshot,
    apply_remap,
    code_remap,
    open_store,
)
from codebook_store.messages import DEFAULT_MAX_BYTES, SCHEMA, encode


def make_snapshot(version: int, parent: int | None = None, *, items: int = 60, seed: int = 0,
                  base: Snapshot | None = None) -> Snapshot:
    """A seeded snapshot; with `base`, a child of it: the same codes but for a few items, plus 7 new items."""
    g = torch.Generator().manual_seed(seed * 1000 + version)
    if base is None:
        codes = torch.randint(0, 8, (items + 1, 3), generator=g)
    else:
        codes = torch.cat([base.item_codes, torch.randint(0, 8, (7, 3), generator=g)])
        codes[[2, 5, 11]] = (codes[[2, 5, 11]] + 1) % 8
    codes[0] = 0
    n = codes.shape[0]
    return Snapshot(
        model="sparc", version=version, parent=parent, created_at=1_700_000_000.5 + version,
        watermark={"kafka": {"feedback-events:0": 10 * version}}, config={"num_items": n - 1, "codes": 8},
        codebooks=torch.randn(3, 8, 4, generator=g), item_codes=codes,
        weights={"items.id_embedding": torch.randn(n, 4, generator=g), "step": torch.tensor(version)},
        health={"level1_utilisation": 0.5, "finite": True},
    )


def size(record) -> int:
    key, value, headers = record
    return len(key) + len(value) + sum(len(n) + len(v) for n, v in headers)


def feed(reassembler: Reassembler, records) -> list:
    return [u for u in (reassembler.accept(*r) for r in records) if u is not None]


def rehash(records, index: int, value: bytes) -> list:
    """Records with chunk `index` replaced by `value` and its chunk sha256 recomputed (a writer bug, not noise)."""
    out = list(records)
    key, _, headers = out[index]
    out[index] = (key, value, [(n, hashlib.sha256(value).hexdigest().encode() if n == "chunk-sha256" else v)
                               for n, v in headers])
    return out


@pytest.fixture(scope="module")
def parent() -> Snapshot:
    return make_snapshot(4)


@pytest.fixture(scope="module")
def child(parent) -> Snapshot:
    return make_snapshot(5, 4, base=parent)


def test_round_trip_with_the_whole_table_and_weights(parent):
    records = encode(parent, None, with_weights=True)
    assert len(records) == 2  # the header chunk, then the data
    key, head, headers = records[0]
    h = dict(headers)
    assert key == b"sparc" and h["schema"] == SCHEMA.encode() and (h["version"], h["chunk"], h["chunks"]) == (
        b"4", b"0", b"2")
    header = json.loads(head)
    assert [p["name"] for p in header["parts"]] == ["manifest", "codebooks", "item_codes", "weights"]
    assert (header["remap_from"], header["parent"]) == (None, None)

    (update,) = feed(Reassembler(), records)
    assert update.complete and update.remap is None and update.to_snapshot().same_as(parent)
    store = open_store("memory://")
    store.put_raw(update.manifest_raw, update.blobs)  # the store verifies every blob again
    assert store.get(4).same_as(parent)


def test_round_trip_of_a_remap_rebuilds_the_codes(parent, child):
    (update,) = feed(Reassembler(), encode(child, parent))
    expected = code_remap(parent.item_codes, child.item_codes)
    assert (update.version, update.parent, update.remap_from) == (5, 4, 4)
    assert update.remap.changed_items.tolist() == [2, 5, 11] == expected.changed_items.tolist()
    assert torch.equal(update.remap.added_items, torch.arange(61, 68))
    assert update.item_codes is None and update.weights is None and not update.complete
    assert torch.equal(update.codebooks, child.codebooks) and update.num_items == 67
    assert update.manifest.health == child.health and update.watermark == child.watermark

    resolved = update.with_base(parent.item_codes)  # checked against the manifest's item_codes sha256
    assert torch.equal(resolved.item_codes, child.item_codes)
    assert resolved.to_snapshot().same_as(Snapshot(**{**child.__dict__, "weights": {}}))
    with pytest.raises(IncompatibleSnapshotError, match="old codes"):
        update.with_base(make_snapshot(4, seed=9).item_codes)  # not the base the publisher diffed against
    shifted = parent.item_codes.clone()
    shifted[30] = (shifted[30] + 1) % 8  # an unchanged item differs: only the manifest's sha256 catches it
    with pytest.raises(IncompatibleSnapshotError, match="do not match the manifest"):
        update.with_base(shifted)


def test_apply_remap_refuses_a_base_of_another_shape(parent, child):
    remap = code_remap(parent.item_codes, child.item_codes)
    assert torch.equal(apply_remap(parent.item_codes, remap), child.item_codes)
    with pytest.raises(IncompatibleSnapshotError, match="added items"):
        apply_remap(parent.item_codes[:-3], remap)
    with pytest.raises(IncompatibleSnapshotError, match="levels"):
        apply_remap(parent.item_codes[:, :2], remap)
    back = code_remap(child.item_codes, parent.item_codes)  # items removed
    assert torch.equal(apply_remap(child.item_codes, back), parent.item_codes)
    with pytest.raises(ValueError, match="earlier version"):
        encode(parent, child)  # a base must come before the version it is a base of


def test_tiny_size_limit_splits_and_every_record_fits(parent, child):
    records = encode(child, parent, 1024, full_codes=True, with_weights=True)
    assert len(records) > 5 and all(size(r) <= 1024 for r in records)
    assert {dict(h)["chunks"] for _, _, h in records} == {str(len(records)).encode()}
    (update,) = feed(Reassembler(), records)
    assert update.complete and update.to_snapshot().same_as(child)
    assert all(size(r) <= DEFAULT_MAX_BYTES for r in encode(child, parent))
    with pytest.raises(ValueError, match="header chunk"):
        encode(child, parent, 300)


def test_chunks_in_any_order_with_duplicates_give_one_update(parent, child):
    records = encode(child, parent, 1024, with_weights=True)
    shuffled = records * 3
    random.Random(0).shuffle(shuffled)
    r = Reassembler()
    updates = feed(r, shuffled)
    assert len(updates) == 1 and updates[0].version == 5 and r.pending == []
    assert feed(r, records) == []  # a re-sent copy of an update already returned is ignored


def test_two_versions_interleaved(parent, child):
    a, b = encode(parent, None, 1024), encode(child, parent, 1024)
    mixed = [rec for pair in zip(b, a, strict=False) for rec in pair] + a[len(b):] + b[len(a):]
    r = Reassembler()
    updates = feed(r, mixed)
    assert sorted(u.version for u in updates) == [4, 5] and r.pending == []
    resolved = next(u for u in updates if u.version == 5).with_base(parent.item_codes)
    assert torch.equal(resolved.item_codes, child.item_codes)


@pytest.mark.parametrize("index", [0, 1, -1])
def test_a_flipped_byte_is_refused_and_nothing_is_applied(parent, child, index):
    records = encode(child, parent, 1024, with_weights=True)
    index %= len(records)
    key, value, headers = records[index]
    flipped = bytearray(value)
    flipped[len(flipped) // 2] ^= 0x01
    r = Reassembler()
    outcome = []
    for i, rec in enumerate(records):
        if i == index:
            with pytest.raises(CorruptUpdateError) as info:
                r.accept(key, bytes(flipped), headers)
            assert (info.value.kind, info.value.chunk, info.value.version) == ("checksum", index, 5)
        else:
            outcome.append(r.accept(*rec))
    assert outcome == [None] * (len(records) - 1) and r.pending == [("sparc", 5)]  # incomplete, never applied
    (update,) = feed(r, [records[index]])  # a clean copy of that chunk (a re-delivery) completes it
    assert update.with_base(parent.item_codes).to_snapshot().same_as(child)


def test_a_rehashed_bad_chunk_still_fails_the_update_checksum(parent, child):
    records = encode(child, parent, 1024)
    value = bytearray(records[2][1])
    value[0] ^= 0x80
    with pytest.raises(CorruptUpdateError, match="update sha256") as info:
        feed(Reassembler(), rehash(records, 2, bytes(value)))
    assert info.value.kind == "checksum"


def test_a_consistently_rewritten_part_fails_its_sha256(parent):
    """A writer that corrupts a part and then hashes what it sends: the header chunk's part sha256 refuses it."""
    records = encode(parent, None, 4096)
    data = bytearray(b"".join(v for _, v, _ in records[1:]))
    data[-5] ^= 0x01
    values = [records[0][1], bytes(data)]
    total = hashlib.sha256(b"".join(len(v).to_bytes(8, "big") + v for v in values)).hexdigest().encode()
    key, _, headers = records[0]
    rewritten = []
    for i, value in enumerate(values):
        h = {**dict(headers), "chunk": str(i).encode(), "chunks": b"2", "update-sha256": total,
             "chunk-sha256": hashlib.sha256(value).hexdigest().encode()}
        rewritten.append((key, value, list(h.items())))
    with pytest.raises(CorruptUpdateError, match="part 'item_codes' fails") as info:
        feed(Reassembler(), rewritten)
    assert info.value.blob == "item_codes"


def test_foreign_and_malformed_records_are_refused(parent):
    key, value, headers = encode(parent, None)[0]
    h = dict(headers)
    cases = {
        "headers schema, model": (key, value, []),
        "schema 'sparc.codebook-update/1'": (key, value, list({**h, "schema": b"sparc.codebook-update/1"}.items())),
        "with key b'other'": (b"other", value, headers),
        "chunk 2 of 2": (key, value, list({**h, "chunk": b"2"}.items())),
        "not a non-negative integer": (key, value, list({**h, "version": b"-1"}.items())),
    }
    for reason, record in cases.items():
        with pytest.raises(CorruptUpdateError, match=reason) as info:
            Reassembler().accept(*record)
        assert info.value.kind == "message"


def test_pending_updates_are_bounded(parent):
    r = Reassembler(max_pending=2)
    for version in range(4):
        records = encode(make_snapshot(version, items=30), None, 1024)
        assert r.accept(*records[0]) is None
    assert r.pending == [("sparc", 2), ("sparc", 3)] and r.dropped == 2


# --- the defects measured against a real worker's stream (issue 14)
def test_a_remap_rebuilds_codes_whose_padding_row_changed(parent):
    """The model codes its padding row too: row 0 differs between versions, and the rebuilt table must match."""
    moved = make_snapshot(5, 4, base=parent)
    codes = moved.item_codes.clone()
    codes[0] = torch.tensor([3, 1, 6])  # v4's row 0 is [0, 0, 0]
    moved = Snapshot(**{**moved.__dict__, "item_codes": codes})
    (update,) = feed(Reassembler(), encode(moved, parent))
    assert torch.equal(update.with_base(parent.item_codes).item_codes, moved.item_codes)


def test_a_poisoned_chunk_before_the_genuine_one_does_not_block_the_update(parent, child):
    """A truncated chunk that carries its own correct chunk sha256 arrives first; the clean copy completes."""
    records = encode(child, parent, 1024)
    poisoned = rehash(records, 1, records[1][1][:-10])[1]
    r, got = Reassembler(), []
    for record in [poisoned, *records]:
        try:
            update = r.accept(*record)
        except CorruptUpdateError:
            continue
        if update is not None:
            got.append(update)
    assert [u.version for u in got] == [5]


def test_a_consistent_nan_forgery_is_refused_and_later_versions_still_arrive(parent, child):
    """Anyone who can write to the topic can encode a self-consistent update: a far-future version with NaN
    codebooks must not be applied, nor hide the genuine versions after it."""
    from codebook_store import Follower

    forged = Snapshot(**{**parent.__dict__, "version": 1_000_000_000, "parent": None,
                         "codebooks": torch.full_like(parent.codebooks, float("nan"))})
    r, follower = Reassembler(), Follower("sparc", start=0, store=open_store("memory://"))
    yielded = []
    for record in [*encode(parent, None), *encode(forged, None), *encode(child, parent)]:
        try:
            update = r.accept(*record)
        except CorruptUpdateError:
            continue
        if update is not None and (got := follower.offer(update)) is not None:
            yielded.append(got.version)
    assert yielded == [4, 5] and follower.store.latest_version() == 5
