"""codebook_store: snapshot validation, the format and its checks, drift, compatibility, every backend."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from codebook_store import (
    CodebookStoreError,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    InvalidSnapshotError,
    ReadOnlyStoreError,
    Snapshot,
    SnapshotNotFoundError,
    SnapshotStore,
    StoreUnavailableError,
    UnsupportedFormatError,
    VersionExistsError,
    check_compatible,
    code_remap,
    decode,
    drift,
    encode,
    open_store,
    parse_manifest,
)
from codebook_store.file_store import FileStore
from codebook_store.memory_store import MemoryStore
from codebook_store.rocksdb_store import RocksDBStore, _blob_prefix, _write_id_key

BLOBS = ("codebooks.safetensors", "item_codes.safetensors", "weights.safetensors")


def make_snapshot(
    version: int = 1,
    parent: int | None = None,
    *,
    model: str = "sparc",
    items: int = 5,
    levels: int = 2,
    codes: int = 4,
    dim: int = 3,
    seed: int = 0,
) -> Snapshot:
    g = torch.Generator().manual_seed(seed * 1000 + version)
    item_codes = torch.randint(0, codes, (items + 1, levels), generator=g)
    item_codes[0] = 0  # padding row
    return Snapshot(
        model=model,
        version=version,
        parent=parent,
        created_at=1_700_000_000.123456 + version,
        watermark={"kafka": {"feedback-events:0": 100 * version, "feedback-events:1": 7}},
        config={"levels": levels, "codes": codes, "dim": dim, "encoder": {"heads": 1}},
        codebooks=torch.randn(levels, codes, dim, generator=g),
        item_codes=item_codes,
        weights={"item_embedding": torch.randn(items + 1, dim, generator=g), "step": torch.tensor(version)},
        health={"collision_rate": 0.25, "level1_utilisation": 0.75, "drift": {"changed_share": 0.5}},
    )


def flip(data: bytes, position: int, mask: int = 0xFF) -> bytes:
    out = bytearray(data)
    out[position] ^= mask
    return bytes(out)


# --- backends and how to damage each one's stored bytes (tests only) ---
@pytest.fixture(params=["memory", "file", "rocksdb"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> SnapshotStore:
    url = {"memory": "memory://", "file": f"file://{tmp_path}/files", "rocksdb": f"rocksdb://{tmp_path}/db"}
    s = open_store(url[request.param])
    yield s
    s.close()


def set_blob(store: SnapshotStore, model: str, version: int, name: str, data: bytes | None) -> None:
    """Overwrite (or delete, data=None) one stored blob behind the store's back."""
    if isinstance(store, MemoryStore):
        blobs = store._blobs[(model, version)]
        if data is None:
            del blobs[name]
        else:
            blobs[name] = data
    elif isinstance(store, FileStore):
        path = store.root / model / str(version) / name
        if data is None:
            path.unlink()
        else:
            path.write_bytes(data)
    elif isinstance(store, RocksDBStore):  # chunks under the version's write id; one chunk reads back the same
        write_id = store._db.get(_write_id_key(model, version)) or b"0123456789abcdef"  # none: an orphan attempt
        prefix = _blob_prefix(model, version, write_id) + name.encode() + b"/"
        store._db.delete_range(prefix, prefix[:-1] + b"0")
        if data is not None:
            store._db.put(prefix + b"00000000", data)
    else:
        raise TypeError(store)


def set_manifest(store: SnapshotStore, model: str, version: int, data: bytes) -> None:
    if isinstance(store, MemoryStore):
        store._manifests[(model, version)] = data
    elif isinstance(store, FileStore):
        (store.root / model / str(version) / "manifest.json").write_bytes(data)
    else:
        store._db.put(f"m/{model}/{version:020d}".encode(), data)


