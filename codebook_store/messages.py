"""The codebook-updates message: one snapshot version as Kafka records that a subscriber verifies before use.

    records = encode(snapshot, parent, max_bytes=DEFAULT_MAX_BYTES)   # [(key, value, headers), ...]
    r = Reassembler()
    for key, value, headers in records_in_any_order:
        update = r.accept(key, value, headers)          # CodebookUpdate once complete and verified, else None

An update carries the snapshot's manifest and codebooks, the remap from a base version the subscriber already
holds (items whose full code changed: ids, old codes, new codes; items added; items removed), and optionally
the whole item -> code table (always when there is no base) and the serving weights. Everything but the remap
is the snapshot's own stored bytes (format.encode), so each part is checked against the manifest's sha256s.

Records (schema "sparc.codebook-update/2"); key = the model name (UTF-8), so one model's records stay in order
on one partition. Kafka headers, every value ASCII:
    schema         "sparc.codebook-update/2"
    model          the model name
    version        the snapshot version, decimal
    chunk, chunks  this record's index in [0, chunks) and the record count, decimal
    update-sha256  sha256 (hex) over the chunk values in index order, each preceded by its length (8 bytes,
                   big-endian): identifies the update as cut (the same content cut otherwise is another id)
    chunk-sha256   sha256 (hex) of this record's value
Chunk 0's value is the header chunk, UTF-8 JSON:
    {"schema", "model", "version", "parent": lineage parent or null,
     "remap_from": the base version of the remap, or null (no remap: the item codes are sent whole),
     "parts": [{"name", "size", "sha256"}, ...]}
Chunks 1..chunks-1 hold the parts' bytes, concatenated in the listed order and cut at the size limit:
    manifest    the stored manifest.json bytes (format.manifest_bytes)
    codebooks   the stored codebooks.safetensors
    remap       safetensors of int64 tensors changed_items (K,), old_codes (K, L), new_codes (K, L),
                added_items (A,), added_codes (A, L), removed_items (R,)   [iff remap_from is not null]
    item_codes  the stored item_codes.safetensors                          [iff asked, or no remap]
    weights     the stored weights.safetensors                             [only when asked]
Each record (key + value + header names and values) fits in `max_bytes` (DEFAULT_MAX_BYTES leaves room under
the broker's default message.max.bytes of 1 MiB for Kafka's own framing).

Verification, in order: headers parse; the chunk's sha256; once every chunk is there, the update sha256; the
header chunk; each part's size and sha256; the manifest's own checksum and that it names the same model and
version; codebooks, item_codes and weights against the manifest's blob sha256s; the remap's shapes. Any
failure raises CorruptUpdateError and nothing of that update is returned. Pickle is never involved.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Any

import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors  # bytes -> tensors; never pickle

from codebook_store.drift import CodeRemap, code_remap
from codebook_store.errors import CorruptSnapshotError, IncompatibleSnapshotError
from codebook_store.format import (
    CODEBOOKS_BLOB,
    ITEM_CODES_BLOB,
    WEIGHTS_BLOB,
    Manifest,
    load_blob,
    parse_manifest,
)
from codebook_store.format import encode as encode_snapshot
from codebook_store.snapshot import MODEL_NAME_RE, Snapshot

SCHEMA = "sparc.codebook-update/2"
DEFAULT_MAX_BYTES = 900_000  # per record; the broker's default message.max.bytes is 1_048_588
MAX_CHUNKS = 100_000  # a header claiming more is malformed (bounds what a bad record can make us hold)

Record = tuple[bytes, bytes, list[tuple[str, bytes]]]  # (key, value, headers) as a Kafka producer sends them

_HEADER_NAMES = ("schema", "model", "version", "chunk", "chunks", "update-sha256", "chunk-sha256")
_PART_BLOBS = {"codebooks": CODEBOOKS_BLOB, "item_codes": ITEM_CODES_BLOB, "weights": WEIGHTS_BLOB}
_PART_ORDER = ("manifest", "codebooks", "remap", "item_codes", "weights")
_REMAP_FIELDS = ("changed_items", "old_codes", "new_codes", "added_items", "added_codes", "removed_items")
# A record's bytes besides key and value: header names, fixed-width values, and room for the decimals.
_FIXED_HEADER_BYTES = sum(map(len, _HEADER_NAMES)) + len(SCHEMA) + 2 * 64 + 3 * 20


class CorruptUpdateError(CorruptSnapshotError):
    """A codebook-updates record or assembled update fails verification; nothing of it may be applied.

    kind: "message" (headers or header chunk malformed), "checksum" (a chunk, the update or a part fails its
    sha256), "size" (a part's size differs), or a format.py kind ("manifest", "content", ...) for the parts
    checked against the manifest. `chunk` is the record's chunk index when one record is at fault.
    """

    def __init__(self, message: str, *, kind: str, model: str | None = None, version: int | None = None,
                 blob: str | None = None, chunk: int | None = None) -> None:
        super().__init__(message, kind=kind, model=model, version=version, blob=blob)
        self.chunk = chunk


@dataclass(frozen=True, eq=False)
class CodebookUpdate:
    """One verified snapshot version as a subscriber receives it (snapshot-like; weights are optional).

    manifest      : the publisher's parsed manifest (config, health, watermark, tensor shapes, blob sha256s)
    codebooks     : float32 (L, C, D)
    remap_from    : the version `remap` is relative to, or None
    remap         : items whose code changed since `remap_from`, items added and removed; None without a base
    item_codes    : int64 (N+1, L), when sent whole or rebuilt with `with_base`; None until then
    weights       : the serving weights when sent, else None (not sent; not "empty")
    blobs         : the verified stored bytes received or rebuilt, by blob name (codebooks, item_codes, weights)
    manifest_raw  : the manifest's bytes, exactly as stored by the publisher
    sha256        : the update sha256 (same bytes -> same id; a re-sent update has the same one)
    """

    manifest: Manifest
    codebooks: torch.Tensor
    remap_from: int | None
    remap: CodeRemap | None
    item_codes: torch.Tensor | None
    weights: dict[str, torch.Tensor] | None
    blobs: dict[str, bytes]
    manifest_raw: bytes
    sha256: str

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
    def complete(self) -> bool:
        """True when every blob of the publisher's snapshot is here (item codes and weights included): the
        update can be stored byte for byte as the publisher stored it (`SnapshotStore.put_raw`)."""
        return set(self.manifest.blobs) <= set(self.blobs)

    def with_base(self, base_codes: torch.Tensor) -> CodebookUpdate:
        """This update with `item_codes` rebuilt by applying `remap` to the base version's codes (N_base+1, L),
        and checked against the manifest's item_codes sha256. Raises IncompatibleSnapshotError when the base is
        not the table the publisher diffed against (the update itself stays valid)."""
        if self.remap is None:
            raise ValueError(f"{self.model} v{self.version} carries no remap to apply")
        codes = apply_remap(base_codes, self.remap)
        data = safetensors.torch.save({"item_codes": codes})
        try:
            load_blob(self.manifest, ITEM_CODES_BLOB, data)
        except CorruptSnapshotError as exc:
            raise IncompatibleSnapshotError(
                f"{self.model} v{self.version}: item codes rebuilt from v{self.remap_from} do not match the "
                f"manifest ({exc}); the base held is not the publisher's",
                [f"item_codes rebuilt from v{self.remap_from}: {exc.kind}"],
            ) from exc
        return replace(self, item_codes=codes, blobs={**self.blobs, ITEM_CODES_BLOB: data})

    def to_snapshot(self) -> Snapshot:
        """The Snapshot this update describes. Needs item_codes; weights not sent become an empty dict."""
        if self.item_codes is None:
            raise ValueError(f"{self.model} v{self.version}: item codes unknown (remap without a base)")
        m = self.manifest
        return Snapshot(model=m.model, version=m.version, parent=m.parent, created_at=m.created_at,
                        watermark=m.watermark, config=m.config, codebooks=self.codebooks,
                        item_codes=self.item_codes, weights=dict(self.weights or {}), health=m.health)


def encode(
    snapshot: Snapshot,
    parent: Snapshot | None,
    max_bytes: int = DEFAULT_MAX_BYTES,
    *,
    full_codes: bool | None = None,
    with_weights: bool = False,
) -> list[Record]:
    """The records announcing `snapshot`, chunk 0 (the header chunk) first.

    parent       : the base of the remap, a version subscribers already hold (the publisher passes the last
                   version it announced), or None: no remap, the item codes go whole
    max_bytes    : the limit on each record (key + value + headers); raises ValueError if the header chunk
                   alone does not fit
    full_codes   : send the whole item -> code table as well (None: only when there is no parent); a
                   periodic full table lets subscribers that missed a version catch up
    with_weights : send the serving weights too, so a subscriber can store the exact snapshot
    """
    if parent is not None and (parent.model != snapshot.model or parent.version >= snapshot.version):
        raise ValueError(f"the remap's base must be an earlier version of {snapshot.model!r} than "
                         f"v{snapshot.version}, got {parent.model!r} v{parent.version}")
    manifest, blobs = encode_snapshot(snapshot)
    parts: dict[str, bytes] = {"manifest": manifest, "codebooks": blobs[CODEBOOKS_BLOB]}
    if parent is not None:
        parts["remap"] = _remap_bytes(code_remap(parent.item_codes, snapshot.item_codes))
    if full_codes or parent is None:
        parts["item_codes"] = blobs[ITEM_CODES_BLOB]
    if with_weights:
        parts["weights"] = blobs[WEIGHTS_BLOB]
    header = {
        "schema": SCHEMA,
        "model": snapshot.model,
        "version": snapshot.version,
        "parent": snapshot.parent,
        "remap_from": None if parent is None else parent.version,
        "parts": [{"name": n, "size": len(b), "sha256": _sha(b)} for n, b in parts.items()],
    }
    head = json.dumps(header, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()
    key = snapshot.model.encode()
    room = max_bytes - len(key) - len(snapshot.model) - _FIXED_HEADER_BYTES
    if len(head) > room:
        raise ValueError(f"max_bytes={max_bytes} leaves {room} bytes per chunk; the header chunk needs {len(head)}")
    data = b"".join(parts.values())
    values = [head, *(data[i : i + room] for i in range(0, len(data), room))]
    total = _update_sha(values)

    def headers(index: int, value: bytes) -> list[tuple[str, bytes]]:
        fields = (SCHEMA, snapshot.model, snapshot.version, index, len(values), total, _sha(value))
        return [(name, str(v).encode()) for name, v in zip(_HEADER_NAMES, fields, strict=True)]

    return [(key, value, headers(i, value)) for i, value in enumerate(values)]


def apply_remap(base_codes: torch.Tensor, remap: CodeRemap) -> torch.Tensor:
    """The new item -> code table (N+1, L) from the base table (N_base+1, L) and the remap taken against it.
    Raises IncompatibleSnapshotError when the remap was not taken against this base (levels, sizes, or the
    old codes of changed items differ)."""
    levels = remap.old_codes.shape[1]
    removed, added = int(remap.removed_items.numel()), int(remap.added_items.numel())
    common = base_codes.shape[0] - removed  # rows 0..common-1 are in both tables
    changed = remap.changed_items
    problems = []
    if base_codes.dim() != 2 or base_codes.shape[1] != levels:
        problems.append(f"base has shape {tuple(base_codes.shape)}, the remap has {levels} levels")
    elif common < 1 or not torch.equal(remap.removed_items, torch.arange(common, base_codes.shape[0])):
        problems.append(f"removed items do not match the base's {base_codes.shape[0] - 1} items")
    elif not torch.equal(remap.added_items, torch.arange(common, common + added)):
        problems.append(f"added items do not follow the base's {common - 1} items")
    elif changed.numel() and (int(changed.min()) < 1 or int(changed.max()) >= common):
        problems.append("changed items lie outside the base")
    elif not torch.equal(base_codes[changed], remap.old_codes):
        problems.append("old codes of changed items differ from the base")
    if problems:
        raise IncompatibleSnapshotError("the remap does not apply to this base: " + "; ".join(problems), problems)
    new = base_codes[:common].clone()
    new[changed] = remap.new_codes
    return torch.cat([new, remap.added_codes]).contiguous()


class Reassembler:
    """Collects records into updates: chunks may come in any order, repeated, and interleaved with other
    updates' chunks. `accept` returns each update once, when its last missing chunk arrives and every check
    has passed; a bad chunk raises CorruptUpdateError and leaves its update incomplete (a later clean copy
    of the same chunk can still complete it).

    max_pending : incomplete updates held at once; beyond it the oldest is dropped (`dropped` counts them)
    remember    : completed update ids kept, so chunks of an update already returned are ignored (`repeated`
                  counts them: a re-sent update)
    """

    def __init__(self, *, max_pending: int = 8, remember: int = 1024) -> None:
        self.max_pending, self.remember = max_pending, remember
        self._pending: OrderedDict[tuple[str, int, str], dict[int, bytes]] = OrderedDict()
        self._counts: dict[tuple[str, int, str], int] = {}
        self._done: OrderedDict[tuple[str, int, str], None] = OrderedDict()
        self.dropped = self.repeated = 0

    @property
    def pending(self) -> list[tuple[str, int]]:
        """(model, version) of the incomplete updates held, oldest first."""
        return [(model, version) for model, version, _ in self._pending]

    def accept(self, key: bytes | None, value: bytes | None, headers: Any) -> CodebookUpdate | None:
        """Take one record; headers as kafka-python gives them (a list of (str, bytes)). Returns the update it
        completes, or None."""
        h = _parse_headers(key, value, headers)
        ident = (h["model"], h["version"], h["update-sha256"])
        if ident in self._done:
            self.repeated += 1
            return None
        if _sha(value) != h["chunk-sha256"]:
            raise CorruptUpdateError(
                f"{h['model']} v{h['version']}: chunk {h['chunk']}/{h['chunks']} fails its sha256",
                kind="checksum", model=h["model"], version=h["version"], chunk=h["chunk"],
            )
        chunks = self._pending.setdefault(ident, {})
        known = self._counts.setdefault(ident, h["chunks"])
        if known != h["chunks"]:
            raise CorruptUpdateError(
                f"{h['model']} v{h['version']}: chunk {h['chunk']} says {h['chunks']} chunks, earlier ones {known}",
                kind="message", model=h["model"], version=h["version"], chunk=h["chunk"],
            )
        chunks.setdefault(h["chunk"], value)
        if len(chunks) < known:
            self._evict()
            return None
        del self._pending[ident], self._counts[ident]
        self._done[ident] = None
        while len(self._done) > self.remember:
            self._done.popitem(last=False)
        return _assemble(h["model"], h["version"], h["update-sha256"], [chunks[i] for i in range(known)])

    def _evict(self) -> None:
        while len(self._pending) > self.max_pending:
            ident, _ = self._pending.popitem(last=False)
            del self._counts[ident]
            self.dropped += 1


# --------------------------------------------------------------------------------------------- helpers
def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _update_sha(values: list[bytes]) -> str:
    return hashlib.sha256(b"".join(len(v).to_bytes(8, "big") + v for v in values)).hexdigest()


def _remap_bytes(remap: CodeRemap) -> bytes:
    return safetensors.torch.save({name: getattr(remap, name).contiguous() for name in _REMAP_FIELDS})


def _parse_headers(key: bytes | None, value: bytes | None, headers: Any) -> dict[str, Any]:
    def bad(reason: str) -> CorruptUpdateError:
        return CorruptUpdateError(f"not a {SCHEMA} record: {reason}", kind="message")

    try:
        raw = {name: v.decode("ascii") for name, v in (headers or ()) if name in _HEADER_NAMES}
    except (AttributeError, UnicodeDecodeError, TypeError, ValueError) as exc:
        raise bad(f"unreadable headers ({exc})") from None
    missing = [n for n in _HEADER_NAMES if n not in raw]
    if missing:
        raise bad(f"headers {', '.join(missing)} missing")
    if raw["schema"] != SCHEMA:
        raise bad(f"schema {raw['schema']!r}")
    out: dict[str, Any] = dict(raw)
    for name in ("version", "chunk", "chunks"):
        if not raw[name].isdigit():
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
    return out


def _is_hex64(text: str) -> bool:
    return len(text) == 64 and all(c in "0123456789abcdef" for c in text)


def _assemble(model: str, version: int, update_sha: str, values: list[bytes]) -> CodebookUpdate:
    def bad(kind: str, reason: str, blob: str | None = None) -> CorruptUpdateError:
        return CorruptUpdateError(f"{model} v{version}: {reason}", kind=kind, model=model, version=version,
                                  blob=blob)

    if _update_sha(values) != update_sha:
        raise bad("checksum", "the chunks together fail the update sha256")
    try:
        header = json.loads(values[0].decode("utf-8"))
        names = [p["name"] for p in header["parts"]]
        sizes = [p["size"] for p in header["parts"]]
        shas = [p["sha256"] for p in header["parts"]]
        fields = (header["schema"], header["model"], header["version"])
        remap_from, parent = header["remap_from"], header["parent"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise bad("message", f"the header chunk is malformed ({exc!r})") from None
    if fields != (SCHEMA, model, version):
        raise bad("message", f"the header chunk describes {fields}")
    order = [n for n in _PART_ORDER if n in names]
    if names != order or not {"manifest", "codebooks"} <= set(names) or len(set(names)) != len(names):
        raise bad("message", f"parts {names} are not an ordered subset of {_PART_ORDER} with manifest, codebooks")
    if ("remap" in names) != (remap_from is not None) or ("remap" not in names and "item_codes" not in names):
        raise bad("message", "a remap needs remap_from, and without one the item codes must be sent")
    if not all(type(s) is int and s >= 0 for s in sizes) or not all(isinstance(s, str) for s in shas):
        raise bad("message", "bad part sizes or sha256s")
    if remap_from is not None and (type(remap_from) is not int or not 0 <= remap_from < version):
        raise bad("message", f"remap_from {remap_from!r} is not an earlier version")
    data = b"".join(values[1:])
    if sum(sizes) != len(data):
        raise bad("size", f"parts add up to {sum(sizes)} bytes, the chunks hold {len(data)}")
    parts, offset = {}, 0
    for name, size, sha in zip(names, sizes, shas, strict=True):
        parts[name], offset = data[offset : offset + size], offset + size
        if _sha(parts[name]) != sha:
            raise bad("checksum", f"part {name!r} fails its sha256", blob=name)

    try:  # every blob against the manifest's own sha256s (format.py's checks), then contents
        manifest = parse_manifest(parts["manifest"], model=model, version=version)
        if manifest.parent != parent:
            raise bad("manifest", f"the header says parent {parent}, the manifest {manifest.parent}")
        tensors = {name: load_blob(manifest, _PART_BLOBS[name], parts[name])
                   for name in ("codebooks", "item_codes", "weights") if name in parts}
        remap = _load_remap(parts["remap"], manifest) if "remap" in parts else None
    except CorruptUpdateError:
        raise
    except CorruptSnapshotError as exc:
        raise CorruptUpdateError(str(exc), kind=exc.kind, model=model, version=version, blob=exc.blob) from exc
    item_codes = tensors["item_codes"]["item_codes"] if "item_codes" in tensors else None
    if remap is not None and item_codes is not None:  # both sent: they must agree
        new_rows = item_codes[torch.cat([remap.changed_items, remap.added_items])]
        if not torch.equal(new_rows, torch.cat([remap.new_codes, remap.added_codes])):
            raise bad("content", "the remap's new codes differ from the item codes sent with it")
    return CodebookUpdate(
        manifest=manifest,
        codebooks=tensors["codebooks"]["codebooks"],
        remap_from=remap_from,
        remap=remap,
        item_codes=item_codes,
        weights=tensors.get("weights"),
        blobs={_PART_BLOBS[n]: parts[n] for n in ("codebooks", "item_codes", "weights") if n in parts},
        manifest_raw=parts["manifest"],
        sha256=update_sha,
    )


def _load_remap(data: bytes, manifest: Manifest) -> CodeRemap:
    def bad(reason: str) -> CorruptUpdateError:
        return CorruptUpdateError(f"{manifest.model} v{manifest.version}: the remap {reason}", kind="content",
                                  model=manifest.model, version=manifest.version, blob="remap")

    try:
        tensors = load_safetensors(data)
    except Exception as exc:  # any parser failure on bytes that passed their sha256: a bad writer
        raise bad(f"is not valid safetensors: {exc}") from None
    if set(tensors) != set(_REMAP_FIELDS) or any(t.dtype != torch.int64 for t in tensors.values()):
        raise bad(f"holds {sorted(tensors)}, expected int64 {list(_REMAP_FIELDS)}")
    rows, levels = manifest.tensors["item_codes"].shape
    k, a = tensors["changed_items"].shape, tensors["added_items"].shape
    shapes_ok = (
        tensors["changed_items"].dim() == 1 and tensors["old_codes"].shape == (*k, levels)
        and tensors["new_codes"].shape == (*k, levels) and tensors["added_items"].dim() == 1
        and tensors["added_codes"].shape == (*a, levels) and tensors["removed_items"].dim() == 1
    )
    if not shapes_ok:
        raise bad("tensors have inconsistent shapes")
    if a[0] and int(tensors["added_items"].max()) >= rows:
        raise bad(f"adds items beyond the manifest's {rows - 1}")
    return CodeRemap(**{name: tensors[name] for name in _REMAP_FIELDS})

