"""`SnapshotStore`: versioned, verified snapshots behind one interface, with backends chosen by URL.

    store = open_store("rocksdb:///var/lib/sparc/snapshots")   # embedded default, one writer process
    store = open_store("file:///mnt/snapshots")                # plain files: the layout an object store holds
    store = open_store("memory://")                            # tests

Model names: one store holds any number of models. Every method that reads takes `model=` (default "sparc");
`put` takes the model from the snapshot itself.

Rules:
- Versions never repeat: `put` of a version the model already holds raises VersionExistsError.
- `put` moves "latest" to the new version only when that version is higher than the one "latest" points to
  (or no latest exists yet), and only if `move_latest=True` (the default; the publisher passes False for a
  snapshot the quality gate rejected, to keep it for inspection without serving it).
- `set_latest(v)` (rollback, or roll forward) points latest at any stored version, after verifying it fully.
  It is not a freeze: a later `put` with a higher version moves latest again.
- `prune` never removes the version latest points to, nor pinned ones.
- Crash safety: a version becomes visible only once its blobs and manifest are completely written; latest is
  moved after that, atomically. So latest always names a complete snapshot, and readers in other processes
  see only complete versions. Every read verifies sizes and sha256 checksums before parsing anything.
- Processes: one writer process per model (the trainer/worker). Readers elsewhere open the store with
  `read_only=True` (for rocksdb://, see rocksdb_store.py: a fresh read-only view per read).
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from codebook_store.checks import DEFAULT_MODEL, check_model_name
from codebook_store.drift import CodeRemap, code_drift, code_remap
from codebook_store.errors import (
    CorruptSnapshotError,
    ReadOnlyStoreError,
    SnapshotNotFoundError,
    StoreUnavailableError,
    VersionExistsError,
)
from codebook_store.format import (
    CODEBOOKS_BLOB,
    ITEM_CODES_BLOB,
    ITEM_IDS_BLOB,
    Manifest,
    check_raw,
    decode,
    encode,
    load_arrays,
    parse_manifest,
    read_item_ids,
    verify_blob,
)

if TYPE_CHECKING:
    from codebook_store.snapshot import Snapshot

T = TypeVar("T")


@dataclass(frozen=True)
class VersionInfo:
    """One stored version as `list` reports it (read from its manifest; blobs are not read).

    size_bytes : manifest + blob bytes; blob_sizes: bytes per blob
    health     : the snapshot's health dict as stored
    problem    : why the version cannot be read (its manifest fails verification), else None; the other fields
                 are then unknown (None, empty)
    """

    model: str
    version: int
    parent: int | None
    created_at: float | None
    num_items: int | None
    size_bytes: int | None
    blob_sizes: dict[str, int]
    health: dict[str, Any]
    is_latest: bool
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON dict of every field."""
        return {
            "model": self.model,
            "version": self.version,
            "parent": self.parent,
            "created_at": self.created_at,
            "num_items": self.num_items,
            "size_bytes": self.size_bytes,
            "blob_sizes": dict(self.blob_sizes),
            "health": self.health,
            "is_latest": self.is_latest,
            "problem": self.problem,
        }


@dataclass(frozen=True)
class SnapshotDiff:
    """What changed from version `from_version` to `to_version` of one model.

    remap : the rows whose full code changed (rows, old (K, L), new (K, L)), rows added and removed
    drift : drift.code_drift numbers, by item (external id): changed shares overall and per level, codeword
            movement per level, items added and removed, rows handed to another item
    """

    model: str
    from_version: int
    to_version: int
    remap: CodeRemap
    drift: dict[str, Any]

    def as_dict(self, *, with_items: bool = False) -> dict[str, Any]:
        """A JSON dict: versions, counts and drift; with_items adds the remap rows as lists."""
        out: dict[str, Any] = {
            "model": self.model,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "changed_items": int(self.remap.changed_items.size),
            "added_items": int(self.remap.added_items.size),
            "removed_items": int(self.remap.removed_items.size),
            "drift": self.drift,
        }
        if with_items:
            out["changed"] = [
                {"item": int(i), "old": o, "new": n}
                for i, o, n in zip(
                    self.remap.changed_items.tolist(),
                    self.remap.old_codes.tolist(),
                    self.remap.new_codes.tolist(),
                    strict=True,
                )
            ]
            out["added"] = [
                {"item": int(i), "new": n}
                for i, n in zip(self.remap.added_items.tolist(), self.remap.added_codes.tolist(), strict=True)
            ]
            out["removed"] = self.remap.removed_items.tolist()
        return out


