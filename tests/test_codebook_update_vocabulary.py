"""The vocabulary in codebook updates (contract 3.1, docs/codebook-updates.md §3 and §6): a snapshot's external
item ids travel whole or as a row delta against the remap's base; a subscriber rebuilds them, checks them against
the manifest's sha256, reads the remap by ids (an evicted row handed to a new item: the old id removed, the new
one added), and mirrors the publisher's exact bytes; a reader written from the 3.0 contract still reads the
update and ignores the delta."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import safetensors.numpy
import torch
from test_codebook_messages import feed, make_snapshot

from codebook_store import CorruptUpdateError, Follower, IncompatibleSnapshotError, Reassembler, Snapshot, open_store
from codebook_store.checks import MAX_ID_CHARS
from codebook_store.drift import apply_ids_delta, apply_remap, ids_delta
from codebook_store.format import encode as encode_snapshot
from codebook_store.format import item_ids_json, load_arrays, parse_manifest, verify_blob
from codebook_store.messages import IDS_DELTA_PART, encode, frame
from trainer.vocab import MAX_ID_CHARS as VOCAB_MAX_ID_CHARS

WHOLE, DELTA = "item_ids.safetensors", IDS_DELTA_PART


def named(snapshot: Snapshot, ids) -> Snapshot:
    return Snapshot(**{**snapshot.__dict__, "item_ids": tuple(ids)})


@pytest.fixture(scope="module")
def chain() -> list[Snapshot]:
    """v4: 60 SKUs; v5: its child (rows 2, 5, 11 and padding recoded, 7 items added) where row 3's item was
    evicted and the row handed to a new one; v6: v5 with the vocabulary unchanged."""
    base = make_snapshot(4)
    v4 = named(base, [f"sku-{i}" for i in range(1, 61)])
    child = make_snapshot(5, 4, base=base)
    ids = [*v4.item_ids, *(f"new-{i}" for i in range(7))]
    ids[2] = "took-row-3"
    v5 = named(child, ids)
    v6 = Snapshot(**{**v5.__dict__, "version": 6, "parent": 5, "codebooks": v5.codebooks + 0.5})
    return [v4, v5, v6]


def parts_of(records) -> list[str]:
    return [p["name"] for p in json.loads(records[0][1])["parts"]]


def test_the_first_update_sends_the_vocabulary_whole(chain):
    v4 = chain[0]
    records = encode(v4, None, with_weights=True)
    assert WHOLE in parts_of(records) and DELTA not in parts_of(records)
    (update,) = feed(Reassembler(), records)
    assert update.item_ids == v4.item_ids and update.vocabulary_sent == "whole" and update.complete
    assert update.ids_of([1, 60]) == ["sku-1", "sku-60"] and update.row_of("sku-7") == 7
    assert update.row_of("nope") is None
    with pytest.raises(ValueError, match="rows lie in 1..60"):
        update.ids_of([0])
    assert update.to_snapshot().same_as(v4)
    store = open_store("memory://")
    store.put_raw(update.manifest_raw, update.blobs)  # the publisher's bytes, vocabulary included
    assert store.read_raw(4) == encode_snapshot(v4)


def test_an_evicted_row_reused_by_a_new_id_travels_as_a_delta_and_reads_as_removed_and_added(chain):
    v4, v5, _ = chain
    records = encode(v5, v4, with_weights=True)
    assert DELTA in parts_of(records) and WHOLE not in parts_of(records)
    (update,) = feed(Reassembler(), records)
    assert update.item_ids is None and update.vocabulary_sent == "delta" and not update.complete
    assert update.ids_delta.rows.tolist() == [3, *range(61, 68)]
    assert update.ids_delta.ids == ("took-row-3", *(f"new-{i}" for i in range(7)))

    resolved = update.with_base(v4.item_codes.numpy(), v4.item_ids)
    assert resolved.item_ids == v5.item_ids and resolved.complete
    assert resolved.blobs == encode_snapshot(v5)[1]  # every blob as the publisher stored it
    assert resolved.to_snapshot().same_as(v5)
    by_id = resolved.item_remap
    assert by_id.removed == ("sku-3",)  # evicted: its row now holds another item
    assert by_id.added == ("took-row-3", *(f"new-{i}" for i in range(7)))
    assert by_id.changed == ("sku-2", "sku-5", "sku-11")  # row 0 (padding) is no item
    assert by_id.reused_rows.tolist() == [3]
    assert update.remap.changed_items.tolist() == [0, 2, 5, 11]  # the row diff says nothing of row 3


def test_an_unchanged_vocabulary_sends_a_tiny_empty_delta(chain):
    _, v5, v6 = chain
    records = encode(v6, v5)
    header = json.loads(records[0][1])
    (part,) = [p for p in header["parts"] if p["name"] == DELTA]
    whole = len(encode_snapshot(v6)[1][WHOLE])
    assert part["size"] == 122 < whole  # two empty tensors and their header
    (update,) = feed(Reassembler(), records)
    resolved = update.with_base(v5.item_codes, v5.item_ids)
    assert resolved.item_ids == v5.item_ids and resolved.ids_delta.rows.size == 0
    assert resolved.item_remap.changed == resolved.item_remap.added == resolved.item_remap.removed == ()


def test_a_vocabulary_mostly_replaced_goes_whole_and_a_full_table_sends_it_whole(chain):
    v4, v5, _ = chain
    replaced = named(v5, [f"other-{i}" for i in range(67)])
    assert WHOLE in parts_of(encode(replaced, v4))  # the delta would name every row: more bytes than whole
    full = encode(v5, v4, full_codes=True)
    assert {WHOLE, "item_codes.safetensors", "remap.safetensors"} <= set(parts_of(full))
    (update,) = feed(Reassembler(), full)
    resolved = update.with_base(v4.item_codes, v4.item_ids)  # both sent whole: the base still reads the remap
    assert resolved.item_remap.removed == ("sku-3",)


def test_the_rebuilt_vocabulary_is_checked_against_the_manifest(chain):
    v4, v5, _ = chain
    (update,) = feed(Reassembler(), encode(v5, v4))
    wrong = list(v4.item_ids)
    wrong[30] = "not-the-publishers"  # a row the delta does not name: only the sha256 catches it
    with pytest.raises(IncompatibleSnapshotError, match="item_ids.safetensors rebuilt from v4 does not match"):
        update.with_base(v4.item_codes, wrong)
    with pytest.raises(IncompatibleSnapshotError, match="does not match"):
        update.with_base(v4.item_codes, None)  # a base without a vocabulary (row i is item i)
    with pytest.raises(IncompatibleSnapshotError):
        update.with_base(v4.item_codes[:-1], v4.item_ids[:-1])  # a smaller base


def test_string_int_and_identity_vocabularies_round_trip_through_deltas():
    """A snapshot without a vocabulary (row i is item i) is a base too; ids of every kind survive."""
    plain = make_snapshot(1, items=60)
    codes = torch.cat([plain.item_codes, plain.item_codes[1:3]])
    ids = list(range(1, 63))
    ids[1:3], ids[5:7] = [2**63 - 1, "é\u0001\"quoted\"\\"], ["7 ", -3]
    ids[60:] = ["x" * MAX_ID_CHARS, "\U0001f600" * MAX_ID_CHARS]
    child = Snapshot(**{**plain.__dict__, "version": 2, "parent": 1, "item_codes": codes, "item_ids": ids,
                        "weights": {}, "config": {"num_items": 62, "codes": 8}})
    (update,) = feed(Reassembler(), encode(child, plain))
    assert update.vocabulary_sent == "delta" and update.ids_delta.rows.tolist() == [2, 3, 6, 7, 61, 62]
    resolved = update.with_base(plain.item_codes, None)
    assert resolved.item_ids == tuple(ids) and resolved.item_remap.removed == (2, 3, 6, 7)
    assert resolved.blobs["item_ids.safetensors"] == encode_snapshot(child)[1]["item_ids.safetensors"]
    back = ids_delta(ids, 62, None, 60)  # and back to row i is item i, two rows dropped
    assert back.rows.tolist() == [2, 3, 6, 7] and apply_ids_delta(ids, 62, back, 60) == tuple(range(1, 61))
    (first,) = feed(Reassembler(), encode(plain, None))
    assert first.item_ids == tuple(range(1, 61)) and first.vocabulary_sent is None  # no vocabulary: none sent


def test_ids_are_bounded_like_the_learners():
    assert MAX_ID_CHARS == VOCAB_MAX_ID_CHARS == 256
    plain = make_snapshot(1, items=2)
    with pytest.raises(ValueError, match="string of 1 to 256"):
        named(plain, ["a", "x" * 257])


def genuine_parts(snapshot: Snapshot, base: Snapshot) -> list[tuple[str, bytes]]:
    records = encode(snapshot, base)
    data = b"".join(v for _, v, _ in records[1:])
    out, offset = [], 0
    for part in json.loads(records[0][1])["parts"]:
        out.append((part["name"], data[offset : offset + part["size"]]))
        offset += part["size"]
    return out


def broken_delta_update(v4: Snapshot, v5: Snapshot, rows, ids_json: bytes, *, with_remap: bool = True):
    """v5's update with its delta part replaced (a consistent writer: part and chunk sha256s match)."""
    parts = dict(genuine_parts(v5, v4))
    del parts[DELTA]
    if not with_remap:
        del parts["remap.safetensors"]
        parts["item_codes.safetensors"] = encode_snapshot(v5)[1]["item_codes.safetensors"]
    parts[DELTA] = safetensors.numpy.save(
        {"rows": np.asarray(rows, dtype=np.int64), "ids": np.frombuffer(ids_json, dtype=np.uint8)})
    return frame("sparc", 5, parts, parent=4, remap_from=4 if with_remap else None, max_bytes=4096)


