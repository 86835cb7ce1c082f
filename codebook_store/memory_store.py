"""`memory://`: an in-process store for tests. Holds the encoded bytes, so reads verify like any backend."""

from __future__ import annotations

from codebook_store.errors import VersionExistsError
from codebook_store.store import SnapshotStore


class MemoryStore(SnapshotStore):
    """Snapshots in dicts of bytes; each `open_store("memory://")` is a new, empty store."""

    def __init__(self, url: str = "memory://", *, read_only: bool = False) -> None:
        super().__init__(url, read_only=read_only)
        self._manifests: dict[tuple[str, int], bytes] = {}
        self._blobs: dict[tuple[str, int], dict[str, bytes]] = {}
        self._latest: dict[str, int] = {}
        self._writers: dict[str, bytes] = {}

    def _list_models(self) -> list[str]:
        return sorted({model for model, _ in self._manifests} | set(self._latest))

    def _list_versions(self, model: str) -> list[int]:
        return sorted(v for m, v in self._manifests if m == model)

    def _read_manifest(self, model: str, version: int) -> bytes | None:
        return self._manifests.get((model, version))

    def _read_blob(self, model: str, version: int, name: str) -> bytes | None:
        return self._blobs.get((model, version), {}).get(name)

    def _read_latest(self, model: str) -> int | None:
        return self._latest.get(model)

    def _commit(self, model: str, version: int, manifest: bytes, blobs: dict[str, bytes], *, move_latest: bool) -> None:
        if (model, version) in self._manifests:
            raise VersionExistsError(f"{model} v{version} already exists; versions are never overwritten")
        self._blobs[(model, version)] = dict(blobs)
        self._manifests[(model, version)] = manifest
        if move_latest:
            self._latest[model] = version

    def _write_latest(self, model: str, version: int) -> None:
        self._latest[model] = version

    def _read_writer(self, model: str) -> bytes | None:
        return self._writers.get(model)

    def _write_writer(self, model: str, data: bytes) -> None:
        self._writers[model] = data

    def _delete_version(self, model: str, version: int) -> None:
        del self._manifests[(model, version)]
        del self._blobs[(model, version)]