# --- Snapshot ---
def test_snapshot_normalises_json_and_reports_sizes() -> None:
    snap = make_snapshot()
    s2 = Snapshot(**{**snap.__dict__, "config": {"dims": (1, 2)}})
    assert s2.config == {"dims": [1, 2]}
    assert (snap.num_levels, snap.codebook_size, snap.num_items) == (2, 4, 5)
    assert snap.tensor_shapes() == {
        "codebooks": (2, 4, 3),
        "item_codes": (6, 2),
        "item_embedding": (6, 3),
        "step": (),
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": -1}, "version"),
        ({"parent": 1}, "parent"),
        ({"model": "a/b"}, "model name"),
        ({"created_at": float("nan")}, "created_at"),
        ({"health": {"perplexity": float("nan")}}, "health"),
        ({"config": {"f": object()}}, "config"),
        ({"codebooks": torch.zeros(2, 4, 3, dtype=torch.float64)}, "codebooks"),
        ({"item_codes": torch.zeros(6, 3, dtype=torch.int64)}, "item_codes"),
        ({"item_codes": torch.full((6, 2), 4, dtype=torch.int64)}, r"\[0, 4\)"),
        ({"weights": {"codebooks": torch.zeros(1)}}, "weight name"),
        ({"weights": {"x": [1.0]}}, "tensor"),
    ],
)
def test_snapshot_rejects_inconsistent_fields(change: dict, message: str) -> None:
    fields = {**make_snapshot().__dict__, **change}
    with pytest.raises(InvalidSnapshotError, match=message):
        Snapshot(**fields)


def test_padding_row_is_exempt_from_the_code_range() -> None:
    codes = make_snapshot().item_codes.clone()
    codes[0] = -1
    Snapshot(**{**make_snapshot().__dict__, "item_codes": codes})


# --- format ---
def test_encode_decode_round_trip_is_bit_exact_and_deterministic() -> None:
    snap = make_snapshot()
    snap.weights["half"] = torch.randn(4, 2).to(torch.bfloat16)
    snap.weights["mask"] = torch.tensor([True, False])
    snap.codebooks[0, 0, 0] = -0.0
    manifest, blobs = encode(snap)
    assert sorted(blobs) == sorted(BLOBS)
    back = decode(manifest, blobs)
    assert back.same_as(snap)
    assert encode(back) == (manifest, blobs)
    m = json.loads(manifest)
    assert m["format_version"] == 1
    for name, data in blobs.items():
        assert m["blobs"][name]["size"] == len(data)
    assert m["tensors"]["codebooks"] == {
        "blob": "codebooks.safetensors",
        "dtype": "float32",
        "shape": [2, 4, 3],
    }


def test_round_trip_with_no_items_and_no_weights() -> None:
    snap = Snapshot("m", 0, None, 0.0, {"replay": 0}, {}, torch.zeros(1, 2, 2), torch.zeros(1, 1, dtype=torch.int64))
    assert decode(*encode(snap)).same_as(snap)


def test_tied_weights_are_stored_as_copies() -> None:
    snap = make_snapshot()
    snap.weights["tied"] = snap.weights["item_embedding"]
    assert decode(*encode(snap)).same_as(snap)


def test_blobs_are_plain_safetensors_and_the_manifest_is_json() -> None:
    manifest, blobs = encode(make_snapshot())
    json.loads(manifest)
    for data in blobs.values():  # safetensors: u64 header length, JSON header, raw little-endian tensor bytes
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        end = max(info["data_offsets"][1] for k, info in header.items() if k != "__metadata__")
        assert 8 + n + end == len(data)


@pytest.mark.parametrize("mask", [0x01, 0x80, 0xFF, 0x5A])
def test_every_single_byte_flip_of_every_blob_is_caught_by_the_checksum(mask: int) -> None:
    manifest, blobs = encode(make_snapshot())
    tried = 0
    for name, data in blobs.items():
        for position in range(len(data)):
            with pytest.raises(CorruptSnapshotError, match="fails its checksum") as info:
                decode(manifest, {**blobs, name: flip(data, position, mask)})
            assert info.value.blob == name and info.value.version == 1
            tried += 1
    assert tried == sum(len(b) for b in blobs.values())


def test_checksum_is_checked_before_parsing() -> None:
    manifest, blobs = encode(make_snapshot())
    other = encode(make_snapshot(seed=1))[1]["weights.safetensors"]  # valid safetensors, same size
    assert len(other) == len(blobs["weights.safetensors"])
    with pytest.raises(CorruptSnapshotError, match="'weights.safetensors' fails its checksum"):
        decode(manifest, {**blobs, "weights.safetensors": other})
    header_bomb = (2**62).to_bytes(8, "little") + blobs["weights.safetensors"][8:]  # would derail a parser
    with pytest.raises(CorruptSnapshotError, match="fails its checksum"):
        decode(manifest, {**blobs, "weights.safetensors": header_bomb})