@pytest.mark.parametrize("rows, ids, message", [
    ([3, 3], b'["a","b"]', "not ascending"),
    ([0], b'["a"]', "not ascending in 1..67"),
    ([68], b'["a"]', "not ascending in 1..67"),
    ([3], b'["a","b"]', "names 2 ids for 1 rows"),
    ([3], b'[1.5]', "int64 or a string"),
    ([3, 4], b'["a","a"]', "twice"),
    ([3], b'["' + b"x" * 257 + b'"]', "string of 1 to 256"),
    ([3], b"{not json", "not a JSON array"),
])
def test_a_malformed_delta_is_refused(chain, rows, ids, message):
    v4, v5, _ = chain
    with pytest.raises(CorruptUpdateError, match=message) as info:
        feed(Reassembler(), broken_delta_update(v4, v5, rows, ids))
    assert info.value.kind == "content" and info.value.blob == DELTA


def test_a_delta_without_a_remap_base_is_refused(chain):
    v4, v5, _ = chain
    with pytest.raises(CorruptUpdateError, match="without remap.safetensors"):
        feed(Reassembler(), broken_delta_update(v4, v5, [3], b'["a"]', with_remap=False))


def read_as_3_0(records) -> dict:
    """A subscriber written from the 3.0 contract alone (docs §7): chunks against the header chunk, parts against
    their sha256, blob parts against the manifest, the remap applied to its base; parts it does not know are
    ignored. Returns {part name: bytes} of what it keeps (blob parts) and the item codes it rebuilt."""
    header = json.loads(records[0][1])
    data = b"".join(v for _, v, _ in records[1:])
    assert [hashlib.sha256(v).hexdigest() for _, v, _ in records[1:]] == header["chunks"]
    manifest = parse_manifest(data[: header["parts"][0]["size"]])
    kept, offset = {}, 0
    for part in header["parts"]:
        value = data[offset : offset + part["size"]]
        offset += part["size"]
        assert hashlib.sha256(value).hexdigest() == part["sha256"]
        if part["name"] in manifest.blobs:
            verify_blob(manifest, part["name"], value)
            kept[part["name"]] = value
        elif part["name"] == "remap.safetensors":
            kept["remap"] = safetensors.numpy.load(value)
    return {"manifest": manifest, **kept}


