"""Versioned, verifiable SPARC snapshots: the format (format.py), the store interface and its backends
(store.py; `open_store("rocksdb://PATH" | "file://DIR" | "memory://")`), drift math (drift.py),
the model-compatibility check (compat.py), the codebook-updates records (messages.py: `messages.encode`,
`Reassembler`) and the subscriber that follows them (subscribe.py: `subscribe`)."""

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
from codebook_store.messages import CodebookUpdate, CorruptUpdateError, Reassembler, apply_remap
from codebook_store.snapshot import DEFAULT_MODEL, Snapshot
from codebook_store.store import SnapshotDiff, SnapshotStore, VersionInfo, open_store
from codebook_store.subscribe import Follower, SubscribeStats, Subscription, subscribe

__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "CodeRemap",
    "CodebookStoreError",
    "CodebookUpdate",
    "CorruptSnapshotError",
    "CorruptUpdateError",
    "Follower",
    "IncompatibleSnapshotError",
    "InvalidSnapshotError",
    "Manifest",
    "ReadOnlyStoreError",
    "Reassembler",
    "Snapshot",
    "SnapshotDiff",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StoreUnavailableError",
    "SubscribeStats",
    "Subscription",
    "UnsupportedFormatError",
    "VersionExistsError",
    "VersionInfo",
    "apply_remap",
    "check_compatible",
    "code_drift",
    "code_remap",
    "decode",
    "drift",
    "encode",
    "open_store",
    "parse_manifest",
    "subscribe",
]