def test_every_manifest_byte_flip_is_caught_or_changes_nothing() -> None:
    snap = make_snapshot()
    manifest, blobs = encode(snap)
    caught = 0
    for position in range(len(manifest)):
        try:
            back = decode(flip(manifest, position, 0x29), blobs)  # ' ' ^ 0x29 = '\t': JSON-equivalent
        except CorruptSnapshotError:
            caught += 1
        else:
            assert manifest[position : position + 1].isspace()
            assert back.same_as(snap)
    assert caught >= sum(not chr(b).isspace() for b in manifest)  # every non-whitespace flip is caught


def test_truncated_missing_and_extra_blobs() -> None:
    manifest, blobs = encode(make_snapshot())
    data = blobs["item_codes.safetensors"]
    with pytest.raises(CorruptSnapshotError, match="'item_codes.safetensors' is truncated"):
        decode(manifest, {**blobs, "item_codes.safetensors": data[:-1]})
    with pytest.raises(CorruptSnapshotError, match="too long"):
        decode(manifest, {**blobs, "item_codes.safetensors": data + b"\0"})
    with pytest.raises(CorruptSnapshotError, match="'codebooks.safetensors' is missing"):
        decode(manifest, {k: v for k, v in blobs.items() if k != "codebooks.safetensors"})
    assert decode(manifest, {**blobs, "extra.safetensors": b"x"}).version == 1


@pytest.mark.parametrize("bad", [b"", b"{", b"\xff\xfe", b"[]", b"null"])
def test_manifest_that_is_not_a_json_object(bad: bytes) -> None:
    with pytest.raises(CorruptSnapshotError, match="manifest.json"):
        parse_manifest(bad, model="sparc", version=3)


def test_manifest_of_another_version_or_format() -> None:
    manifest, blobs = encode(make_snapshot(version=4))
    with pytest.raises(CorruptSnapshotError, match="describes sparc v4"):
        decode(manifest, blobs, model="sparc", version=3)
    body = json.loads(manifest)
    body["format_version"] = 3
    with pytest.raises(UnsupportedFormatError, match="format_version 3"):
        parse_manifest(json.dumps(body).encode())


def test_item_ids_round_trip_exactly_in_one_blob_of_format_2() -> None:
    """The vocabulary (external id per row) travels as one blob; ints of any int64 size and strings come back
    exactly as they went (7 and "07" stay apart); a snapshot without one is format 1, row i = item i."""
    ids = (2**62, "sku-\u00e9", "07", 7, "x" * 200)
    snap = Snapshot(**{**make_snapshot().__dict__, "item_ids": ids})
    manifest, blobs = encode(snap)
    assert sorted(blobs) == sorted((*BLOBS, "item_ids.safetensors"))
    assert json.loads(manifest)["format_version"] == 2
    back = decode(manifest, blobs)
    assert back.item_ids == ids and back.same_as(snap) and "item_ids" not in back.weights
    identity = Snapshot(**{**make_snapshot().__dict__, "item_ids": [1, 2, 3, 4, 5]})
    assert identity.item_ids is None and sorted(encode(identity)[1]) == sorted(BLOBS)
    store = open_store("memory://")
    store.put(snap)
    assert store.get(1).item_ids == ids
    for bad, match in (((1, 2), "names 2 items"), ((1, 2, 3, 4, 4), "twice"), ((1, 2, 3, 4, True), "int64"),
                       ((1, 2, 3, 4, ""), "int64"), ((1, 2, 3, 4, 2**63), "int64")):
        with pytest.raises(InvalidSnapshotError, match=match):
            Snapshot(**{**make_snapshot().__dict__, "item_ids": bad})


def _resealed(body: dict) -> bytes:
    """A manifest edited and given a matching manifest_sha256 (what a buggy writer would produce)."""
    from codebook_store.format import _canonical

    body = {k: v for k, v in body.items() if k != "manifest_sha256"}
    return json.dumps({**body, "manifest_sha256": hashlib.sha256(_canonical(body)).hexdigest()}).encode()


