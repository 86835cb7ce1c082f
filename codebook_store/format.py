"""The snapshot wire/disk format: one JSON manifest plus safetensors blobs, each blob checksummed.

`encode` / `decode` turn a Snapshot into bytes and back for any backend (and the Kafka message schema).
Reading needs no torch: `parse_manifest`, `verify_blob`, `load_arrays` (numpy) and `check_raw` are what a
torch-free reader (the codebook-updates subscriber) uses; only `encode`, `decode` and `load_blob` (torch
tensors) import torch, when called.

Manifest (UTF-8 JSON object, pretty-printed, keys sorted):
  format_version  : 2 when the snapshot has a vocabulary (item_ids), else 1 (what readers before vocabularies
                    read; they refuse 2, whose rows they would take for ids). This reader reads both.
  model, version, parent, created_at, watermark, config, health : the Snapshot's metadata
  tensors  : {name: {"blob": blob name, "dtype": "float32", "shape": [..]}} for "codebooks", "item_codes"
             and every weight
  blobs    : {blob name: {"sha256": hex digest of the blob's bytes, "size": byte count}}
  manifest_sha256 : sha256 of the canonical JSON (sorted keys, no spaces, ASCII) of every other field

Blobs: "codebooks.safetensors" {"codebooks": (L, C, D) float32}, "item_codes.safetensors"
{"item_codes": (N+1, L) int64}, "weights.safetensors" {weight name: tensor}, and (format 2)
"item_ids.safetensors" {"item_ids": (B,) uint8}: the UTF-8 bytes of a JSON array, the external id (a JSON
integer or string) of rows 1..N. A snapshot without it maps row i to item i.

Reading checks, in order and before any safetensors parsing: the manifest parses as JSON and its own checksum
matches; every blob it lists is present, has the listed size and the listed sha256. Any failure raises
CorruptSnapshotError naming the model, version and blob. No pickle is involved anywhere.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import safetensors.numpy

from codebook_store.checks import MODEL_NAME_RE, check_item_ids, check_lineage, check_tables, dtype_name
from codebook_store.errors import (
    CodebookStoreError,
    CorruptSnapshotError,
    UnsupportedFormatError,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from codebook_store.snapshot import Snapshot

FORMAT_VERSION = 2  # the newest this code writes (1 for a snapshot without item_ids) and reads
READABLE_FORMATS = (1, 2)
MANIFEST_NAME = "manifest.json"
CODEBOOKS_BLOB = "codebooks.safetensors"
ITEM_CODES_BLOB = "item_codes.safetensors"
WEIGHTS_BLOB = "weights.safetensors"
ITEM_IDS_BLOB = "item_ids.safetensors"

BLOB_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\.safetensors$")

_DTYPE_NAMES = frozenset(
    ("float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool")
)


@dataclass(frozen=True)
class BlobInfo:
    """A blob's expected sha256 (hex) and byte size."""

    sha256: str
    size: int


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it should look like once loaded."""

    blob: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Manifest:
    """A parsed, self-verified manifest: the snapshot's metadata and its blob table, without tensors."""

    format_version: int
    model: str
    version: int
    parent: int | None
    created_at: float
    watermark: dict[str, Any]
    config: dict[str, Any]
    health: dict[str, Any]
    tensors: dict[str, TensorInfo]
    blobs: dict[str, BlobInfo]

    @property
    def total_size(self) -> int:
        """Sum of the blob sizes in bytes (the manifest itself excluded)."""
        return sum(b.size for b in self.blobs.values())

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes by name, as Snapshot.tensor_shapes() would give them."""
        return {name: info.shape for name, info in self.tensors.items()}

    def as_dict(self) -> dict[str, Any]:
        """The manifest as a JSON dict (without its own checksum)."""
        return {
            "format_version": self.format_version,
            "model": self.model,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "watermark": self.watermark,
            "config": self.config,
            "health": self.health,
            "tensors": {
                name: {"blob": t.blob, "dtype": t.dtype, "shape": list(t.shape)} for name, t in self.tensors.items()
            },
            "blobs": {name: {"sha256": b.sha256, "size": b.size} for name, b in self.blobs.items()},
        }


def encode(snapshot: Snapshot) -> tuple[bytes, dict[str, bytes]]:
    """Serialise a snapshot: (manifest bytes, {blob name: safetensors bytes})."""
    import safetensors.torch

    groups = {
        CODEBOOKS_BLOB: {"codebooks": snapshot.codebooks},
        ITEM_CODES_BLOB: {"item_codes": snapshot.item_codes},
        WEIGHTS_BLOB: dict(snapshot.weights),
    }
    if snapshot.item_ids is not None:
        groups[ITEM_IDS_BLOB] = {"item_ids": item_ids_tensor(snapshot.item_ids)}
    blobs: dict[str, bytes] = {}
    tensors: dict[str, TensorInfo] = {}
    for blob_name, group in groups.items():
        prepared = _prepare(group)
        blobs[blob_name] = safetensors.torch.save(prepared)
        for name, t in prepared.items():
            tensors[name] = TensorInfo(blob_name, dtype_name(t.dtype), tuple(t.shape))
    manifest = Manifest(
        format_version=1 if snapshot.item_ids is None else 2,
        model=snapshot.model,
        version=snapshot.version,
        parent=snapshot.parent,
        created_at=snapshot.created_at,
        watermark=snapshot.watermark,
        config=snapshot.config,
        health=snapshot.health,
        tensors=tensors,
        blobs={name: BlobInfo(hashlib.sha256(data).hexdigest(), len(data)) for name, data in blobs.items()},
    )
    return manifest_bytes(manifest), blobs


def manifest_bytes(manifest: Manifest) -> bytes:
    """The manifest's bytes: pretty JSON with `manifest_sha256` over its canonical form."""
    body = manifest.as_dict()
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    return (json.dumps(body, indent=2, sort_keys=True, ensure_ascii=True, allow_nan=False) + "\n").encode()


