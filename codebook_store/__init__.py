"""Versioned, verifiable SPARC snapshots: the format (format.py), the store interface and its backends
(store.py; `open_store("rocksdb://PATH" | "file://DIR" | "memory://")`), drift math (drift.py)
and the model-compatibility check (compat.py)."""

from codebook_store.compat import check_compatible
from codebook_store.drift import CodeRemap, code_drift, code_remap, drift
from codebook_store.errors import (
    CodebookStoreError,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    InvalidSnapshotError,
    ReadOnlyStoreError,
    SnapshotNotFoundError,
    StoreUnavailableError,
    UnsupportedFormatError,
    VersionExistsError,
)
from codebook_store.format import FORMAT_VERSION, Manifest, decode, encode, parse_manifest
from codebook_store.snapshot import DEFAULT_MODEL, Snapshot
from codebook_store.store import SnapshotDiff, SnapshotStore, VersionInfo, open_store

__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "CodeRemap",
    "CodebookStoreError",
    "CorruptSnapshotError",
    "IncompatibleSnapshotError",
    "InvalidSnapshotError",
    "Manifest",
    "ReadOnlyStoreError",
    "Snapshot",
    "SnapshotDiff",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StoreUnavailableError",
    "UnsupportedFormatError",
    "VersionExistsError",
    "VersionInfo",
    "check_compatible",
    "code_drift",
    "code_remap",
    "decode",
    "drift",
    "encode",
    "open_store",
    "parse_manifest",
]