def test_a_format_and_a_vocabulary_that_disagree_are_corrupt() -> None:
    """Format 2 means "has a vocabulary": a format-2 manifest without item_ids would read rows as ids."""
    manifest, blobs = encode(Snapshot(**{**make_snapshot().__dict__, "item_ids": ("a", "b", "c", "d", "e")}))
    body = json.loads(manifest)
    del body["tensors"]["item_ids"], body["blobs"]["item_ids.safetensors"]
    with pytest.raises(CorruptSnapshotError, match="format_version 2 without item_ids"):
        decode(_resealed(body), blobs)
    manifest, blobs = encode(make_snapshot())
    body = json.loads(manifest)
    assert decode(_resealed(body), blobs).same_as(make_snapshot())  # the resealing itself is sound
    body["tensors"]["item_ids"] = {"blob": "weights.safetensors", "dtype": "uint8", "shape": [2]}
    with pytest.raises(CorruptSnapshotError, match="format_version 1 with item_ids"):
        decode(_resealed(body), blobs)


def test_manifest_edited_consistently_but_without_its_checksum_is_caught() -> None:
    manifest, blobs = encode(make_snapshot())
    body = json.loads(manifest)
    body["blobs"]["weights.safetensors"]["size"] += 1
    with pytest.raises(CorruptSnapshotError, match="manifest_sha256"):
        decode(json.dumps(body).encode(), blobs)


# --- drift and remap (hand-computed) ---
def two_versions() -> tuple[Snapshot, Snapshot]:
    parent_codes = torch.tensor([[0, 0], [0, 1], [1, 1], [2, 0], [3, 3]])
    child_codes = torch.tensor([[0, 0], [0, 1], [1, 2], [0, 0], [2, 3], [1, 1]])  # item 5 is new
    parent_books = torch.zeros(2, 4, 3)
    child_books = torch.zeros(2, 4, 3)
    child_books[0, 0] = torch.tensor([3.0, 4.0, 0.0])  # level 1: one codeword moves 5 -> mean 5/4
    child_books[1] += torch.tensor([1.0, 0.0, 0.0])  # level 2: every codeword moves 1
    base = make_snapshot().__dict__
    parent = Snapshot(**{**base, "version": 1, "codebooks": parent_books, "item_codes": parent_codes})
    child = Snapshot(
        **{
            **base,
            "version": 2,
            "parent": 1,
            "codebooks": child_books,
            "item_codes": child_codes,
            "weights": {},
        }
    )
    return parent, child


EXPECTED_DRIFT = {
    "common_items": 4,
    "changed_items": 3,  # items 2, 3, 4
    "changed_share": 0.75,
    "level_changed_share": [0.5, 0.25],  # level 1: items 3, 4; level 2: item 2
    "codeword_movement": [1.25, 1.0],
    "new_items": 1,
    "removed_items": 0,
    "reused_rows": 0,
}


def test_drift_on_a_hand_computed_case() -> None:
    parent, child = two_versions()
    assert drift(parent, child) == {"parent_version": 1, **EXPECTED_DRIFT}
    assert drift(child, child)["changed_share"] == 0.0
    back = drift(child, parent)
    assert (back["new_items"], back["removed_items"], back["changed_items"]) == (0, 1, 3)


def test_drift_follows_items_not_rows() -> None:
    """Row 2 is handed from item "b" to item "x" (an eviction): "b" left, "x" arrived, and the drift of the items
    present in both (a, c, d) is their own codes' (c: level 1 2 -> 0; d: level 1 3 -> 2)."""
    parent, child = two_versions()
    parent = Snapshot(**{**parent.__dict__, "item_ids": ("a", "b", "c", "d")})
    child = Snapshot(**{**child.__dict__, "item_ids": ("a", "x", "c", "d", "e")})
    d = drift(parent, child)
    assert (d["common_items"], d["changed_items"], d["new_items"], d["removed_items"], d["reused_rows"]) == (
        3, 2, 2, 1, 1)
    assert d["level_changed_share"] == [2 / 3, 0.0]
    moved = Snapshot(**{**child.__dict__, "item_ids": ("c", "x", "a", "d", "e")})  # items a and c swap rows
    assert drift(parent, moved)["changed_items"] == 3  # a: [0, 1] -> [0, 0]; c: [2, 0] -> [0, 1]; d


def test_drift_refuses_different_codebook_shapes() -> None:
    parent, child = two_versions()
    other = Snapshot(**{**child.__dict__, "codebooks": torch.zeros(2, 5, 3)})
    with pytest.raises(IncompatibleSnapshotError, match="codebook shapes differ"):
        drift(parent, other)


