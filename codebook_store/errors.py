"""The codebook store's exception tree: every error it raises derives from `CodebookStoreError`."""

from __future__ import annotations


class CodebookStoreError(Exception):
    """Root of every error raised by codebook_store."""


class InvalidSnapshotError(CodebookStoreError, ValueError):
    """A Snapshot's fields are inconsistent (wrong dtype or shape, codes out of range, non-JSON metadata)."""


class CorruptSnapshotError(CodebookStoreError):
    """Stored or received bytes fail verification: a checksum or size mismatch, a missing blob,
    or a manifest that is not valid JSON. The message names the model, version and blob.

    kind: "missing" (a blob the manifest lists is absent), "size", "checksum", "manifest" (unparsable,
    self-checksum or fields), "content" (verified bytes that still do not make a valid snapshot),
    "format" (an unknown format_version), or "latest" (an unreadable latest pointer).
    """

    def __init__(
        self,
        message: str,
        *,
        kind: str,
        model: str | None = None,
        version: int | None = None,
        blob: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.model = model
        self.version = version
        self.blob = blob


class IncompatibleSnapshotError(CodebookStoreError):
    """A snapshot does not fit a model: its config or tensor shapes differ. `differences` lists them."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


class VersionExistsError(CodebookStoreError):
    """A put of a version that the store already holds (versions are never overwritten)."""


class FencedError(CodebookStoreError):
    """A write by a writer whose epoch is no longer the model's: another writer has claimed the model since
    (SnapshotStore.claim_writer). The message names both epochs and the current holder."""


class SnapshotNotFoundError(CodebookStoreError):
    """No complete snapshot with that model name and version is in the store."""


class ReadOnlyStoreError(CodebookStoreError):
    """A write (put, set_latest, prune) on a store opened read-only."""


class StoreUnavailableError(CodebookStoreError):
    """The store cannot be opened: a bad URL, a missing directory, or a database locked by another process."""


class UnsupportedFormatError(CorruptSnapshotError):
    """A manifest written in a format_version this reader does not know (a newer writer)."""


class KeyFileError(CodebookStoreError):
    """A signing or verification key file that cannot be read or is not a usable key (codebook_store.signing)."""
