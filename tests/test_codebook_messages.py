"""codebook_store.messages: codebook-updates records round-trip, split under a size limit, reassemble in any
order; a bad copy of a chunk is refused alone (the clean copy completes the update); forged, non-finite and
incompatible updates are refused; memory stays bounded (docs/codebook-updates.md is the contract)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random

import numpy as np
import pytest
import safetensors.numpy
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
from codebook_store import messages as messages_module
from codebook_store.format import BlobInfo, TensorInfo, manifest_bytes, parse_manifest
from codebook_store.format import encode as encode_snapshot
from codebook_store.messages import DEFAULT_MAX_BYTES, SCHEMA, encode, frame


def make_snapshot(version: int, parent: int | None = None, *, items: int = 60, seed: int = 0,
                  base: Snapshot | None = None) -> Snapshot:
    """A seeded snapshot; with `base`, a child of it: the same codes but for a few items and the padding row,
    plus 7 new items (the model codes its padding row too, so row 0 moves between versions)."""
    g = torch.Generator().manual_seed(seed * 1000 + version)
    if base is None:
        codes = torch.randint(0, 8, (items + 1, 3), generator=g)
    else:
        codes = torch.cat([base.item_codes, torch.randint(0, 8, (7, 3), generator=g)])
        codes[[0, 2, 5, 11]] = (codes[[0, 2, 5, 11]] + 1) % 8
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


def survivors(reassembler: Reassembler, records) -> tuple[list, list[CorruptUpdateError]]:
    """(updates completed, errors raised) feeding every record, as a subscriber does (it logs and goes on)."""
    done, errors = [], []
    for record in records:
        try:
            update = reassembler.accept(*record)
        except CorruptUpdateError as exc:
            errors.append(exc)
            continue
        if update is not None:
            done.append(update)
    return done, errors


def with_value(record, value: bytes, **headers: bytes):
    """`record` with another value, its chunk sha256 recomputed (a consistent writer, not noise), and headers
    replaced as given (names with '_' for '-')."""
    key, _, old = record
    h = {**dict(old), "chunk-sha256": hashlib.sha256(value).hexdigest().encode()}
    h.update({name.replace("_", "-"): v for name, v in headers.items()})
    return key, value, list(h.items())


@pytest.fixture(scope="module")
def parent() -> Snapshot:
    return make_snapshot(4)


@pytest.fixture(scope="module")
def child(parent) -> Snapshot:
    return make_snapshot(5, 4, base=parent)


def without_weights(snapshot: Snapshot) -> Snapshot:
    return Snapshot(**{**snapshot.__dict__, "weights": {}})


# --- round trips
def test_round_trip_with_the_whole_table_and_weights(parent):
    records = encode(parent, None, with_weights=True)
    assert len(records) == 2  # the header chunk, then the data
    key, head, headers = records[0]
    h = dict(headers)
    assert key == b"sparc" and h["schema"] == SCHEMA.encode() and (h["version"], h["chunk"], h["chunks"]) == (
        b"4", b"0", b"2")
    assert "signature" not in h  # unsigned without a signer
    header = json.loads(head)
    assert [p["name"] for p in header["parts"]] == [
        "manifest.json", "codebooks.safetensors", "item_codes.safetensors", "weights.safetensors"]
    assert (header["remap_from"], header["parent"]) == (None, None)
    assert header["chunks"] == [dict(records[1][2])["chunk-sha256"].decode()]

    (update,) = feed(Reassembler(), records)
    assert update.complete and update.remap is None and update.to_snapshot().same_as(parent)
    assert isinstance(update.codebooks, np.ndarray) and update.signed_by is None
    manifest, blobs = encode_snapshot(parent)
    assert update.manifest_raw == manifest and update.blobs == blobs  # the publisher's stored bytes
    store = open_store("memory://")
    store.put_raw(update.manifest_raw, update.blobs)  # the store verifies every blob again
    assert store.get(4).same_as(parent)


def test_round_trip_of_a_remap_rebuilds_the_codes_padding_row_included(parent, child):
    (update,) = feed(Reassembler(), encode(child, parent))
    expected = code_remap(parent.item_codes, child.item_codes)
    assert (update.version, update.parent, update.remap_from) == (5, 4, 4)
    assert update.remap.changed_items.tolist() == [0, 2, 5, 11] == expected.changed_items.tolist()
    assert update.remap.added_items.tolist() == list(range(61, 68))
    assert update.item_codes is None and update.weights is None and not update.complete
    assert np.array_equal(update.codebooks, child.codebooks.numpy()) and update.num_items == 67
    assert update.manifest.health == child.health and update.watermark == child.watermark

    resolved = update.with_base(parent.item_codes.numpy())  # checked against the manifest's item_codes sha256
    assert np.array_equal(resolved.item_codes, child.item_codes.numpy())
    assert resolved.blobs["item_codes.safetensors"] == encode_snapshot(child)[1]["item_codes.safetensors"]
    assert resolved.to_snapshot().same_as(without_weights(child))
    with pytest.raises(IncompatibleSnapshotError, match="old codes"):
        update.with_base(make_snapshot(4, seed=9).item_codes)  # not the base the publisher diffed against
    shifted = parent.item_codes.clone()
    shifted[30] = (shifted[30] + 1) % 8  # an unchanged item differs: only the manifest's sha256 catches it
    with pytest.raises(IncompatibleSnapshotError, match="item_codes.safetensors rebuilt from v4 does not match"):
        update.with_base(shifted)


def test_a_remap_rebuilds_codes_whose_padding_row_changed(parent):
    """Measured on a real worker (issue 14): row 0 changes between versions; the rebuilt table must match."""
    moved = make_snapshot(5, 4, base=parent)
    codes = moved.item_codes.clone()
    codes[0] = torch.tensor([3, 1, 6])
    moved = Snapshot(**{**moved.__dict__, "item_codes": codes})
    (update,) = feed(Reassembler(), encode(moved, parent))
    assert np.array_equal(update.with_base(parent.item_codes).item_codes, moved.item_codes.numpy())


def test_apply_remap_refuses_a_base_of_another_shape(parent, child):
    remap = code_remap(parent.item_codes, child.item_codes)
    assert np.array_equal(apply_remap(parent.item_codes, remap), child.item_codes.numpy())
    with pytest.raises(IncompatibleSnapshotError, match="added items"):
        apply_remap(parent.item_codes[:-3], remap)
    with pytest.raises(IncompatibleSnapshotError, match="levels"):
        apply_remap(parent.item_codes[:, :2], remap)
    back = code_remap(child.item_codes, parent.item_codes)  # items removed
    assert np.array_equal(apply_remap(child.item_codes, back), parent.item_codes.numpy())
    with pytest.raises(ValueError, match="earlier version"):
        encode(parent, child)  # a base must come before the version it is a base of


def test_tiny_size_limit_splits_and_every_record_fits(parent, child):
    records = encode(child, parent, 2048, full_codes=True, with_weights=True)
    assert len(records) > 4 and all(size(r) <= 2048 for r in records)
    assert {dict(h)["chunks"] for _, _, h in records} == {str(len(records)).encode()}
    (update,) = feed(Reassembler(), records)
    assert update.complete and update.to_snapshot().same_as(child)
    assert all(size(r) <= DEFAULT_MAX_BYTES for r in encode(child, parent))
    with pytest.raises(ValueError, match="header chunk"):
        encode(child, parent, 600)


def test_chunks_in_any_order_with_duplicates_give_one_update(parent, child):
    records = encode(child, parent, 2048, with_weights=True)
    shuffled = records * 3
    random.Random(0).shuffle(shuffled)
    r = Reassembler()
    updates = feed(r, shuffled)
    assert len(updates) == 1 and updates[0].version == 5 and r.pending == [] and r.held_bytes == 0
    assert feed(r, records) == [] and r.repeated >= len(records)  # a re-sent copy of a returned update


def test_two_versions_interleaved(parent, child):
    a, b = encode(parent, None, 2048), encode(child, parent, 2048)
    mixed = [rec for pair in zip(b, a, strict=False) for rec in pair] + a[len(b):] + b[len(a):]
    r = Reassembler()
    updates = feed(r, mixed)
    assert sorted(u.version for u in updates) == [4, 5] and r.pending == []
    resolved = next(u for u in updates if u.version == 5).with_base(parent.item_codes)
    assert np.array_equal(resolved.item_codes, child.item_codes.numpy())


# --- bad copies never poison an update
@pytest.mark.parametrize("index", [0, 1, -1])
def test_a_flipped_byte_is_refused_and_the_clean_copy_completes(parent, child, index):
    records = encode(child, parent, 2048, with_weights=True)
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


@pytest.mark.parametrize("header_first", [False, True])
def test_a_poisoned_chunk_before_the_genuine_one_does_not_block_the_update(parent, child, header_first):
    """Measured on Kafka (issue 14): a truncated chunk carrying its own correct chunk sha256, arriving before the
    genuine one, used to fail the whole update and mark it done. Now it is refused alone (or, before the header
    chunk says which copy is right, held beside the genuine one) and the genuine chunks complete the update."""
    records = encode(child, parent, 2048)
    poisoned = [with_value(records[i], records[i][1][:-10]) for i in range(1, len(records))]
    order = [records[0], *poisoned, *records[1:]] if header_first else [*poisoned, *records]
    done, errors = survivors(Reassembler(), order)
    assert [u.version for u in done] == [5]
    assert np.array_equal(done[0].with_base(parent.item_codes).item_codes, child.item_codes.numpy())
    if header_first:  # each bad copy is refused as it arrives
        assert len(errors) == len(poisoned) and {e.kind for e in errors} == {"checksum"}
    else:
        assert errors == []


def test_a_consistent_rewrite_of_a_blob_fails_the_manifest_sha256(parent, monkeypatch):
    """A writer that changes a blob and hashes what it sends (chunk list, part sha256) is caught by the
    manifest's own blob sha256; that update id is then refused for good."""
    def tampered(snapshot):
        manifest, blobs = encode_snapshot(snapshot)
        data = bytearray(blobs["item_codes.safetensors"])
        data[-5] ^= 0x01
        return manifest, {**blobs, "item_codes.safetensors": bytes(data)}

    monkeypatch.setattr(messages_module, "encode_snapshot", tampered)
    records = encode(parent, None, 4096)
    r = Reassembler()
    with pytest.raises(CorruptUpdateError, match="'item_codes.safetensors' fails its checksum") as info:
        feed(r, records)
    assert info.value.blob == "item_codes.safetensors"
    assert feed(r, records) == [] and r.repeated == len(records)