def assert_hand_made_remap(remap) -> None:
    assert remap.changed_items.tolist() == [2, 3, 4]
    assert remap.old_codes.tolist() == [[1, 1], [2, 0], [3, 3]]
    assert remap.new_codes.tolist() == [[1, 2], [0, 0], [2, 3]]
    assert remap.added_items.tolist() == [5]
    assert remap.added_codes.tolist() == [[1, 1]]
    assert remap.removed_items.tolist() == []


def test_code_remap_on_a_hand_made_case() -> None:
    parent, child = two_versions()
    assert_hand_made_remap(code_remap(parent.item_codes, child.item_codes))
    assert code_remap(child.item_codes, parent.item_codes).removed_items.tolist() == [5]


# --- compatibility ---
def test_check_compatible_accepts_a_matching_model() -> None:
    snap = make_snapshot()
    config = {**snap.config, "encoder": {"heads": 1}}
    check_compatible(snap, config, {"item_embedding": (6, 3), "step": (), "codebooks": (2, 4, 3)})


def test_check_compatible_lists_every_difference() -> None:
    snap = make_snapshot()
    config = {"levels": 3, "codes": 4, "dim": 3, "extra": True}  # levels differs, encoder missing, extra new
    shapes = {"item_embedding": (6, 4), "codebooks": (3, 4, 3), "new_head": (2,)}  # step unexpected
    with pytest.raises(IncompatibleSnapshotError) as info:
        check_compatible(snap, config, shapes)
    diffs = info.value.differences
    assert [d.split(":")[0] for d in diffs] == [
        "config['encoder']",
        "config['extra']",
        "config['levels']",
        "tensor 'codebooks'",
        "tensor 'item_embedding'",
        "tensor 'new_head'",
        "tensor 'step'",
    ]
    assert "snapshot has 2, model has 3" in str(info.value)
    assert "snapshot has (6, 3), model expects (6, 4)" in str(info.value)
    assert "missing in snapshot" in str(info.value) and "does not expect it" in str(info.value)


# --- every backend ---
def test_round_trip_on_every_backend(store: SnapshotStore) -> None:
    snap = make_snapshot()
    assert store.latest() is None and store.list() == [] and store.versions() == []
    assert store.put(snap) is True
    assert store.get(1).same_as(snap)
    assert store.latest().same_as(snap)
    [info] = store.list()
    assert (info.version, info.parent, info.is_latest, info.num_items) == (1, None, True, 5)
    assert info.created_at == snap.created_at and info.health == snap.health
    assert info.size_bytes == sum(info.blob_sizes.values()) + len(encode(snap)[0])
    manifest, blobs = store.read_raw(1)
    assert (manifest, blobs) == encode(snap)


def test_versions_never_repeat(store: SnapshotStore) -> None:
    first = make_snapshot(1)
    store.put(first)
    with pytest.raises(VersionExistsError):
        store.put(make_snapshot(1, seed=9))
    assert store.get(1).same_as(first)
    with pytest.raises(VersionExistsError):
        store.put_raw(*encode(make_snapshot(1, seed=9)))


def test_put_moves_latest_only_forward(store: SnapshotStore) -> None:
    assert store.put(make_snapshot(3)) is True
    assert store.put(make_snapshot(2)) is False  # older than latest: stored, not served
    assert store.latest_version() == 3
    assert store.put(make_snapshot(4, 3), move_latest=False) is False  # e.g. rejected by the quality gate
    assert store.latest_version() == 3 and store.versions() == [2, 3, 4]
    assert store.put(make_snapshot(5, 3)) is True
    assert [i.is_latest for i in store.list()] == [False, False, False, True]


def test_rollback(store: SnapshotStore) -> None:
    for v in (1, 2, 3):
        store.put(make_snapshot(v, v - 1 or None))
    store.set_latest(1)
    assert store.latest().same_as(make_snapshot(1))
    store.set_latest(3)  # roll forward again
    assert store.latest_version() == 3
    with pytest.raises(SnapshotNotFoundError):
        store.set_latest(7)
    store.set_latest(1)
    assert store.put(make_snapshot(4, 1)) is True  # not a freeze: a newer version moves latest


def test_rollback_refuses_a_corrupt_version(store: SnapshotStore) -> None:
    store.put(make_snapshot(1))
    store.put(make_snapshot(2, 1))
    set_blob(store, "sparc", 1, "weights.safetensors", b"garbage")
    with pytest.raises(CorruptSnapshotError, match="weights.safetensors"):
        store.set_latest(1)
    assert store.latest_version() == 2