def decode(
    manifest: bytes,
    blobs: Mapping[str, bytes | None],
    *,
    model: str | None = None,
    version: int | None = None,
) -> Snapshot:
    """Verify and deserialise a snapshot. `model`/`version`, when given, are what the caller expects (the key
    it read the bytes under); a manifest that says otherwise is corrupt. A blob given as None or left out is
    missing (CorruptSnapshotError); blobs the manifest does not list are ignored.
    """
    from codebook_store.snapshot import Snapshot

    parsed = parse_manifest(manifest, model=model, version=version)
    tensors: dict[str, torch.Tensor] = {}
    for blob_name in parsed.blobs:
        tensors.update(load_blob(parsed, blob_name, blobs.get(blob_name)))
    item_ids = None
    if parsed.format_version >= 2 and "item_ids" in tensors:
        item_ids = read_item_ids(tensors.pop("item_ids").numpy().tobytes(), parsed)
    try:
        return Snapshot(
            model=parsed.model,
            version=parsed.version,
            parent=parsed.parent,
            created_at=parsed.created_at,
            watermark=parsed.watermark,
            config=parsed.config,
            codebooks=tensors.pop("codebooks"),
            item_codes=tensors.pop("item_codes"),
            weights=tensors,
            health=parsed.health,
            item_ids=item_ids,
        )
    except CodebookStoreError as exc:  # checksums matched, content is still unusable: a bad writer
        raise _corrupt("content", parsed.model, parsed.version, None, f"fails validation: {exc}") from exc


