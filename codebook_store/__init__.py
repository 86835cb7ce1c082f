"""Versioned, verifiable SPARC snapshots: the format (format.py), the store interface and its backends
(store.py; `open_store("rocksdb://PATH" | "file://DIR" | "memory://")`), drift and remap math (drift.py),
the model-compatibility check (compat.py), the codebook-updates records (messages.py: `messages.encode`,
`Reassembler`; contract: docs/codebook-updates.md), their signatures (signing.py) and the subscriber that
follows them (subscribe.py: `subscribe`).

Importing the package needs no torch: `Snapshot` (torch tensors) and `check_compatible` load on first use, and
messages, subscribe, signing, drift and the store's byte-level calls use only numpy and safetensors
(kafka-python when following a topic, cryptography for Ed25519 keys), so a subscriber service runs without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from codebook_store.checks import DEFAULT_MODEL
from codebook_store.drift import CodeRemap, IdRemap, apply_remap, code_drift, code_remap, drift, id_remap
from codebook_store.errors import (
    CodebookStoreError,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    InvalidSnapshotError,
    KeyFileError,
    ReadOnlyStoreError,
    SnapshotNotFoundError,
    StoreUnavailableError,
    UnsupportedFormatError,
    VersionExistsError,
)
from codebook_store.format import FORMAT_VERSION, Manifest, decode, encode, parse_manifest
from codebook_store.messages import CodebookUpdate, CorruptUpdateError, Reassembler
from codebook_store.signing import Signer, Verifier, load_signer, load_verifier
from codebook_store.store import SnapshotDiff, SnapshotStore, VersionInfo, open_store
from codebook_store.subscribe import Follower, SubscribeStats, Subscription, subscribe

if TYPE_CHECKING:
    from codebook_store.compat import check_compatible
    from codebook_store.snapshot import Snapshot

_TORCH_BOUND = {"Snapshot": "codebook_store.snapshot", "check_compatible": "codebook_store.compat"}


def __getattr__(name: str) -> Any:
    """The torch-bound names (Snapshot, check_compatible) load on first use."""
    if name not in _TORCH_BOUND:
        raise AttributeError(f"module 'codebook_store' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_TORCH_BOUND[name]), name)


__all__ = [
    "DEFAULT_MODEL",
    "FORMAT_VERSION",
    "IdRemap",
    "CodeRemap",
    "CodebookStoreError",
    "CodebookUpdate",
    "CorruptSnapshotError",
    "CorruptUpdateError",
    "Follower",
    "IncompatibleSnapshotError",
    "InvalidSnapshotError",
    "KeyFileError",
    "Manifest",
    "ReadOnlyStoreError",
    "Reassembler",
    "Signer",
    "Snapshot",
    "SnapshotDiff",
    "SnapshotNotFoundError",
    "SnapshotStore",
    "StoreUnavailableError",
    "SubscribeStats",
    "Subscription",
    "UnsupportedFormatError",
    "Verifier",
    "VersionExistsError",
    "VersionInfo",
    "apply_remap",
    "check_compatible",
    "code_drift",
    "code_remap",
    "decode",
    "drift",
    "encode",
    "id_remap",
    "load_signer",
    "load_verifier",
    "open_store",
    "parse_manifest",
    "subscribe",
]
