"""`file://DIR`: snapshots as plain files, the layout an object store (S3, GCS) would hold.

    DIR/<model>/<version>/manifest.json     the manifest (format.py); its presence marks the version complete
    DIR/<model>/<version>/<blob>.safetensors
    DIR/<model>/latest                      the version latest points to, as decimal text
    DIR/<model>/writer                      the writer epoch and holder (SnapshotStore.claim_writer), JSON
    DIR/<model>/.lock                       flock'ed by writers (one writer process at a time per model)

Write protocol (crash safe): blobs, then the manifest, are written and fsync'ed inside a hidden staging
directory `.staging-<version>-...`, which is then renamed to `<version>` in one atomic step; latest is
written to a temporary file, fsync'ed and moved over `latest` with os.replace. Deletion renames the version
to a hidden `.trash-...` directory first. Readers ignore hidden entries and version directories without a
manifest, so they never see a partial version; `prune` removes what crashed writers left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from codebook_store.checks import MODEL_NAME_RE
from codebook_store.errors import CorruptSnapshotError, StoreUnavailableError, VersionExistsError
from codebook_store.format import MANIFEST_NAME
from codebook_store.store import SnapshotStore

LATEST_NAME = "latest"
WRITER_NAME = "writer"
_DEBRIS_PREFIXES = (".staging-", ".trash-", ".latest-", ".writer-")


class FileStore(SnapshotStore):
    """Snapshots under a directory; created (with parents) unless read_only, which needs it to exist."""

    def __init__(self, url: str, root: str | os.PathLike[str], *, read_only: bool = False) -> None:
        super().__init__(url, read_only=read_only)
        self.root = Path(root)
        if read_only:
            if not self.root.is_dir():
                raise StoreUnavailableError(f"{url}: no such directory {self.root}")
        else:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise StoreUnavailableError(f"{url}: cannot create {self.root}: {exc.strerror}") from exc

    # --- reads ---
    def _list_models(self) -> list[str]:
        return sorted(
            d.name
            for d in self.root.iterdir()
            if MODEL_NAME_RE.match(d.name) and d.is_dir() and (self._list_versions(d.name) or self._has_latest(d))
        )

    def _list_versions(self, model: str) -> list[int]:
        directory = self.root / model
        if not directory.is_dir():
            return []
        return sorted(
            int(d.name)
            for d in directory.iterdir()
            if d.name.isdigit() and str(int(d.name)) == d.name and (d / MANIFEST_NAME).is_file()
        )

    def _read_manifest(self, model: str, version: int) -> bytes | None:
        return _read_or_none(self.root / model / str(version) / MANIFEST_NAME)

    def _read_blob(self, model: str, version: int, name: str) -> bytes | None:
        return _read_or_none(self.root / model / str(version) / name)

    def _read_latest(self, model: str) -> int | None:
        data = _read_or_none(self.root / model / LATEST_NAME)
        if data is None:
            return None
        text = data.decode("ascii", errors="replace").strip()
        if not text.isdigit():
            raise CorruptSnapshotError(
                f"{self.url}: {model}/{LATEST_NAME} holds {text[:40]!r}, not a version",
                kind="latest",
                model=model,
                blob=LATEST_NAME,
            )
        return int(text)

    # --- writes ---
    def _commit(self, model: str, version: int, manifest: bytes, blobs: dict[str, bytes], *, move_latest: bool) -> None:
        model_dir = self.root / model
        model_dir.mkdir(exist_ok=True)
        staging = model_dir / f".staging-{version}-{os.getpid()}-{secrets.token_hex(4)}"
        staging.mkdir()
        try:
            for name, data in blobs.items():  # blobs first ...
                _write_durably(staging / name, data)
            _write_durably(staging / MANIFEST_NAME, manifest)  # ... then the manifest ...
            _fsync_dir(staging)
            try:
                os.rename(staging, model_dir / str(version))  # ... then the version appears at once
            except OSError as exc:  # the target exists and is not empty
                raise VersionExistsError(f"{model} v{version} already exists in {self.url}") from exc
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_dir(model_dir)
        if move_latest:
            self._write_latest(model, version)

    def _write_latest(self, model: str, version: int) -> None:
        self._replace(model, LATEST_NAME, f"{version}\n".encode())

    def _read_writer(self, model: str) -> bytes | None:
        return _read_or_none(self.root / model / WRITER_NAME)

    def _write_writer(self, model: str, data: bytes) -> None:
        self._replace(model, WRITER_NAME, data)

    def _replace(self, model: str, name: str, data: bytes) -> None:
        """Write DIR/<model>/<name> whole or not at all (a durable temporary file moved over it)."""
        model_dir = self.root / model
        model_dir.mkdir(exist_ok=True)
        tmp = model_dir / f".{name}-{os.getpid()}-{secrets.token_hex(4)}"
        _write_durably(tmp, data)
        os.replace(tmp, model_dir / name)
        _fsync_dir(model_dir)

    def _delete_version(self, model: str, version: int) -> None:
        model_dir = self.root / model
        trash = model_dir / f".trash-{version}-{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(model_dir / str(version), trash)  # disappears from listings in one step
        _fsync_dir(model_dir)
        shutil.rmtree(trash)

    def _clean_debris(self, model: str) -> None:
        # Called under the writer lock: no other writer is mid-commit, so every hidden entry is dead.
        model_dir = self.root / model
        for entry in model_dir.iterdir() if model_dir.is_dir() else ():
            if entry.name.startswith(_DEBRIS_PREFIXES):
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _writer_lock(self, model: str) -> Iterator[None]:
        model_dir = self.root / model
        model_dir.mkdir(exist_ok=True)
        with open(model_dir / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    @staticmethod
    def _has_latest(model_dir: Path) -> bool:
        return (model_dir / LATEST_NAME).is_file()


def _read_or_none(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