# --- forged and broken content
def forged(snapshot: Snapshot, **fields) -> Snapshot:
    return Snapshot(**{**snapshot.__dict__, **fields})


@pytest.mark.parametrize("field", ["codebooks", "weights"])
def test_non_finite_tensors_are_refused(parent, field):
    if field == "codebooks":
        bad = forged(parent, codebooks=torch.full_like(parent.codebooks, float("nan")))
    else:
        bad = forged(parent, weights={**parent.weights, "items.id_embedding": torch.full((61, 4), float("inf"))})
    with pytest.raises(CorruptUpdateError, match="non-finite") as info:
        feed(Reassembler(), encode(bad, None, with_weights=True))
    assert info.value.kind == "content"


def test_a_consistent_nan_forgery_is_refused_and_later_versions_still_arrive(parent, child):
    """Measured on Kafka (issue 14): anyone who can write to the topic builds a self-consistent update with
    messages.encode; a far-future version with NaN codebooks used to be accepted, mirrored, and to hide every
    genuine version after it."""
    from codebook_store import Follower

    nan = forged(parent, version=1_000_000_000, codebooks=torch.full_like(parent.codebooks, float("nan")))
    r, follower = Reassembler(), Follower("sparc", start=0, store=open_store("memory://"))
    done, errors = survivors(r, [*encode(parent, None), *encode(nan, None), *encode(child, parent)])
    yielded = [got.version for u in done if (got := follower.offer(u)) is not None]
    assert yielded == [4, 5] and follower.store.latest_version() == 5
    assert [e.kind for e in errors] == ["content"]