def test_prune_keeps_latest_pinned_and_last(store: SnapshotStore) -> None:
    for v in range(1, 7):
        store.put(make_snapshot(v))
    store.set_latest(2)
    assert store.prune(keep_last=2, keep=[3]) == [1, 4]
    assert store.versions() == [2, 3, 5, 6]
    assert store.prune(keep_last=0) == [3, 5, 6]
    assert store.versions() == [2] and store.latest().same_as(make_snapshot(2))
    with pytest.raises(SnapshotNotFoundError):
        store.get(6)
    with pytest.raises(ValueError, match="keep_last"):
        store.prune(keep_last=-1)


def test_several_models_in_one_store(store: SnapshotStore) -> None:
    store.put(make_snapshot(1, model="sparc"))
    store.put(make_snapshot(7, model="sparc-small", seed=2))
    assert store.models() == ["sparc", "sparc-small"]
    assert store.versions(model="sparc") == [1] and store.versions(model="sparc-small") == [7]
    assert store.latest(model="sparc-small").same_as(make_snapshot(7, model="sparc-small", seed=2))
    with pytest.raises(SnapshotNotFoundError):
        store.get(7)
    for bad in (
        lambda: store.versions(model="../escape"),
        lambda: store.prune(keep_last=1, model="../escape"),
        lambda: store.set_latest(1, model="a/b"),
    ):
        with pytest.raises(InvalidSnapshotError):
            bad()


def test_diff_on_a_hand_made_case(store: SnapshotStore) -> None:
    parent, child = two_versions()
    store.put(parent)
    store.put(child)
    diff = store.diff(1, 2)
    assert_hand_made_remap(diff.remap)
    assert diff.drift == EXPECTED_DRIFT
    summary = diff.as_dict(with_items=True)
    assert summary["changed"][0] == {"item": 2, "old": [1, 1], "new": [1, 2]}
    assert summary["added"] == [{"item": 5, "new": [1, 1]}] and summary["removed"] == []
    json.dumps(summary)
    named = [Snapshot(**{**s.__dict__, "version": s.version + 2, "parent": None, "item_ids": ids})
             for s, ids in ((parent, ("a", "b", "c", "d")), (child, ("a", "x", "c", "d", "e")))]
    for snapshot in named:
        store.put(snapshot)
    assert {"parent_version": 3, **store.diff(3, 4).drift} == drift(*named)  # by item: vocabularies read too


def test_missing_blob_and_damaged_manifest(store: SnapshotStore) -> None:
    store.put(make_snapshot(1))
    manifest, _ = store.read_raw(1)
    set_blob(store, "sparc", 1, "codebooks.safetensors", None)
    with pytest.raises(CorruptSnapshotError, match="'codebooks.safetensors' is missing"):
        store.get(1)
    set_manifest(store, "sparc", 1, manifest[:-10])
    with pytest.raises(CorruptSnapshotError, match="sparc v1: manifest.json is not valid JSON"):
        store.latest()
    [info] = store.list()  # listed, with what is wrong with it
    assert info.version == 1 and info.is_latest and "manifest.json is not valid JSON" in info.problem
    assert info.num_items is None and info.as_dict()["problem"] == info.problem


READ_PATHS: dict[str, Callable[[SnapshotStore], object]] = {
    "get": lambda s: s.get(1),
    "latest": lambda s: s.latest(),
    "set_latest": lambda s: s.set_latest(1),
    "read_raw": lambda s: s.read_raw(1),
    "diff": lambda s: s.diff(1, 1),  # reads codebooks and item codes only
}


def test_every_single_byte_flip_is_caught_on_every_read_path(store: SnapshotStore) -> None:
    store.put(make_snapshot(1))
    _, blobs = store.read_raw(1)
    masks = torch.randint(1, 256, (sum(len(b) for b in blobs.values()),), generator=torch.Generator().manual_seed(0))
    tried = caught = flips = 0
    for name, data in blobs.items():
        paths = [p for p in READ_PATHS if p != "diff" or name != "weights.safetensors"]
        for position in range(len(data)):
            set_blob(store, "sparc", 1, name, flip(data, position, int(masks[flips])))
            flips += 1
            for path in paths:
                tried += 1
                with pytest.raises(CorruptSnapshotError, match=f"sparc v1: blob '{name}' fails its checksum"):
                    READ_PATHS[path](store)
                caught += 1
        set_blob(store, "sparc", 1, name, data)
    assert flips == len(masks) and caught == tried > 2000
    assert store.get(1).same_as(make_snapshot(1))


