"""`rocksdb://PATH`: snapshots in an embedded RocksDB (rocksdict), the default store of a worker.

Keys (raw bytes mode: no pickle; values are the format's bytes):
    m/<model>/<version:020d>          manifest; its presence marks the version complete
    b/<model>/<version:020d>/<blob>   blob bytes
    l/<model>                         the version latest points to, as decimal text

Crash safety: a put is ONE WriteBatch (blobs, manifest and, when it moves, latest), written with sync=True.
RocksDB applies a batch atomically, also across a crash (WAL recovery), so a version is either absent or
complete, and latest only ever names a complete version. A delete is one batch as well.

Processes: RocksDB lets one process open a database read-write (it holds PATH/LOCK). Other processes read
with `open_store(url, read_only=True)`, which opens a *secondary* instance (its own scratch directory) and
calls `try_catch_up_with_primary()` before every read, so it sees each batch whole or not at all. A
plain read-only instance would be a frozen view as of opening, hence the secondary.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from rocksdict import AccessType, DBCompressionType, Options, Rdict, WriteBatch, WriteOptions

from codebook_store.errors import CorruptSnapshotError, StoreUnavailableError, VersionExistsError
from codebook_store.store import SnapshotStore


def _manifest_key(model: str, version: int) -> bytes:
    return f"m/{model}/{version:020d}".encode()


def _blob_prefix(model: str, version: int) -> bytes:
    return f"b/{model}/{version:020d}/".encode()


def _latest_key(model: str) -> bytes:
    return f"l/{model}".encode()


class RocksDBStore(SnapshotStore):
    """Snapshots in a RocksDB database at `path`; read_only opens a secondary instance (see module doc)."""

    def __init__(self, url: str, path: str, *, read_only: bool = False) -> None:
        super().__init__(url, read_only=read_only)
        self.path = Path(path)
        options = Options(raw_mode=True)
        options.set_compression_type(DBCompressionType.none())  # float tensors barely compress
        self._secondary_dir: str | None = None
        try:
            if read_only:
                if not (self.path / "CURRENT").is_file():
                    raise StoreUnavailableError(f"{url}: no RocksDB database at {self.path}")
                options.set_max_open_files(-1)  # keep every table open so the primary's deletions cannot bite
                self._secondary_dir = tempfile.mkdtemp(prefix="sparc-rocksdb-secondary-")
                self._db = Rdict(
                    str(self.path), options, access_type=AccessType.secondary(self._secondary_dir)
                )
            else:
                options.create_if_missing(True)
                self._db = Rdict(str(self.path), options)
        except StoreUnavailableError:
            raise
        except Exception as exc:  # rocksdict raises plain Exception for I/O and lock errors
            self._remove_secondary_dir()
            hint = ""
            if "lock" in str(exc).lower():
                hint = (
                    " (another process, e.g. a running worker, has it open for writing; read with read_only)"
                )
            raise StoreUnavailableError(f"{url}: cannot open RocksDB: {exc}{hint}") from exc
        self._sync = WriteOptions()
        self._sync.sync = True

    # --- reads ---
    def _refresh(self) -> None:
        if self.read_only:
            self._db.try_catch_up_with_primary()

    def _keys(self, prefix: bytes) -> list[bytes]:
        out = []
        for key in self._db.keys(from_key=prefix):
            if not key.startswith(prefix):
                break
            out.append(key)
        return out

    def _list_models(self) -> list[str]:
        models = {key.split(b"/")[1].decode() for key in self._keys(b"m/")}
        models |= {key[2:].decode() for key in self._keys(b"l/")}
        return sorted(models)

    def _list_versions(self, model: str) -> list[int]:
        prefix = f"m/{model}/".encode()
        return [int(key[len(prefix) :]) for key in self._keys(prefix)]

    def _read_manifest(self, model: str, version: int) -> bytes | None:
        return self._db.get(_manifest_key(model, version))

    def _read_blob(self, model: str, version: int, name: str) -> bytes | None:
        return self._db.get(_blob_prefix(model, version) + name.encode())

    def _read_latest(self, model: str) -> int | None:
        data = self._db.get(_latest_key(model))
        if data is None:
            return None
        if not data.isdigit():
            raise CorruptSnapshotError(
                f"{self.url}: latest of {model} holds {data[:40]!r}, not a version",
                model=model,
                blob="latest",
            )
        return int(data)

    # --- writes ---
    def _commit(
        self, model: str, version: int, manifest: bytes, blobs: dict[str, bytes], *, move_latest: bool
    ) -> None:
        if self._db.get(_manifest_key(model, version)) is not None:
            raise VersionExistsError(f"{model} v{version} already exists in {self.url}")
        batch = WriteBatch(raw_mode=True)
        prefix = _blob_prefix(model, version)
        for name, data in blobs.items():
            batch.put(prefix + name.encode(), data)
        batch.put(_manifest_key(model, version), manifest)
        if move_latest:
            batch.put(_latest_key(model), str(version).encode())
        self._db.write(batch, self._sync)  # atomic: all of it or none of it

    def _write_latest(self, model: str, version: int) -> None:
        self._db.put(_latest_key(model), str(version).encode(), self._sync)

    def _delete_version(self, model: str, version: int) -> None:
        prefix = _blob_prefix(model, version)
        end = prefix[:-1] + b"0"  # '/' + 1: the first key after every key starting with prefix
        batch = WriteBatch(raw_mode=True)
        batch.delete(_manifest_key(model, version))
        batch.delete_range(prefix, end)
        self._db.write(batch, self._sync)
        self._db.compact_range(prefix, end)  # give the disk space back now, not at some later compaction

    # --- lifecycle ---
    def close(self) -> None:
        """Close the database (and remove a secondary instance's scratch directory)."""
        db = getattr(self, "_db", None)
        if db is not None:
            db.close()
            self._db = None
        self._remove_secondary_dir()

    def _remove_secondary_dir(self) -> None:
        if self._secondary_dir is not None:
            shutil.rmtree(self._secondary_dir, ignore_errors=True)
            self._secondary_dir = None
