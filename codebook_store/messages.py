"""The codebook-updates message: one snapshot version as Kafka records that a subscriber verifies before use.

    records = encode(snapshot, parent, max_bytes=DEFAULT_MAX_BYTES, signer=None)   # [(key, value, headers), ...]
    r = Reassembler(verifier=None)
    for key, value, headers in records_in_any_order:
        update = r.accept(key, value, headers)          # CodebookUpdate once complete and verified, else None

The contract (records, headers, chunking, checksums, signature, parts, remap semantics, retention and
compatibility rules) is docs/codebook-updates.md; this module is its reference implementation. In short:

- Records: key = the model name; headers schema, model, version, chunk, chunks, update-sha256, chunk-sha256,
  and on chunk 0 optionally signature. Chunk 0 is the header chunk (JSON): model, version, parent, remap_from,
  the sha256 of every other chunk, and the parts (name, size, sha256). The update sha256 is the sha256 of the
  header chunk, so the header chunk verifies against the update's id and every other chunk against the header
  chunk, one at a time: a bad copy of a chunk is refused alone and a clean copy still completes the update.
- Parts, concatenated in the listed order and cut into chunks: manifest.json (format.py's stored manifest),
  codebooks.safetensors, and item_codes.safetensors and/or remap.safetensors, optionally weights.safetensors:
  every part named like a blob of the manifest is that blob, verified against the manifest's sha256 (so a blob a
  later minor adds travels without this reader knowing it).
- The remap is a diff of the whole item -> code table against the version `remap_from`, padding row included.
- 3.1: a snapshot with a vocabulary (format 2) sends it, either whole (the blob item_ids.safetensors: with the
  whole item codes, and whenever that is smaller) or as item_ids_delta.safetensors, the rows whose external id
  differs from the base `remap_from`'s (rows added included). A subscriber rebuilds the vocabulary from its base
  as it rebuilds the item codes, each checked against the manifest's sha256 (`CodebookUpdate.with_base`), and
  then reads the remap by ids (`CodebookUpdate.item_remap`): which items changed code, arrived, or left.

Verification, in order: headers parse and the schema's major is 3; the chunk's sha256; the header chunk against
the update sha256, its fields, and (with a verifier) the signature; every other chunk against the header chunk's
list; once complete, each part's size and sha256; the manifest's own checksum, model, version and parent; the
blobs against the manifest's sha256s, dtypes and shapes; code ranges; every float tensor finite; the remap's
shapes and agreement with the item codes when both are sent; the vocabulary (sent whole: one distinct valid id
per item; as a delta: ascending rows in 1..N, one valid id each). A failure raises CorruptUpdateError naming the
reason; nothing of that update is returned. Pickle is never involved, and neither is torch: tensors are numpy.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.numpy

from codebook_store.checks import MODEL_NAME_RE, check_code_range, check_codebooks, check_item_ids, check_tables
from codebook_store.drift import (
    CodeRemap,
    IdRemap,
    IdsDelta,
    ItemId,
    apply_ids_delta,
    apply_remap,
    code_remap,
    id_remap,
    ids_delta,
    vocabulary,
)
from codebook_store.errors import CorruptSnapshotError, IncompatibleSnapshotError, InvalidSnapshotError
from codebook_store.format import (
    CODEBOOKS_BLOB,
    ITEM_CODES_BLOB,
    ITEM_IDS_BLOB,
    MANIFEST_NAME,
    WEIGHTS_BLOB,
    Manifest,
    item_ids_blob,
    item_ids_json,
    load_arrays,
    parse_manifest,
    read_item_ids,
)
from codebook_store.format import encode as encode_snapshot
from codebook_store.signing import Signer, Verifier, signed_text

if TYPE_CHECKING:
    from codebook_store.snapshot import Snapshot

SCHEMA_MAJOR, SCHEMA_MINOR = 3, 1
SCHEMA = f"sparc.codebook-update/{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
REMAP_PART = "remap.safetensors"
IDS_DELTA_PART = "item_ids_delta.safetensors"  # 3.1: the vocabulary's rows that differ from the remap's base
DEFAULT_MAX_BYTES = 900_000  # per record; the broker's default message.max.bytes is 1_048_588
MAX_CHUNKS = 100_000  # a header claiming more is malformed
DEFAULT_MAX_PENDING_BYTES = 256 * 1024 * 1024  # chunk bytes held for incomplete updates, all of them together

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # (key, value, headers) as a Kafka producer sends them

_HEADER_NAMES = ("schema", "model", "version", "chunk", "chunks", "update-sha256", "chunk-sha256")
_SIGNATURE_HEADER = "signature"
_SCHEMA_RE = re.compile(r"^sparc\.codebook-update/(\d{1,6})(?:\.(\d{1,6}))?$")
_PART_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_REMAP_FIELDS = ("changed_items", "old_codes", "new_codes", "added_items", "added_codes", "removed_items")
_DELTA_FIELDS = ("rows", "ids")  # int64 (K,), uint8 (B,): the new ids of those rows as format.item_ids_json
# A record's bytes besides key and value: header names, fixed-width values, a signature, room for the decimals.
_FIXED_HEADER_BYTES = sum(map(len, _HEADER_NAMES)) + len(SCHEMA) + 2 * 64 + 3 * 20 + len(_SIGNATURE_HEADER) + 128
_ENTRY_BYTES = 64  # what one held chunk costs besides its value, for the pending-bytes bound


class CorruptUpdateError(CorruptSnapshotError):
    """A codebook-updates record or assembled update fails verification; nothing of it may be applied.

    kind: "message" (headers or header chunk malformed), "schema" (a schema major this reader does not read),
    "checksum" (a chunk, the header chunk or a part fails its sha256), "size" (a part's size differs),
    "signature" (unsigned, unknown key or bad signature, with a verifier), "content" (tensors out of range or
    not finite), "bound" (the update does not fit the reassembler's memory bound), or a format.py kind
    ("manifest", ...) for the parts checked against the manifest. `chunk` is the record's chunk index when one
    record is at fault.
    """

    def __init__(self, message: str, *, kind: str, model: str | None = None, version: int | None = None,
                 blob: str | None = None, chunk: int | None = None) -> None:
        super().__init__(message, kind=kind, model=model, version=version, blob=blob)
        self.chunk = chunk


@dataclass(frozen=True, eq=False)
class CodebookUpdate:
    """One verified snapshot version as a subscriber receives it (snapshot-like; numpy arrays; weights optional).

    manifest      : the publisher's parsed manifest (config, health, watermark, tensor shapes, blob sha256s)
    codebooks     : float32 (L, C, D)
    remap_from    : the version `remap` is relative to, or None
    remap         : ROWS whose code changed since `remap_from`, rows added and removed; None without a base
    item_codes    : int64 (N+1, L), when sent whole or rebuilt with `with_base`; None until then
    item_ids      : the external id of rows 1..N (ints and strings), when sent whole or rebuilt with `with_base`
                    ((1, ..., N) for a snapshot without a vocabulary: row i is item i); None until then
    ids_delta     : the vocabulary as sent against `remap_from` (rows whose id changed), else None
    item_remap    : the remap by external ids (drift.IdRemap: ids whose code changed, ids added, ids removed or
                    evicted, rows handed to another item), once `with_base` knew the base's table and vocabulary
    weights       : the serving weights when sent, else None (not sent; not "empty")
    blobs         : the verified stored bytes received or rebuilt, by blob name (codebooks, item_codes, ...)
    manifest_raw  : the manifest's bytes, exactly as stored by the publisher
    sha256        : the update sha256 (the header chunk's; a re-sent update has the same one)
    signed_by     : the id of the key whose signature was verified, None without a verifier
    header        : the header chunk's JSON (fields a later minor adds are here)
    """

    manifest: Manifest
    codebooks: np.ndarray
    remap_from: int | None
    remap: CodeRemap | None
    item_codes: np.ndarray | None
    weights: dict[str, np.ndarray] | None
    blobs: dict[str, bytes]
    manifest_raw: bytes
    sha256: str
    signed_by: str | None = None
    header: dict[str, Any] = field(default_factory=dict)
    item_ids: tuple[ItemId, ...] | None = None
    ids_delta: IdsDelta | None = None
    item_remap: IdRemap | None = None

    @property
    def model(self) -> str:
        return self.manifest.model

    @property
    def version(self) -> int:
        return self.manifest.version

    @property
    def parent(self) -> int | None:
        return self.manifest.parent

    @property
    def created_at(self) -> float:
        return self.manifest.created_at

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.config

    @property
    def health(self) -> dict[str, Any]:
        return self.manifest.health

    @property
    def watermark(self) -> dict[str, Any]:
        return self.manifest.watermark

    @property
    def num_items(self) -> int:
        """N, from the manifest's item_codes shape (known even while item_codes is None)."""
        return self.manifest.tensors["item_codes"].shape[0] - 1

    @property
    def vocabulary_sent(self) -> str | None:
        """How the update carried its vocabulary: "whole", "delta", or None (not sent; or no vocabulary)."""
        return "whole" if ITEM_IDS_BLOB in self.parts_sent else "delta" if self.ids_delta is not None else None

    @property
    def parts_sent(self) -> list[str]:
        """The names of the parts the update carried (the header chunk's list, in order)."""
        return [part["name"] for part in self.header.get("parts", ())]

    def ids_of(self, rows: Any) -> list[ItemId]:
        """The external ids of item rows (each in 1..N; row 0 is padding, no item). Raises ValueError when the
        vocabulary is unknown (a remap whose base was not held) or a row is out of range."""
        if self.item_ids is None:
            raise ValueError(f"{self.model} v{self.version}: the vocabulary is unknown (no base held)")
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if rows.size and (int(rows.min()) < 1 or int(rows.max()) > self.num_items):
            raise ValueError(f"item rows lie in 1..{self.num_items}")
        return [self.item_ids[row - 1] for row in rows.tolist()]

    def row_of(self, item: ItemId) -> int | None:
        """The row of an external id (as the publisher names it: 7, not "7"), or None when it is not an item of
        this version. Raises ValueError when the vocabulary is unknown."""
        if self.item_ids is None:
            raise ValueError(f"{self.model} v{self.version}: the vocabulary is unknown (no base held)")
        return self._rows.get(item)

    @cached_property
    def _rows(self) -> dict[ItemId, int]:
        return {item: row for row, item in enumerate(self.item_ids or (), start=1)}

    @property
    def complete(self) -> bool:
        """True when every blob of the publisher's snapshot is here (item codes and weights included): the
        update can be stored byte for byte as the publisher stored it (`SnapshotStore.put_raw`)."""
        return set(self.manifest.blobs) <= set(self.blobs)

    def with_base(self, base_codes: Any, base_ids: Any = None) -> CodebookUpdate:
        """This update resolved against the base version `remap_from`, whose item codes (N_base+1, L) and
        vocabulary (the ids of rows 1..N_base; None: row i is item i) the caller holds: item_codes rebuilt by
        applying `remap` and item_ids by applying `ids_delta` (each unless sent whole), each checked against the
        manifest's sha256, and `item_remap` read by ids. Raises IncompatibleSnapshotError when the base is not the
        one the publisher diffed against (the update itself stays valid)."""
        if self.remap is None:
            raise ValueError(f"{self.model} v{self.version} carries no remap to apply")
        base_codes = np.asarray(base_codes)
        base_items = base_codes.shape[0] - 1 if base_codes.ndim == 2 else 0
        codes = apply_remap(base_codes, self.remap)
        blobs = dict(self.blobs)
        if self.item_codes is None:
            blobs[ITEM_CODES_BLOB] = self._rebuilt(ITEM_CODES_BLOB, safetensors.numpy.save({"item_codes": codes}))
        elif not np.array_equal(codes, self.item_codes):
            raise IncompatibleSnapshotError(
                f"{self.model} v{self.version}: the remap from v{self.remap_from} applied to the base held differs "
                "from the item codes sent; the base held is not the publisher's", ["item_codes: base differs"])
        ids = self.item_ids
        if ids is None and self.ids_delta is not None:
            ids = apply_ids_delta(base_ids, base_items, self.ids_delta, self.num_items)
            blobs[ITEM_IDS_BLOB] = self._rebuilt(ITEM_IDS_BLOB, item_ids_blob(ids))
        item_remap = None if ids is None else id_remap(base_codes, base_ids, codes, ids)
        return replace(self, item_codes=codes, item_ids=ids, item_remap=item_remap, blobs=blobs)

    def _rebuilt(self, blob: str, data: bytes) -> bytes:
        """`data`, a blob rebuilt from the base, once it matches the manifest's sha256."""
        try:
            load_arrays(self.manifest, blob, data)
        except CorruptSnapshotError as exc:
            raise IncompatibleSnapshotError(
                f"{self.model} v{self.version}: {blob} rebuilt from v{self.remap_from} does not match the "
                f"manifest ({exc}); the base held is not the publisher's",
                [f"{blob} rebuilt from v{self.remap_from}: {exc.kind}"],
            ) from exc
        return data

    def to_snapshot(self) -> Snapshot:
        """The (torch) Snapshot this update describes. Needs item_codes; weights not sent become an empty dict."""
        import torch

        from codebook_store.snapshot import Snapshot

        if self.item_codes is None or self.item_ids is None:
            raise ValueError(f"{self.model} v{self.version}: item codes or ids unknown (remap without a base)")
        m = self.manifest
        weights = {name: torch.from_numpy(a.copy()) for name, a in (self.weights or {}).items()}
        return Snapshot(model=m.model, version=m.version, parent=m.parent, created_at=m.created_at,
                        watermark=m.watermark, config=m.config, codebooks=torch.from_numpy(self.codebooks.copy()),
                        item_codes=torch.from_numpy(self.item_codes.copy()), weights=weights, health=m.health,
                        item_ids=self.item_ids)


def encode(
    snapshot: Snapshot,
    parent: Snapshot | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    full_codes: bool | None = None,
    with_weights: bool = False,
    signer: Signer | None = None,
) -> list[Record]:
    """The records announcing `snapshot`, chunk 0 (the header chunk) first.

    parent       : the base of the remap, a version subscribers already hold (the publisher passes the last
                   version it announced), or None: no remap, the item codes go whole
    max_bytes    : the limit on each record (key + value + headers); raises ValueError if the header chunk
                   alone does not fit
    full_codes   : send the whole item -> code table as well (None: only when there is no parent); a
                   periodic full table lets subscribers that missed a version catch up
    with_weights : send the serving weights too, so a subscriber can store the exact snapshot
    signer       : sign the update (chunk 0's `signature` header); None: unsigned
    The vocabulary (a snapshot with item_ids) goes whole with the whole table, else as a delta against
    `parent`'s, or whole when that is fewer bytes (a vocabulary mostly replaced).
    """
    if parent is not None and (parent.model != snapshot.model or parent.version >= snapshot.version):
        raise ValueError(f"the remap's base must be an earlier version of {snapshot.model!r} than "
                         f"v{snapshot.version}, got {parent.model!r} v{parent.version}")
    manifest, blobs = encode_snapshot(snapshot)
    parts: dict[str, bytes] = {MANIFEST_NAME: manifest, CODEBOOKS_BLOB: blobs[CODEBOOKS_BLOB]}
    if parent is not None:
        parts[REMAP_PART] = _remap_bytes(code_remap(parent.item_codes, snapshot.item_codes))
    if full_codes or parent is None:
        parts[ITEM_CODES_BLOB] = blobs[ITEM_CODES_BLOB]
    if ITEM_IDS_BLOB in blobs:
        parts.update(_vocabulary_part(snapshot, blobs[ITEM_IDS_BLOB], None if full_codes else parent))
    if with_weights:
        parts[WEIGHTS_BLOB] = blobs[WEIGHTS_BLOB]
    return frame(snapshot.model, snapshot.version, parts, parent=snapshot.parent,
                 remap_from=None if parent is None else parent.version, max_bytes=max_bytes, signer=signer)


def frame(
    model: str,
    version: int,
    parts: dict[str, bytes],
    *,
    parent: int | None,
    remap_from: int | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    signer: Signer | None = None,
    schema: str = SCHEMA,
    fields: dict[str, Any] | None = None,
) -> list[Record]:
    """The records carrying `parts` (name -> bytes, in this order) as one update: the header chunk, then the
    parts' bytes cut into chunks under `max_bytes`. `encode` frames a snapshot's parts; a later minor frames
    the parts it adds the same way. `fields`: header-chunk fields beyond 3.0's (a later minor's)."""
    key = model.encode()
    room = max_bytes - len(key) - len(model) - len(schema) + len(SCHEMA) - _FIXED_HEADER_BYTES
    data = b"".join(parts.values())
    values = [data[i : i + room] for i in range(0, len(data), room)] if room > 0 else []
    header = {
        **(fields or {}),
        "schema": schema,
        "model": model,
        "version": version,
        "parent": parent,
        "remap_from": remap_from,
        "chunks": [_sha(v) for v in values],
        "parts": [{"name": n, "size": len(b), "sha256": _sha(b)} for n, b in parts.items()],
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    if len(head) > room:
        raise ValueError(f"max_bytes={max_bytes} leaves {room} bytes per chunk; the header chunk needs {len(head)}")
    values.insert(0, head)
    update_sha = _sha(head)
    signature = None if signer is None else signer.sign(signed_text(SCHEMA_MAJOR, model, version, update_sha))

    def headers(index: int, value: bytes) -> list[tuple[str, bytes]]:
        row = (schema, model, version, index, len(values), update_sha, _sha(value))
        out = [(name, str(v).encode()) for name, v in zip(_HEADER_NAMES, row, strict=True)]
        return out + [(_SIGNATURE_HEADER, signature)] if index == 0 and signature is not None else out

    return [(key, value, headers(i, value)) for i, value in enumerate(values)]


@dataclass
class _Pending:
    """One incomplete update: its header chunk once seen (it says how many chunks there are and their sha256s),
    the chunks matching it, and before it is seen, up to `max_copies` different copies of each other chunk."""

    count: int | None = None
    header: dict[str, Any] | None = None
    signed_by: str | None = None
    chunks: dict[int, bytes] = field(default_factory=dict)
    copies: dict[int, dict[str, bytes]] = field(default_factory=dict)  # index -> {sha256: value}
    held: int = 0  # bytes held (values plus a per-entry cost)

    def complete(self) -> bool:
        return self.count is not None and len(self.chunks) == self.count - 1


class Reassembler:
    """Collects records into verified updates: chunks may come in any order, repeated, interleaved with other
    updates' chunks, and mixed with bad copies. A bad copy of a chunk raises CorruptUpdateError and is not held,
    so a clean copy still completes the update; each update is returned once.

    verifier          : refuse every update not signed by one of its keys (None: signatures are not checked)
    max_pending       : incomplete updates held at once; beyond it the oldest is dropped (`dropped` counts)
    max_pending_bytes : chunk bytes held for incomplete updates, all together; beyond it the oldest are dropped,
                        and an update that alone exceeds it is refused (kind "bound")
    max_copies        : different copies of one chunk held before the header chunk says which is right
    remember          : ids of updates returned or refused for good, so their chunks are ignored when re-sent
                        (`repeated` counts them)
    """

    def __init__(self, *, verifier: Verifier | None = None, max_pending: int = 8,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES, max_copies: int = 4,
                 remember: int = 1024) -> None:
        self.verifier, self.max_pending, self.max_pending_bytes = verifier, max_pending, max_pending_bytes
        self.max_copies, self.remember = max_copies, remember
        self._pending: OrderedDict[tuple[str, int, str], _Pending] = OrderedDict()
        self._finished: OrderedDict[tuple[str, int, str], None] = OrderedDict()
        self.dropped = self.repeated = 0

    @property
    def pending(self) -> list[tuple[str, int]]:
        """(model, version) of the incomplete updates held, oldest first."""
        return [(model, version) for model, version, _ in self._pending]

    @property
    def held_bytes(self) -> int:
        """Bytes held for incomplete updates (the quantity `max_pending_bytes` bounds)."""
        return sum(p.held for p in self._pending.values())

    def accept(self, key: bytes | None, value: bytes | None, headers: Any) -> CodebookUpdate | None:
        """Take one record; headers as kafka-python gives them (a list of (str, bytes)). Returns the update it
        completes, or None."""
        h = _parse_headers(key, value, headers)
        model, version, index = h["model"], h["version"], h["chunk"]

        def bad(kind: str, reason: str) -> CorruptUpdateError:
            return CorruptUpdateError(f"{model} v{version}: chunk {index}/{h['chunks']} {reason}", kind=kind,
                                      model=model, version=version, chunk=index)

        ident = (model, version, h["update-sha256"])
        if ident in self._finished:
            self.repeated += 1
            return None
        if _sha(value) != h["chunk-sha256"]:
            raise bad("checksum", "fails its sha256")
        p = self._pending.get(ident) or _Pending()
        if p.count is not None and p.count != h["chunks"]:
            raise bad("message", f"says {h['chunks']} chunks, its header chunk {p.count} (a bad copy; not held)")
        if index == 0:
            if p.header is not None:
                return None  # the header chunk again
            if h["chunk-sha256"] != h["update-sha256"]:
                raise bad("checksum", "(the header chunk) does not hash to the update sha256")
            try:
                header = _parse_header_chunk(value, h)
            except CorruptUpdateError:
                self._finish(ident)  # these bytes ARE the update (its id is their sha256): refused for good
                raise
            p.signed_by = self._authenticate(h, bad)
            p.header, p.count = header, h["chunks"]
            p.chunks = {i: copies[header["chunks"][i - 1]] for i, copies in p.copies.items()
                        if i < p.count and header["chunks"][i - 1] in copies}
            p.copies = {}
            p.held = sum(len(v) + _ENTRY_BYTES for v in (value, *p.chunks.values()))
        elif p.header is not None:
            if h["chunk-sha256"] != p.header["chunks"][index - 1]:
                raise bad("checksum", "differs from the header chunk's list (a bad copy; it is not held)")
            if index in p.chunks:
                return None
            p.chunks[index] = value
            p.held += len(value) + _ENTRY_BYTES
        else:
            copies = p.copies.setdefault(index, {})
            if h["chunk-sha256"] in copies:
                return None
            if len(copies) >= self.max_copies:
                raise bad("bound", f"has {len(copies)} different copies already and no header chunk yet")
            copies[h["chunk-sha256"]] = value
            p.held += len(value) + _ENTRY_BYTES
        if p.complete():
            self._pending.pop(ident, None)
            self._finish(ident)
            return _assemble(h, p)
        if p.held > self.max_pending_bytes:
            self._pending.pop(ident, None)
            self.dropped += 1
            if p.header is not None:  # its genuine chunks alone are too many: refused for good
                self._finish(ident)  # (before the header chunk, bad copies may be what overflowed: not final)
            raise bad("bound", f"makes the update hold {p.held} bytes, over max_pending_bytes="
                               f"{self.max_pending_bytes}: the update is dropped")
        self._pending[ident] = p
        self._evict(ident)
        return None

    def _authenticate(self, h: dict[str, Any], bad: Any) -> str | None:
        if self.verifier is None:
            return None
        text = signed_text(SCHEMA_MAJOR, h["model"], h["version"], h["update-sha256"])
        problem = self.verifier.problem(text, h.get(_SIGNATURE_HEADER))
        if problem is not None:  # the signature is not part of the update's bytes: a signed copy may follow
            raise bad("signature", f"is refused: {problem}")
        return self.verifier.signed_by(h[_SIGNATURE_HEADER])

    def _finish(self, ident: tuple[str, int, str]) -> None:
        self._finished[ident] = None
        while len(self._finished) > self.remember:
            self._finished.popitem(last=False)

    def _evict(self, keep: tuple[str, int, str]) -> None:
        """Drop the oldest incomplete updates but `keep` until both bounds hold."""
        total = self.held_bytes
        for ident in [i for i in self._pending if i != keep]:
            if len(self._pending) <= self.max_pending and total <= self.max_pending_bytes:
                break
            total -= self._pending.pop(ident).held
            self.dropped += 1


# --------------------------------------------------------------------------------------------- helpers
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _vocabulary_part(snapshot: Snapshot, whole: bytes, base: Snapshot | None) -> dict[str, bytes]:
    """The vocabulary's part: the delta against `base` when there is one and it is fewer bytes, else whole."""
    if base is not None:
        delta = ids_delta(base.item_ids, base.num_items, snapshot.item_ids, snapshot.num_items)
        data = safetensors.numpy.save({"rows": delta.rows, "ids": np.frombuffer(item_ids_json(delta.ids), np.uint8)})
        if len(data) < len(whole):
            return {IDS_DELTA_PART: data}
    return {ITEM_IDS_BLOB: whole}


def _remap_bytes(remap: CodeRemap) -> bytes:
    return safetensors.numpy.save({name: np.ascontiguousarray(getattr(remap, name)) for name in _REMAP_FIELDS})


def _parse_headers(key: bytes | None, value: bytes | None, headers: Any) -> dict[str, Any]:
    def bad(reason: str, kind: str = "message") -> CorruptUpdateError:
        return CorruptUpdateError(f"not a {SCHEMA} record: {reason}", kind=kind)

    try:
        pairs = [(name, v) for name, v in (headers or ()) if name in (*_HEADER_NAMES, _SIGNATURE_HEADER)]
        raw = {name: v.decode("ascii") for name, v in pairs}
    except (AttributeError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise bad(f"unreadable headers ({exc})") from None
    if len(raw) != len(pairs):
        raise bad("a header is repeated")
    if "schema" in raw:
        match = _SCHEMA_RE.match(raw["schema"])
        if match is None:
            raise bad(f"schema {raw['schema']!r}")
        if int(match.group(1)) != SCHEMA_MAJOR:
            how = ("a newer major: upgrade this subscriber" if int(match.group(1)) > SCHEMA_MAJOR
                   else "an older major: upgrade the publisher")
            raise bad(f"schema {raw['schema']!r} is {how} (this reader reads {SCHEMA_MAJOR}.x)", kind="schema")
    missing = [n for n in _HEADER_NAMES if n not in raw]
    if missing:
        raise bad(f"headers {', '.join(missing)} missing")
    out: dict[str, Any] = dict(raw)
    for name in ("version", "chunk", "chunks"):
        if not (raw[name].isdigit() and raw[name].isascii() and len(raw[name]) <= 19):
            raise bad(f"header {name}={raw[name]!r} is not a non-negative integer")
        out[name] = int(raw[name])
    if not MODEL_NAME_RE.match(raw["model"]) or key != raw["model"].encode():
        raise bad(f"model {raw['model']!r} with key {key!r}")
    if not 0 <= out["chunk"] < out["chunks"] <= MAX_CHUNKS:
        raise bad(f"chunk {out['chunk']} of {out['chunks']}")
    if not all(_is_hex64(raw[n]) for n in ("update-sha256", "chunk-sha256")):
        raise bad("a sha256 header is not 64 hex digits")
    if not isinstance(value, bytes):
        raise bad("no value")
    if _SIGNATURE_HEADER in out:
        out[_SIGNATURE_HEADER] = dict(pairs)[_SIGNATURE_HEADER]  # bytes, as signed
    return out


def _is_hex64(text: Any) -> bool:
    return isinstance(text, str) and len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _parse_header_chunk(value: bytes, h: dict[str, Any]) -> dict[str, Any]:
    """The header chunk's JSON, checked against the record headers; fields a later minor adds are kept."""
    def bad(reason: str) -> CorruptUpdateError:
        return CorruptUpdateError(f"{h['model']} v{h['version']}: the header chunk {reason}", kind="message",
                                  model=h["model"], version=h["version"], chunk=0)

    try:
        header = json.loads(value.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("is not a JSON object")
    for name, kind in (("schema", str), ("model", str), ("version", int), ("chunks", list), ("parts", list)):
        if isinstance(header.get(name), bool) or not isinstance(header.get(name), kind):
            raise bad(f"field {name!r} is missing or not a {kind.__name__}")
    if (header["schema"], header["model"], header["version"]) != (h["schema"], h["model"], h["version"]):
        raise bad(f"describes {header['schema']} {header['model']} v{header['version']}, the record headers "
                  f"{h['schema']} {h['model']} v{h['version']}")
    version = header["version"]
    for name in ("parent", "remap_from"):
        if name not in header:
            raise bad(f"field {name!r} is missing")
        v = header[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < version):
            raise bad(f"{name} {v!r} is not an earlier version")
    if len(header["chunks"]) != h["chunks"] - 1 or not all(_is_hex64(s) for s in header["chunks"]):
        raise bad(f"lists {len(header['chunks'])} chunk sha256s for {h['chunks'] - 1} chunks")
    names = []
    for part in header["parts"]:
        ok = (isinstance(part, dict) and isinstance(part.get("name"), str) and _PART_NAME_RE.match(part["name"])
              and type(part.get("size")) is int and part["size"] >= 0 and _is_hex64(part.get("sha256")))
        if not ok:
            raise bad(f"has a malformed part entry {part!r}"[:200])
        names.append(part["name"])
    if len(set(names)) != len(names) or not {MANIFEST_NAME, CODEBOOKS_BLOB} <= set(names):
        raise bad(f"parts {names} repeat a name or lack {MANIFEST_NAME} or {CODEBOOKS_BLOB}")
    if (REMAP_PART in names) != (header["remap_from"] is not None):
        raise bad(f"has {REMAP_PART} iff remap_from is set")
    if REMAP_PART not in names and ITEM_CODES_BLOB not in names:
        raise bad(f"sends neither {ITEM_CODES_BLOB} nor {REMAP_PART}")
    if IDS_DELTA_PART in names and (REMAP_PART not in names or ITEM_IDS_BLOB in names):
        raise bad(f"sends {IDS_DELTA_PART} without {REMAP_PART} (its base) or beside {ITEM_IDS_BLOB}")
    return header


def _assemble(h: dict[str, Any], p: _Pending) -> CodebookUpdate:
    model, version, header = h["model"], h["version"], p.header
    assert header is not None

    def bad(kind: str, reason: str, blob: str | None = None) -> CorruptUpdateError:
        return CorruptUpdateError(f"{model} v{version}: {reason}", kind=kind, model=model, version=version,
                                  blob=blob)

    data = b"".join(p.chunks[i] for i in range(1, h["chunks"]))
    if sum(part["size"] for part in header["parts"]) != len(data):
        raise bad("size", f"parts add up to {sum(part['size'] for part in header['parts'])} bytes, "
                          f"the chunks hold {len(data)}")
    parts, offset = {}, 0
    for part in header["parts"]:
        name = part["name"]
        parts[name], offset = data[offset : offset + part["size"]], offset + part["size"]
        if _sha(parts[name]) != part["sha256"]:
            raise bad("checksum", f"part {name!r} fails its sha256", blob=name)

    try:  # every blob against the manifest's own sha256s (format.py's checks), then contents
        manifest = parse_manifest(parts[MANIFEST_NAME], model=model, version=version)
        if manifest.parent != header["parent"]:
            raise bad("manifest", f"the header says parent {header['parent']}, the manifest {manifest.parent}")
        blobs = {name: part for name, part in parts.items() if name in manifest.blobs}
        arrays = {name: load_arrays(manifest, name, part) for name, part in blobs.items()}
        remap = _load_remap(parts[REMAP_PART], manifest) if REMAP_PART in parts else None
        item_ids = _vocabulary(manifest, arrays)
        delta = _load_ids_delta(parts[IDS_DELTA_PART], manifest) if IDS_DELTA_PART in parts else None
    except CorruptUpdateError:
        raise
    except CorruptSnapshotError as exc:
        raise CorruptUpdateError(str(exc), kind=exc.kind, model=model, version=version, blob=exc.blob) from exc
    if CODEBOOKS_BLOB not in arrays or (remap is None and ITEM_CODES_BLOB not in arrays):
        raise bad("manifest", f"the manifest does not list {CODEBOOKS_BLOB} or {ITEM_CODES_BLOB} as sent")
    for blob, tensors in arrays.items():
        for name, array in tensors.items():
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise bad("content", f"tensor {name!r} in {blob} holds non-finite values", blob=blob)
    codebooks = arrays[CODEBOOKS_BLOB]["codebooks"]
    item_codes = arrays[ITEM_CODES_BLOB]["item_codes"] if ITEM_CODES_BLOB in arrays else None
    try:
        if item_codes is not None:
            check_tables(codebooks, item_codes)
        levels, size = check_codebooks(codebooks)
        if remap is not None:
            check_code_range(remap.new_codes[remap.changed_items != 0], size)
            check_code_range(remap.added_codes, size)
            if remap.old_codes.shape[1] != levels:
                raise InvalidSnapshotError(f"the remap has {remap.old_codes.shape[1]} levels, codebooks {levels}")
    except InvalidSnapshotError as exc:
        raise bad("content", str(exc)) from None
    if remap is not None and item_codes is not None:  # both sent: they must agree
        rows = np.concatenate([remap.changed_items, remap.added_items])
        if not np.array_equal(item_codes[rows], np.concatenate([remap.new_codes, remap.added_codes])):
            raise bad("content", "the remap's new codes differ from the item codes sent with it")
    weights = arrays.get(WEIGHTS_BLOB)
    return CodebookUpdate(
        manifest=manifest,
        codebooks=codebooks,
        remap_from=header["remap_from"],
        remap=remap,
        item_codes=item_codes,
        weights=weights,
        blobs=blobs,
        manifest_raw=parts[MANIFEST_NAME],
        sha256=h["update-sha256"],
        signed_by=p.signed_by,
        header=header,
        item_ids=item_ids,
        ids_delta=delta,
    )


def _vocabulary(manifest: Manifest, arrays: dict[str, dict[str, np.ndarray]]) -> tuple[ItemId, ...] | None:
    """The ids of rows 1..N: the vocabulary blob's when sent, (1..N) when the snapshot has none, else None."""
    items = manifest.tensors["item_codes"].shape[0] - 1
    if "item_ids" not in manifest.tensors:
        return vocabulary(None, items)
    if ITEM_IDS_BLOB not in arrays:
        return None
    ids = read_item_ids(arrays[ITEM_IDS_BLOB]["item_ids"].tobytes(), manifest)
    try:
        check_item_ids(ids, items)
    except InvalidSnapshotError as exc:
        raise CorruptUpdateError(f"{manifest.model} v{manifest.version}: {ITEM_IDS_BLOB} {exc}", kind="content",
                                 model=manifest.model, version=manifest.version, blob=ITEM_IDS_BLOB) from None
    return ids


def _load_ids_delta(data: bytes, manifest: Manifest) -> IdsDelta:
    def bad(reason: str) -> CorruptUpdateError:
        return CorruptUpdateError(f"{manifest.model} v{manifest.version}: the vocabulary delta {reason}",
                                  kind="content", model=manifest.model, version=manifest.version,
                                  blob=IDS_DELTA_PART)

    if "item_ids" not in manifest.tensors:
        raise bad("is sent for a snapshot without a vocabulary")
    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # any parser failure on bytes that passed their sha256: a bad writer
        raise bad(f"is not valid safetensors: {exc}") from None
    if set(tensors) != set(_DELTA_FIELDS) or tensors["rows"].dtype != np.int64 or tensors["ids"].dtype != np.uint8:
        raise bad(f"holds {sorted(tensors)}, expected rows int64 and ids uint8")
    rows, items = tensors["rows"], manifest.tensors["item_codes"].shape[0] - 1
    if rows.ndim != 1 or tensors["ids"].ndim != 1 or (
            rows.size and (int(rows[0]) < 1 or int(rows[-1]) > items or not (np.diff(rows) > 0).all())):
        raise bad(f"rows are not ascending in 1..{items}")
    try:
        ids = read_item_ids(tensors["ids"].tobytes(), manifest)
        if len(ids) != rows.size:
            raise InvalidSnapshotError(f"names {len(ids)} ids for {rows.size} rows")
        check_item_ids(ids, rows.size)
    except CorruptSnapshotError as exc:
        raise bad(f"ids are not a JSON array: {exc}") from None
    except InvalidSnapshotError as exc:
        raise bad(str(exc)) from None
    return IdsDelta(rows=rows, ids=ids)


def _load_remap(data: bytes, manifest: Manifest) -> CodeRemap:
    def bad(reason: str) -> CorruptUpdateError:
        return CorruptUpdateError(f"{manifest.model} v{manifest.version}: the remap {reason}", kind="content",
                                  model=manifest.model, version=manifest.version, blob=REMAP_PART)

    try:
        tensors = safetensors.numpy.load(data)
    except Exception as exc:  # any parser failure on bytes that passed their sha256: a bad writer
        raise bad(f"is not valid safetensors: {exc}") from None
    if set(tensors) != set(_REMAP_FIELDS) or any(t.dtype != np.int64 for t in tensors.values()):
        raise bad(f"holds {sorted(tensors)}, expected int64 {list(_REMAP_FIELDS)}")
    rows, levels = manifest.tensors["item_codes"].shape
    k, a = tensors["changed_items"].shape, tensors["added_items"].shape
    shapes_ok = (
        tensors["changed_items"].ndim == 1 and tensors["old_codes"].shape == (*k, levels)
        and tensors["new_codes"].shape == (*k, levels) and tensors["added_items"].ndim == 1
        and tensors["added_codes"].shape == (*a, levels) and tensors["removed_items"].ndim == 1
    )
    if not shapes_ok:
        raise bad("tensors have inconsistent shapes")
    if a[0] and int(tensors["added_items"].max()) >= rows:
        raise bad(f"adds items beyond the manifest's {rows - 1}")
    return CodeRemap(**{name: tensors[name] for name in _REMAP_FIELDS})