def test_out_of_range_codes_in_a_remap_are_refused(parent, child, monkeypatch):
    remap = code_remap(parent.item_codes, child.item_codes)
    bad = messages_module.CodeRemap(**{**remap.__dict__, "added_codes": remap.added_codes + 100})
    monkeypatch.setattr(messages_module, "code_remap", lambda old, new: bad)
    with pytest.raises(CorruptUpdateError, match=r"\[0, 8\)") as info:
        feed(Reassembler(), encode(child, parent))
    assert info.value.kind == "content"


# --- compatibility
def test_a_compatible_minor_is_read_and_what_it_adds_is_ignored_or_kept(parent):
    """A later minor (3.2) adds a header-chunk field, a record header, a part this reader does not know, and a
    blob its manifest lists: the update is read, the unknown part ignored, the listed blob kept (and stored)."""
    manifest, blobs = encode_snapshot(parent)
    parsed = parse_manifest(manifest)
    extra = safetensors.numpy.save({"popularity": np.arange(61, dtype=np.int64)})
    grown = dataclasses.replace(
        parsed,
        tensors={**parsed.tensors, "popularity": TensorInfo("popularity.safetensors", "int64", (61,))},
        blobs={**parsed.blobs, "popularity.safetensors": BlobInfo(hashlib.sha256(extra).hexdigest(), len(extra))},
    )
    manifest = manifest_bytes(grown)
    parts = {"manifest.json": manifest, **blobs, "popularity.safetensors": extra, "future.bin": b"\x00" * 10}
    records = frame("sparc", 4, parts, parent=None, remap_from=None, max_bytes=4096,
                    schema="sparc.codebook-update/3.2", fields={"popularity": {"size": 61}})
    records = [(k, v, [*h, ("trace-id", b"abc")]) for k, v, h in records]
    (update,) = feed(Reassembler(), records)
    assert update.complete and update.header["popularity"] == {"size": 61}
    assert "future.bin" not in update.blobs and update.blobs["popularity.safetensors"] == extra
    store = open_store("memory://")
    store.put_raw(update.manifest_raw, update.blobs)
    assert store.read_raw(4)[1]["popularity.safetensors"] == extra