def item_ids_json(item_ids: Sequence[int | str]) -> bytes:
    """A vocabulary's bytes: the ids as a JSON array, UTF-8, no spaces, non-ASCII characters as themselves
    (Python's `json.dumps(ids, ensure_ascii=False, separators=(",", ":"))`; ints and strings round-trip exactly)."""
    return json.dumps(list(item_ids), ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def item_ids_tensor(item_ids: tuple[int | str, ...]) -> torch.Tensor:
    """The "item_ids" tensor: `item_ids_json`'s bytes as uint8."""
    import torch

    return torch.frombuffer(bytearray(item_ids_json(item_ids)), dtype=torch.uint8)


def item_ids_blob(item_ids: Sequence[int | str]) -> bytes:
    """The "item_ids.safetensors" blob of a vocabulary without torch: the bytes `encode` stores for it."""
    import numpy as np

    return safetensors.numpy.save({"item_ids": np.frombuffer(item_ids_json(item_ids), dtype=np.uint8)})


def read_item_ids(data: bytes, manifest: Manifest) -> tuple[int | str, ...]:
    """The ids of the "item_ids" tensor's (verified) bytes; CorruptSnapshotError when they are not a JSON array
    (checks.check_item_ids checks the ids themselves)."""
    try:
        ids = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _corrupt(
            "content", manifest.model, manifest.version, ITEM_IDS_BLOB, f"is not a JSON array: {exc}"
        ) from exc
    if not isinstance(ids, list):
        raise _corrupt("content", manifest.model, manifest.version, ITEM_IDS_BLOB, "is not a JSON array")
    return tuple(ids)


def verify_blob(manifest: Manifest, blob_name: str, data: bytes | None) -> None:
    """Check one blob's presence, size and sha256 against the manifest; raises CorruptSnapshotError."""
    expected = manifest.blobs.get(blob_name)
    if expected is None:
        raise _corrupt("manifest", manifest.model, manifest.version, blob_name, "is not listed in the manifest")
    if data is None:
        raise _corrupt("missing", manifest.model, manifest.version, blob_name, "is missing")
    if len(data) != expected.size:
        how = "truncated" if len(data) < expected.size else "too long"
        raise _corrupt(
            "size",
            manifest.model,
            manifest.version,
            blob_name,
            f"is {how}: {len(data)} bytes, expected {expected.size}",
        )
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.sha256:
        raise _corrupt(
            "checksum",
            manifest.model,
            manifest.version,
            blob_name,
            f"fails its checksum: sha256 {actual[:12]}..., expected {expected.sha256[:12]}...",
        )


def load_blob(manifest: Manifest, blob_name: str, data: bytes | None) -> dict[str, torch.Tensor]:
    """Verify one blob (see verify_blob), then parse it and check it holds exactly the tensors the manifest
    lists for it, with their dtypes and shapes."""
    import safetensors.torch

    return _load_checked(manifest, blob_name, data, safetensors.torch.load)


def load_arrays(manifest: Manifest, blob_name: str, data: bytes | None) -> dict[str, np.ndarray]:
    """`load_blob` as numpy arrays, without torch (a bfloat16 tensor, which numpy lacks, is refused as content)."""
    return _load_checked(manifest, blob_name, data, safetensors.numpy.load)


def check_raw(manifest: bytes, blobs: Mapping[str, bytes | None]) -> Manifest:
    """Verify a stored snapshot's bytes without torch: what `decode` checks (checksums, sizes, tensor dtypes and
    shapes, lineage, code ranges), returning the parsed manifest instead of a Snapshot."""
    parsed = parse_manifest(manifest)
    tensors: dict[str, Any] = {}
    for blob_name in parsed.blobs:
        tensors.update(load_arrays(parsed, blob_name, blobs.get(blob_name)))
    try:
        check_lineage(parsed.version, parsed.parent)
        check_tables(tensors["codebooks"], tensors["item_codes"])
        if parsed.format_version >= 2 and "item_ids" in tensors:
            check_item_ids(read_item_ids(tensors["item_ids"].tobytes(), parsed), tensors["item_codes"].shape[0] - 1)
    except CodebookStoreError as exc:
        raise _corrupt("content", parsed.model, parsed.version, None, f"fails validation: {exc}") from exc
    return parsed


def _load_checked(manifest: Manifest, blob_name: str, data: bytes | None, load: Callable[[bytes], dict]) -> dict:
    verify_blob(manifest, blob_name, data)
    try:
        tensors = load(data)
    except Exception as exc:  # any parser failure on verified bytes means a bad writer
        raise _corrupt(
            "content", manifest.model, manifest.version, blob_name, f"is not valid safetensors: {exc}"
        ) from exc
    expected = {name: info for name, info in manifest.tensors.items() if info.blob == blob_name}
    if set(tensors) != set(expected):
        raise _corrupt(
            "content",
            manifest.model,
            manifest.version,
            blob_name,
            f"holds tensors {sorted(tensors)}, manifest lists {sorted(expected)}",
        )
    for name, t in tensors.items():
        if dtype_name(t.dtype) != expected[name].dtype or tuple(t.shape) != expected[name].shape:
            raise _corrupt(
                "content",
                manifest.model,
                manifest.version,
                blob_name,
                f"tensor {name!r} is {dtype_name(t.dtype)}{list(t.shape)}, manifest says "
                f"{expected[name].dtype}{list(expected[name].shape)}",
            )
    return tensors


def parse_manifest(data: bytes, *, model: str | None = None, version: int | None = None) -> Manifest:
    """Parse and self-verify manifest bytes. Raises CorruptSnapshotError (UnsupportedFormatError for an
    unknown format_version); `model`/`version`, when given, must match what the manifest says."""

    def bad(reason: str) -> CorruptSnapshotError:
        return _corrupt("manifest", model, version, MANIFEST_NAME, reason)

    try:
        body = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise bad("is not a JSON object")
    fmt = body.get("format_version")
    if isinstance(fmt, bool) or fmt not in READABLE_FORMATS:
        raise UnsupportedFormatError(
            f"{_where(model, version)}: manifest format_version {fmt!r} is not supported "
            f"(this reader knows {', '.join(map(str, READABLE_FORMATS))})",
            kind="format",
            model=model,
            version=version,
            blob=MANIFEST_NAME,
        )
    claimed = body.pop("manifest_sha256", None)
    try:
        actual = hashlib.sha256(_canonical(body)).hexdigest()
    except ValueError as exc:  # NaN/Inf smuggled in
        raise bad(f"is not strict JSON: {exc}") from exc
    if claimed != actual:
        raise bad("fails its checksum (manifest_sha256)")
    try:
        parsed = _manifest_from_dict(body)
    except (KeyError, TypeError, ValueError) as exc:
        raise bad(f"is malformed: {exc!r}") from exc
    if (model is not None and parsed.model != model) or (version is not None and parsed.version != version):
        raise bad(f"describes {parsed.model} v{parsed.version}")
    return parsed


def _manifest_from_dict(body: dict[str, Any]) -> Manifest:
    def typed(key: str, kind: type | tuple[type, ...]) -> Any:
        value = body[key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise TypeError(f"{key} has type {type(value).__name__}")
        return value

    model = typed("model", str)
    if not MODEL_NAME_RE.match(model):
        raise ValueError(f"bad model name {model!r}")
    parent = body["parent"]
    if parent is not None:
        parent = typed("parent", int)
    blobs: dict[str, BlobInfo] = {}
    for name, info in typed("blobs", dict).items():
        if not BLOB_NAME_RE.match(name):
            raise ValueError(f"bad blob name {name!r}")
        sha, size = info["sha256"], info["size"]
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)) or type(size) is not int or size < 0:
            raise ValueError(f"bad blob entry for {name!r}")
        blobs[name] = BlobInfo(sha, size)
    tensors: dict[str, TensorInfo] = {}
    for name, info in typed("tensors", dict).items():
        shape = info["shape"]
        if info["blob"] not in blobs or info["dtype"] not in _DTYPE_NAMES or not isinstance(shape, list):
            raise ValueError(f"bad tensor entry for {name!r}")
        if not all(type(s) is int and s >= 0 for s in shape):
            raise ValueError(f"bad shape for {name!r}")
        tensors[name] = TensorInfo(info["blob"], info["dtype"], tuple(shape))
    if "codebooks" not in tensors or "item_codes" not in tensors:
        raise ValueError("codebooks or item_codes missing from tensors")
    # format 2 means "has a vocabulary": without one, rows would silently be read as ids (and vice versa)
    if (body["format_version"] >= 2) != ("item_ids" in tensors):
        has = "with" if "item_ids" in tensors else "without"
        raise ValueError(f"format_version {body['format_version']} {has} item_ids")
    if "item_ids" in tensors and tensors["item_ids"].dtype != "uint8":
        raise ValueError("item_ids is not uint8")
    return Manifest(
        format_version=body["format_version"],
        model=model,
        version=typed("version", int),
        parent=parent,
        created_at=float(typed("created_at", (int, float))),
        watermark=typed("watermark", dict),
        config=typed("config", dict),
        health=typed("health", dict),
        tensors=tensors,
        blobs=blobs,
    )


def _prepare(group: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached tensors; a tensor sharing storage with an earlier one is copied
    (safetensors refuses shared storage, e.g. tied weights)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in group.items():
        t = tensor.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen and t.numel():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def _where(model: str | None, version: int | None) -> str:
    return f"snapshot {model or '?'} v{'?' if version is None else version}"


def _corrupt(kind: str, model: str | None, version: int | None, blob: str | None, reason: str) -> CorruptSnapshotError:
    subject = f"blob {blob!r}" if blob and blob != MANIFEST_NAME else (blob or "content")
    return CorruptSnapshotError(
        f"{_where(model, version)}: {subject} {reason}", kind=kind, model=model, version=version, blob=blob
    )