def test_a_3_0_reader_reads_a_3_1_update_and_ignores_the_delta(chain):
    v4, v5, _ = chain
    records = encode(v5, v4)
    assert dict(records[0][2])["schema"] == b"sparc.codebook-update/3.1"
    read = read_as_3_0(records)
    assert DELTA not in read and WHOLE not in read  # the delta is neither a blob nor a part 3.0 knows
    from codebook_store.drift import CodeRemap

    codes = apply_remap(v4.item_codes, CodeRemap(**read["remap"]))
    blob = safetensors.numpy.save({"item_codes": codes})
    load_arrays(read["manifest"], "item_codes.safetensors", blob)  # its rebuilt codes match the manifest
    assert item_ids_json(v5.item_ids) != item_ids_json(v4.item_ids)


def test_a_follower_mirrors_every_version_byte_for_byte_and_resolves_from_its_store(chain, tmp_path):
    v4, v5, v6 = chain
    records = [*encode(v4, None, with_weights=True), *encode(v5, v4, with_weights=True),
               *encode(v6, v5, with_weights=True)]
    updates = feed(Reassembler(), records)
    follower = Follower("sparc", start=0, store=open_store(f"file://{tmp_path}/mirror"))
    yielded = [follower.offer(u) for u in updates]
    assert [u.item_ids for u in yielded] == [s.item_ids for s in chain]
    assert yielded[1].item_remap.removed == ("sku-3",)
    for snapshot in chain:
        assert follower.store.read_raw(snapshot.version) == encode_snapshot(snapshot)
    follower.store.close()

    late = Follower("sparc", start=6, store=open_store(f"file://{tmp_path}/mirror"))  # bases from the store
    resolved = late.offer(updates[2])
    assert resolved.item_ids == v6.item_ids and resolved.item_remap is not None and late.stats.unresolved == 0
    late.store.close()

    cold = Follower("sparc", start=0)  # no base at all: yielded unresolved, nothing to map rows to ids
    assert cold.offer(updates[1]).item_ids is None and cold.stats.unresolved == 1