class SnapshotStore(ABC):
    """The store interface. Public methods hold the rules; backends implement the `_`-prefixed primitives.

    Instances are safe to share between threads of one process. Writers: one process per model at a time
    (the trainer); the file backend also serialises concurrent writer processes with a lock file.
    """

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        self.url = url
        self.read_only = read_only
        self._lock = threading.RLock()
        self._read_attempts = 1  # see _read

    # --- writes ---
    def put(self, snapshot: Snapshot, *, move_latest: bool = True) -> bool:
        """Store a new version of `snapshot.model`; returns True if latest now points to it.

        Raises VersionExistsError if the version exists (nothing is overwritten), ReadOnlyStoreError on a
        read-only store. Latest moves only to a version higher than the current latest (see module doc).
        """
        self._check_writable()
        manifest, blobs = encode(snapshot)  # outside the lock: the expensive part
        return self._put_bytes(snapshot.model, snapshot.version, manifest, blobs, move_latest)

    def set_latest(self, version: int, *, model: str = DEFAULT_MODEL) -> None:
        """Point latest at `version` (rollback or roll forward) after verifying every blob of it."""
        self._check_writable()
        check_model_name(model)
        with self._lock, self._writer_lock(model):
            self._get(model, version)  # complete and verified, or raises
            self._write_latest(model, version)

    def prune(self, *, keep_last: int, keep: Iterable[int] = (), model: str = DEFAULT_MODEL) -> list[int]:
        """Delete all versions except the `keep_last` highest, those in `keep`, and latest; also clears debris
        that crashed writers left behind. Returns the deleted versions, ascending."""
        self._check_writable()
        if keep_last < 0:
            raise ValueError(f"keep_last must be >= 0, got {keep_last}")
        check_model_name(model)
        with self._lock, self._writer_lock(model):
            versions = self._list_versions(model)
            kept = set(keep) | set(versions[-keep_last:] if keep_last else [])
            latest = self._read_latest(model)
            if latest is not None:
                kept.add(latest)
            doomed = [v for v in versions if v not in kept]
            for version in doomed:
                self._delete_version(model, version)
            self._clean_debris(model)
            return doomed

    # --- reads ---
    def get(self, version: int, *, model: str = DEFAULT_MODEL) -> Snapshot:
        """The complete, verified snapshot `version` of `model`. Raises SnapshotNotFoundError or
        CorruptSnapshotError (naming the blob) when a checksum, size or the manifest fails."""
        return self._read(lambda: self._get(model, version))

    def manifest(self, version: int, *, model: str = DEFAULT_MODEL) -> Manifest:
        """The parsed, self-verified manifest of `version` (blobs are not read)."""
        return self._read(lambda: self._read_manifest_checked(model, version)[0])

    def latest_version(self, *, model: str = DEFAULT_MODEL) -> int | None:
        """The version latest points to, or None."""
        return self._read(lambda: self._read_latest(check_model_name(model)))

    def latest(self, *, model: str = DEFAULT_MODEL) -> Snapshot | None:
        """The verified snapshot latest points to, or None when the model has none yet. A corrupt latest
        raises CorruptSnapshotError (no silent fallback to an older version)."""

        def read() -> Snapshot | None:
            version = self._read_latest(check_model_name(model))
            return None if version is None else self._get(model, version)

        return self._read(read)

    def fallback(self, *, below: int | None = None, model: str = DEFAULT_MODEL) -> tuple[Snapshot | None, list[str]]:
        """The newest version below `below` (of all, if None) that verifies completely and that a quality gate
        did not hold back (its health's "gate" does not say passed: false; such a version was never meant to be
        latest), or None; and why each newer candidate was passed over (CorruptSnapshotError messages)."""
        passed_over: list[str] = []
        for version in reversed(self.versions(model=model)):
            if below is not None and version >= below:
                continue
            try:
                if self.manifest(version, model=model).health.get("gate", {}).get("passed", True) is False:
                    continue
                return self.get(version, model=model), passed_over
            except (CorruptSnapshotError, SnapshotNotFoundError) as exc:
                passed_over.append(str(exc))
        return None, passed_over

    def versions(self, *, model: str = DEFAULT_MODEL) -> list[int]:
        """The complete versions of `model`, ascending."""
        return self._read(lambda: self._list_versions(check_model_name(model)))

    def models(self) -> list[str]:
        """Model names with at least one version or a latest pointer, sorted."""
        return self._read(self._list_models)

    def list(self, *, model: str = DEFAULT_MODEL) -> list[VersionInfo]:
        """A summary of every complete version of `model`, ascending (manifests only; blobs not read). A version
        whose manifest fails verification is listed with its `problem`."""

        def read() -> list[VersionInfo]:
            latest = self._read_latest(check_model_name(model))
            out = []
            for version in self._list_versions(model):
                try:
                    m, raw = self._read_manifest_checked(model, version)
                except CorruptSnapshotError as exc:
                    out.append(VersionInfo(model, version, None, None, None, None, {}, {}, version == latest, str(exc)))
                    continue
                out.append(
                    VersionInfo(
                        model=model,
                        version=version,
                        parent=m.parent,
                        created_at=m.created_at,
                        num_items=m.tensors["item_codes"].shape[0] - 1,
                        size_bytes=len(raw) + m.total_size,
                        blob_sizes={name: b.size for name, b in m.blobs.items()},
                        health=m.health,
                        is_latest=version == latest,
                    )
                )
            return out

        return self._read(read)

    def diff(self, a: int, b: int, *, model: str = DEFAULT_MODEL) -> SnapshotDiff:
        """The remap (rows) and drift (items, by their external ids) from version `a` to version `b` (reads and
        verifies only the codebooks, item-code and vocabulary blobs of each)."""
        (old_codes, old_books, old_ids), (new_codes, new_books, new_ids) = self._read(
            lambda: (self._read_codes(model, a), self._read_codes(model, b))
        )
        return SnapshotDiff(
            model=model,
            from_version=a,
            to_version=b,
            remap=code_remap(old_codes, new_codes),
            drift=code_drift(old_codes, new_codes, old_books, new_books, old_ids, new_ids),
        )

    def read_raw(self, version: int, *, model: str = DEFAULT_MODEL) -> tuple[bytes, dict[str, bytes]]:
        """The verified bytes of `version`: (manifest, {blob name: bytes}), exactly as stored."""

        def read() -> tuple[bytes, dict[str, bytes]]:
            manifest, raw = self._read_manifest_checked(model, version)
            blobs = {}
            for name in manifest.blobs:
                data = self._read_blob(model, version, name)
                verify_blob(manifest, name, data)
                blobs[name] = data
            return raw, blobs

        return self._read(read)

    def put_raw(self, manifest: bytes, blobs: dict[str, bytes], *, move_latest: bool = True) -> bool:
        """Store already-encoded bytes (e.g. copied from another store) after verifying them fully;
        same rules as `put`. Returns True if latest now points to the new version."""
        self._check_writable()
        parsed = check_raw(manifest, blobs)  # verifies every checksum and the content (no torch needed)
        wanted = {name: blobs[name] for name in parsed.blobs}
        return self._put_bytes(parsed.model, parsed.version, manifest, wanted, move_latest)

    # --- lifecycle ---
    def close(self) -> None:
        """Release the backend's resources (files, database handles). The store is unusable afterwards."""
        return None

    def __enter__(self) -> SnapshotStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r}{', read_only=True' if self.read_only else ''})"

    # --- helpers ---
    def _put_bytes(self, model: str, version: int, manifest: bytes, blobs: dict[str, bytes], move_latest: bool) -> bool:
        with self._lock, self._writer_lock(model):
            if version in self._list_versions(model):
                raise VersionExistsError(f"{model} v{version} already exists; versions are never overwritten")
            current = self._read_latest(model)
            move = move_latest and (current is None or version > current)
            self._commit(model, version, manifest, blobs, move_latest=move)
            return move

    def _read(self, operation: Callable[[], T]) -> T:
        """Run a read operation on one consistent view of the store. Backends whose view can be torn by a
        writer in another process (rocksdb read-only) retry it on a fresh view while something the view
        itself names is missing; a persistent gap, or any checksum failure, is raised."""
        with self._lock:
            for attempt in range(1, self._read_attempts + 1):
                self._refresh()
                try:
                    return operation()
                except (SnapshotNotFoundError, CorruptSnapshotError) as exc:
                    missing = isinstance(exc, SnapshotNotFoundError) or exc.kind == "missing"
                    if not missing or attempt == self._read_attempts:
                        raise
            raise AssertionError("unreachable")

    def _get(self, model: str, version: int) -> Snapshot:
        manifest, raw = self._read_manifest_checked(model, version)
        blobs = {name: self._read_blob(model, version, name) for name in manifest.blobs}
        return decode(raw, blobs, model=model, version=version)  # verifies before parsing

    def _check_writable(self) -> None:
        if self.read_only:
            raise ReadOnlyStoreError(f"{self.url} is open read-only")

    def _read_manifest_checked(self, model: str, version: int) -> tuple[Manifest, bytes]:
        check_model_name(model)
        raw = self._read_manifest(model, version)
        if raw is None:
            raise SnapshotNotFoundError(f"{model} v{version} is not in {self.url}")
        return parse_manifest(raw, model=model, version=version), raw

    def _read_codes(self, model: str, version: int) -> tuple[Any, Any, tuple[Any, ...] | None]:
        """(item codes, codebooks, vocabulary; None: row i is item i) of a version, verified."""
        manifest, _ = self._read_manifest_checked(model, version)
        codes = load_arrays(manifest, ITEM_CODES_BLOB, self._read_blob(model, version, ITEM_CODES_BLOB))
        books = load_arrays(manifest, CODEBOOKS_BLOB, self._read_blob(model, version, CODEBOOKS_BLOB))
        ids = None
        if ITEM_IDS_BLOB in manifest.blobs:
            data = load_arrays(manifest, ITEM_IDS_BLOB, self._read_blob(model, version, ITEM_IDS_BLOB))
            ids = read_item_ids(data["item_ids"].tobytes(), manifest)
        return codes["item_codes"], books["codebooks"], ids

    # --- backend primitives ---
    def _refresh(self) -> None:
        """Catch up with writers in other processes before a read (a no-op unless the backend needs it)."""
        return None

    def _writer_lock(self, model: str) -> AbstractContextManager[object]:
        """Exclusion between writer processes for `model` (in-process exclusion is `self._lock`)."""
        return nullcontext()

    def _clean_debris(self, model: str) -> None:
        """Remove what crashed writers left (never visible to readers); a no-op unless the backend has any."""
        return None

    @abstractmethod
    def _list_models(self) -> list[str]:
        """Model names present, sorted."""

    @abstractmethod
    def _list_versions(self, model: str) -> list[int]:
        """Complete versions of `model` (manifest written), ascending."""

    @abstractmethod
    def _read_manifest(self, model: str, version: int) -> bytes | None:
        """The manifest bytes, or None if the version is not (completely) stored."""

    @abstractmethod
    def _read_blob(self, model: str, version: int, name: str) -> bytes | None:
        """A blob's bytes, or None if missing."""

    @abstractmethod
    def _read_latest(self, model: str) -> int | None:
        """The version latest points to, or None."""

    @abstractmethod
    def _commit(self, model: str, version: int, manifest: bytes, blobs: dict[str, bytes], *, move_latest: bool) -> None:
        """Write blobs, then the manifest, then (if move_latest) latest, so that a crash at any point leaves
        the version either invisible or complete, and latest at a complete version. Raise
        VersionExistsError if the version appeared meanwhile."""

    @abstractmethod
    def _write_latest(self, model: str, version: int) -> None:
        """Point latest at `version` atomically."""

    @abstractmethod
    def _delete_version(self, model: str, version: int) -> None:
        """Delete a version so that it disappears atomically from listings."""


def open_store(url: str, *, read_only: bool = False) -> SnapshotStore:
    """Open a store by URL: `rocksdb://PATH`, `file://DIR` or `memory://`.

    read_only=True never writes. For rocksdb it opens a RocksDB *secondary* instance, which works while a
    writer process holds the database (RocksDB allows one read-write process) and catches up with it before
    every read; the CLI's read commands use it. Raises StoreUnavailableError for an unknown scheme, a missing
    path opened read-only, or a database another process holds open for writing.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise StoreUnavailableError(f"store URL {url!r} has no scheme; use rocksdb://PATH, file://DIR or memory://")
    if scheme == "memory":
        from codebook_store.memory_store import MemoryStore

        return MemoryStore(url, read_only=read_only)
    if not rest:
        raise StoreUnavailableError(f"store URL {url!r} has no path")
    if scheme == "file":
        from codebook_store.file_store import FileStore

        return FileStore(url, rest, read_only=read_only)
    if scheme == "rocksdb":
        from codebook_store.rocksdb_store import RocksDBStore

        return RocksDBStore(url, rest, read_only=read_only)
    raise StoreUnavailableError(f"unknown store scheme {scheme!r} in {url!r}; use rocksdb://, file:// or memory://")
