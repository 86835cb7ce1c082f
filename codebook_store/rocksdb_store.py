"""`rocksdb://PATH`: snapshots in an embedded RocksDB (rocksdict), the default store of a worker.

Keys (raw bytes mode: no pickle; values are the format's bytes):
    m/<model>/<version:020d>                               manifest; its presence marks the version complete
    w/<model>/<version:020d>                               the write id (16 hex digits) of that manifest's blobs
    b/<model>/<version:020d>/<write id>/<blob>/<chunk:08d> the blob's bytes, in chunks of CHUNK_BYTES
    l/<model>                                              the version latest points to, as decimal text
    e/<model>                                              the writer epoch and holder (claim_writer), JSON

Crash safety by key order: (1) the blobs are written into one SST file outside the database
(rocksdict.SstFileWriter), fsync'ed and ingested with `ingest_external_file`, which adds the whole file
atomically; (2) the manifest, its write id and, when it moves, latest are written in ONE synced WAL batch,
which RocksDB applies atomically, also across a crash. A crash before (2) leaves orphan blob keys that no
manifest names: invisible, and removed by `prune` (with any half-written SST file). A delete is one synced
batch (manifest, write id, blob range), then a compaction of the range to give the disk space back.

Why a write id: a writer killed after (1) leaves blobs for version v; the next writer may well use v again.
Under fresh ids, a reader can never assemble the new manifest with the old attempt's blobs (which a torn
read-only view, below, could otherwise show: same sizes, other bytes, a false checksum failure).

Why ingestion: a 256 MB embedding table written through the memtable costs a batch copy, a memtable copy and
a flush (1-3 s measured under load); an ingested SST is written once and linked in (~0.25 s). Chunking keeps
every value at 1 MiB, so reads stream blocks instead of materialising one giant block (0.28 s vs 0.46 s).

Processes: RocksDB lets one process open a database read-write (it holds PATH/LOCK); the worker is that
process. Other processes read with `open_store(url, read_only=True)`, which opens a fresh *read-only*
instance for every read operation (~30 ms). Such a view is taken without the writer's cooperation: opened
while the writer flushes, it can miss a window of recent writes (it reads the MANIFEST before the flush is
recorded and finds the flushed WAL gone), so it may lack a blob or manifest that its own keys name. Reads
therefore retry on a fresh view while something is missing (SnapshotStore._read); a checksum failure is
never retried. Every snapshot returned is complete and verified; it may be slightly behind the writer.
(A RocksDB *secondary* instance would avoid reopening, but its catch-up serves stale point lookups after the
primary flushes, facebook/rocksdb#14444 and #15051, which we reproduced with this rocksdict.)
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from pathlib import Path

from rocksdict import (
    AccessType,
    DBCompressionType,
    IngestExternalFileOptions,
    Options,
    Rdict,
    SstFileWriter,
    WriteBatch,
    WriteOptions,
)

from codebook_store.errors import CorruptSnapshotError, StoreUnavailableError, VersionExistsError
from codebook_store.store import SnapshotStore

CHUNK_BYTES = 1 << 20
STAGING_DIR = "sparc-staging"  # inside PATH (same filesystem, so ingestion links instead of copying)


def _manifest_key(model: str, version: int) -> bytes:
    return f"m/{model}/{version:020d}".encode()


def _write_id_key(model: str, version: int) -> bytes:
    return f"w/{model}/{version:020d}".encode()


def _blob_prefix(model: str, version: int, write_id: bytes = b"") -> bytes:
    """All blob keys of a version, or (with write_id) of one write attempt of it."""
    return f"b/{model}/{version:020d}/".encode() + (write_id + b"/" if write_id else b"")


def _latest_key(model: str) -> bytes:
    return f"l/{model}".encode()


def _writer_key(model: str) -> bytes:
    return f"e/{model}".encode()


def _options(*, create: bool) -> Options:
    options = Options(raw_mode=True)
    options.set_compression_type(DBCompressionType.none())  # float tensors barely compress
    options.create_if_missing(create)
    options.set_max_open_files(-1)  # open every table file up front: no lazy open of a file deleted since
    return options


class RocksDBStore(SnapshotStore):
    """Snapshots in a RocksDB database at `path`; read_only reopens a read-only view per read (module doc)."""

    OPEN_RETRIES = 5  # a read-only open can race the writer deleting obsolete files; retrying fixes it

    def __init__(self, url: str, path: str, *, read_only: bool = False) -> None:
        super().__init__(url, read_only=read_only)
        self.path = Path(path)
        self._db: Rdict | None = None
        if read_only:
            self._read_attempts = self.OPEN_RETRIES  # a view opened mid-flush can miss a window: reopen
            if not (self.path / "CURRENT").is_file():
                raise StoreUnavailableError(f"{url}: no RocksDB database at {self.path}")
            self._refresh()
        else:
            self._db = self._open(AccessType.read_write())
        self._sync = WriteOptions()
        self._sync.sync = True

    def _open(self, access: AccessType) -> Rdict:
        attempt = 0
        while True:
            try:
                return Rdict(str(self.path), _options(create=not self.read_only), access_type=access)
            except Exception as exc:  # rocksdict raises plain Exception for I/O and lock errors
                attempt += 1
                if "lock" in str(exc).lower():
                    raise StoreUnavailableError(
                        f"{self.url}: cannot open RocksDB for writing: {exc} (another process, e.g. a "
                        "running worker, holds it; readers open it with read_only=True)"
                    ) from exc
                if attempt >= self.OPEN_RETRIES:
                    raise StoreUnavailableError(f"{self.url}: cannot open RocksDB: {exc}") from exc
                time.sleep(0.01 * attempt)

    # --- reads ---
    def _refresh(self) -> None:
        if self.read_only:  # a fresh point-in-time view of what the writer has committed so far
            if self._db is not None:
                self._db.close()
            self._db = None
            self._db = self._open(AccessType.read_only(False))

    def _scan(self, prefix: bytes, *, values: bool = False) -> list:
        """Keys (or (key, value) pairs) starting with prefix, in key order."""
        out = []
        for item in self._db.items(from_key=prefix) if values else self._db.keys(from_key=prefix):
            if not (item[0] if values else item).startswith(prefix):
                break
            out.append(item)
        return out

    def _list_models(self) -> list[str]:
        models = {key.split(b"/")[1].decode() for key in self._scan(b"m/")}
        models |= {key[2:].decode() for key in self._scan(b"l/")}
        return sorted(models)

    def _list_versions(self, model: str) -> list[int]:
        prefix = f"m/{model}/".encode()
        return [int(key[len(prefix) :]) for key in self._scan(prefix)]

    def _read_manifest(self, model: str, version: int) -> bytes | None:
        return self._db.get(_manifest_key(model, version))

    def _read_blob(self, model: str, version: int, name: str) -> bytes | None:
        write_id = self._db.get(_write_id_key(model, version))
        if write_id is None:
            return None
        chunks = self._scan(_blob_prefix(model, version, write_id) + name.encode() + b"/", values=True)
        return b"".join(value for _, value in chunks) if chunks else None

    def _read_latest(self, model: str) -> int | None:
        data = self._db.get(_latest_key(model))
        if data is None:
            return None
        if not data.isdigit():
            raise CorruptSnapshotError(
                f"{self.url}: latest of {model} holds {data[:40]!r}, not a version",
                kind="latest",
                model=model,
                blob="latest",
            )
        return int(data)

    # --- writes ---
    def _commit(self, model: str, version: int, manifest: bytes, blobs: dict[str, bytes], *, move_latest: bool) -> None:
        if self._db.get(_manifest_key(model, version)) is not None:
            raise VersionExistsError(f"{model} v{version} already exists in {self.url}")
        write_id = secrets.token_hex(8).encode()
        self._ingest_blobs(_blob_prefix(model, version, write_id), blobs)  # durable; named by no manifest yet
        batch = WriteBatch(raw_mode=True)
        batch.put(_write_id_key(model, version), write_id)
        batch.put(_manifest_key(model, version), manifest)
        if move_latest:
            batch.put(_latest_key(model), str(version).encode())
        self._db.write(batch, self._sync)  # the version (and latest) appear at once

    def _ingest_blobs(self, prefix: bytes, blobs: dict[str, bytes]) -> None:
        staging = self.path / STAGING_DIR
        staging.mkdir(exist_ok=True)
        sst = staging / f"{os.getpid()}-{secrets.token_hex(8)}.sst"
        try:
            writer = SstFileWriter(_options(create=False))
            writer.open(str(sst))
            for name in sorted(blobs):  # an SST file takes its keys in ascending order
                data = blobs[name]
                base = prefix + name.encode() + b"/"
                for index, start in enumerate(range(0, len(data), CHUNK_BYTES)):
                    writer[base + b"%08d" % index] = data[start : start + CHUNK_BYTES]
            writer.finish()
            fd = os.open(sst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            ingest = IngestExternalFileOptions()
            ingest.set_move_files(True)  # link the file into the database instead of copying it
            self._db.ingest_external_file([str(sst)], ingest)
        finally:
            sst.unlink(missing_ok=True)

    def _write_latest(self, model: str, version: int) -> None:
        self._db.put(_latest_key(model), str(version).encode(), self._sync)

    def _read_writer(self, model: str) -> bytes | None:
        return self._db.get(_writer_key(model))

    def _write_writer(self, model: str, data: bytes) -> None:
        self._db.put(_writer_key(model), data, self._sync)

    def _delete_version(self, model: str, version: int) -> None:
        batch = WriteBatch(raw_mode=True)
        batch.delete(_manifest_key(model, version))
        batch.delete(_write_id_key(model, version))
        self._delete_blobs(batch, _blob_prefix(model, version))

    def _clean_debris(self, model: str) -> None:
        # Called under the store's lock in the only writing process: no commit is in flight, so blobs that no
        # manifest names (no manifest, or another write id) were left by a crash before the manifest batch.
        prefix = f"b/{model}/".encode()
        attempts = {tuple(key[len(prefix) :].split(b"/")[:2]) for key in self._scan(prefix)}
        for version_text, write_id in sorted(attempts):
            version = int(version_text)
            current = self._db.get(_write_id_key(model, version))
            if current != write_id or self._db.get(_manifest_key(model, version)) is None:
                self._delete_blobs(WriteBatch(raw_mode=True), _blob_prefix(model, version, write_id))
        shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)  # half-written SST files

    def _delete_blobs(self, batch: WriteBatch, prefix: bytes) -> None:
        end = prefix[:-1] + b"0"  # '/' + 1: the first key after every key that starts with prefix
        batch.delete_range(prefix, end)
        self._db.write(batch, self._sync)
        self._db.compact_range(prefix, end)  # give the disk space back now, not at some later compaction

    # --- lifecycle ---
    def close(self) -> None:
        """Close the database handle."""
        if self._db is not None:
            self._db.close()
            self._db = None