def test_file_store_ignores_and_prunes_crash_debris(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path}")
    store.put(make_snapshot(1))
    model_dir = tmp_path / "sparc"
    staging = model_dir / ".staging-2-123-abcd"
    staging.mkdir()
    (staging / "codebooks.safetensors").write_bytes(b"partial")
    (model_dir / "3").mkdir()  # a version directory without its manifest: never complete
    (model_dir / ".latest-123-abcd").write_bytes(b"2\n")
    assert store.versions() == [1] and [i.version for i in store.list()] == [1]
    assert store.prune(keep_last=5) == []
    assert sorted(p.name for p in model_dir.iterdir()) == [".lock", "1", "3", "latest"]
    assert (model_dir / "latest").read_text() == "1\n"
    (model_dir / "latest").write_text("garbage")
    with pytest.raises(CorruptSnapshotError, match="latest"):
        store.latest()


def test_rocksdb_store_ignores_and_prunes_orphan_blobs(tmp_path: Path) -> None:
    with open_store(f"rocksdb://{tmp_path}/db") as store:
        store.put(make_snapshot(1))
        _, blobs = encode(make_snapshot(2))
        for name, data in blobs.items():  # a writer killed after ingesting blobs, before the manifest batch
            set_blob(store, "sparc", 2, name, data)
        stale = _blob_prefix("sparc", 1, b"ffffffffffffffff") + b"weights.safetensors/00000000"
        store._db.put(stale, b"an older, killed attempt at v1")
        (tmp_path / "db" / "sparc-staging").mkdir(exist_ok=True)
        (tmp_path / "db" / "sparc-staging" / "sparc-3-1-ab.sst").write_bytes(b"half an SST file")
        assert store.versions() == [1] and store.latest_version() == 1
        assert store.prune(keep_last=5) == []
        assert store._scan(b"b/sparc/00000000000000000002/") == [] and store._db.get(stale) is None
        assert not (tmp_path / "db" / "sparc-staging").exists()
        assert store.get(1).same_as(make_snapshot(1))


def test_read_only_stores(tmp_path: Path) -> None:
    for url in (f"file://{tmp_path}/f", f"rocksdb://{tmp_path}/r"):
        with pytest.raises(StoreUnavailableError):
            open_store(url, read_only=True)  # nothing there yet
        with open_store(url) as writer:
            writer.put(make_snapshot(1))
        with open_store(url, read_only=True) as reader:
            assert reader.latest().same_as(make_snapshot(1))
            for write in (lambda: reader.put(make_snapshot(2)), lambda: reader.set_latest(1)):
                with pytest.raises(ReadOnlyStoreError):
                    write()
            with pytest.raises(ReadOnlyStoreError):
                reader.prune(keep_last=1)


def test_rocksdb_read_only_view_follows_a_live_writer(tmp_path: Path) -> None:
    url = f"rocksdb://{tmp_path}/db"
    with open_store(url) as writer:
        writer.put(make_snapshot(1))
        with pytest.raises(StoreUnavailableError, match="lock"):
            open_store(url)  # RocksDB allows one read-write process
        with open_store(url, read_only=True) as reader:
            assert reader.latest_version() == 1
            writer.put(make_snapshot(2, 1))
            writer.prune(keep_last=1)
            assert reader.versions() == [2]
            assert reader.latest().same_as(make_snapshot(2, 1))


def test_rocksdb_prune_gives_space_back(tmp_path: Path) -> None:
    def disk() -> int:
        return sum(p.stat().st_size for p in (tmp_path / "db").iterdir() if p.suffix in {".sst", ".log", ".blob"})

    with open_store(f"rocksdb://{tmp_path}/db") as store:
        for v in range(1, 5):
            store.put(make_snapshot(v, items=20_000, dim=16))
        store._db.flush()
        before = disk()
        store.prune(keep_last=1)
        store._db.flush()
        assert disk() < 0.6 * before


@pytest.mark.parametrize("url", ["ftp://x", "no-scheme", "file://", "rocksdb://"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(StoreUnavailableError):
        open_store(url)


def test_errors_share_one_root() -> None:
    for error in (CorruptSnapshotError, IncompatibleSnapshotError, VersionExistsError, SnapshotNotFoundError):
        assert issubclass(error, CodebookStoreError)