@pytest.mark.parametrize("schema, message", [
    ("sparc.codebook-update/4.0", "newer major: upgrade this subscriber"),
    ("sparc.codebook-update/2", "older major: upgrade the publisher"),
])
def test_another_major_is_refused_with_a_clear_error(parent, schema, message):
    key, value, headers = encode(parent, None)[0]
    with pytest.raises(CorruptUpdateError, match=message) as info:
        Reassembler().accept(key, value, [(n, schema.encode() if n == "schema" else v) for n, v in headers])
    assert info.value.kind == "schema"


def test_foreign_and_malformed_records_are_refused(parent):
    key, value, headers = encode(parent, None)[0]
    h = dict(headers)
    cases = {
        "headers schema, model": (key, value, []),
        "schema 'other/1'": (key, value, list({**h, "schema": b"other/1"}.items())),
        "with key b'other'": (b"other", value, headers),
        "chunk 2 of 2": (key, value, list({**h, "chunk": b"2"}.items())),
        "not a non-negative integer": (key, value, list({**h, "version": b"-1"}.items())),
        "repeated": (key, value, [*headers, ("model", b"sparc")]),
    }
    for reason, record in cases.items():
        with pytest.raises(CorruptUpdateError, match=reason) as info:
            Reassembler().accept(*record)
        assert info.value.kind == "message"


def test_a_malformed_header_chunk_refuses_its_update_for_good(parent):
    records = encode(parent, None, 4096)
    head = json.loads(records[0][1])
    head["remap_from"] = 7  # a remap base after the version itself
    value = json.dumps(head).encode()
    bad = [with_value(records[0], value, update_sha256=hashlib.sha256(value).hexdigest().encode())]
    r = Reassembler()
    with pytest.raises(CorruptUpdateError, match="remap_from 7 is not an earlier version"):
        feed(r, bad)
    assert feed(r, bad) == [] and r.repeated == 1 and r.pending == []


# --- bounded memory
def test_pending_updates_are_bounded_in_count_and_bytes(parent):
    r = Reassembler(max_pending=2)
    for version in range(4):
        records = encode(make_snapshot(version, items=30), None, 2048)
        assert r.accept(*records[0]) is None
    assert r.pending == [("sparc", 2), ("sparc", 3)] and r.dropped == 2

    r = Reassembler(max_pending_bytes=5000)
    for version in range(6):  # chunks that never complete: only the newest fit
        for record in encode(make_snapshot(version, items=30), None, 2048)[:-1]:
            r.accept(*record)
        assert r.held_bytes <= 5000
    assert r.pending[-1] == ("sparc", 5) and r.dropped >= 4
    big = encode(make_snapshot(9, items=300), None, 2048, with_weights=True)
    with pytest.raises(CorruptUpdateError, match="max_pending_bytes") as info:
        feed(r, big)
    assert info.value.kind == "bound" and r.held_bytes <= 5000


def test_copies_before_the_header_chunk_are_bounded(parent):
    records = encode(parent, None, 2048)
    r = Reassembler(max_copies=2)
    r.accept(*with_value(records[1], b"a"))
    r.accept(*with_value(records[1], b"b"))
    with pytest.raises(CorruptUpdateError, match="2 different copies") as info:
        r.accept(*with_value(records[1], b"c"))
    assert info.value.kind == "bound"


def test_copies_that_overflow_the_byte_bound_before_the_header_do_not_refuse_the_update(parent):
    """Junk copies of an update's chunks, sent ahead of its header chunk, overflow the bound: that drops what was
    held, but the genuine records that follow still complete the update."""
    records = encode(parent, None, 2048)
    junk = [with_value(records[i], bytes(1500) + bytes([n])) for i in range(1, len(records)) for n in range(3)]
    r = Reassembler(max_pending_bytes=6000)
    done, errors = survivors(r, [*junk, *records])
    assert [u.version for u in done] == [4] and {e.kind for e in errors} == {"bound"} and r.dropped >= 1
