"""Snapshots out of the worker: the health gate, the codebook store and the codebook-updates message.

This is the worker's only module that imports codebook_store; everything the store's API means to the worker
is here.

Versions: the next version is one above the highest the store holds for the model (so a restarted worker
never reuses one; a version that appears meanwhile raises VersionExistsError and the next free one is taken).
`parent` is the previous snapshot this worker made (its training lineage), None for its first.
A snapshot the gate rejects is stored for inspection but latest does not move and nothing is announced.

codebook-updates message (schema "sparc.codebook-update/1"; value = UTF-8 JSON, key = the version):
    {"schema", "model", "version", "parent", "store": store URL (a pointer: the blobs live there),
     "manifest": the stored manifest (codebook_store.Manifest.as_dict: config, health, watermark,
                 blob sha256s),
     "remap": items whose codes changed since the previously ANNOUNCED version, or null (first
              announcement, or more than MAX_REMAP_ITEMS changes: use `sparc snapshots diff` / store.diff)
              {"from_version", "changed_items", "old_codes", "new_codes", "added_items", "added_codes"}}
codebook_store has no Kafka message schema of its own yet; this one carries the manifest and a pointer.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import torch

from codebook_store import Snapshot, VersionExistsError, code_drift, code_remap, open_store
from trainer.online import LearnerState

log = logging.getLogger(__name__)

SCHEMA = "sparc.codebook-update/1"
MAX_REMAP_ITEMS = 10_000  # keeps a message well under Kafka's default 1 MiB


def gate(health: dict, min_utilisation: float) -> list[str]:
    """Reasons a snapshot must not become latest (empty: it may)."""
    reasons = []
    if not health.get("finite", False):
        reasons.append("non-finite values in the codebooks or item vectors")
    if not health.get("initialised", False):
        reasons.append("codebooks not initialised (no training step yet)")
    if health.get("items", 0) == 0:
        reasons.append("empty catalogue")
    utilisation = health.get("level1_utilisation", 0.0)
    if utilisation < min_utilisation:
        reasons.append(f"level-1 utilisation {utilisation:.3f} is below the floor {min_utilisation}")
    return reasons


@dataclass(frozen=True)
class Published:
    version: int
    created_at: float
    accepted: bool  # latest moved to it; announce `message` and serve it
    reasons: list[str]  # why the gate rejected it (empty when accepted)
    message: bytes | None


class Publisher:
    """Owns the store handle; call `publish` from one thread at a time (the worker serialises it)."""

    def __init__(self, store_url: str, model: str, min_utilisation: float):
        self.store_url, self.model, self.min_utilisation = store_url, model, min_utilisation
        self.store = open_store(store_url)
        versions = self.store.versions(model=model)
        self.next_version = versions[-1] + 1 if versions else 0
        self.parent: int | None = None
        self._previous: tuple[torch.Tensor, torch.Tensor] | None = None  # (item codes, codebooks) of parent
        self._announced: tuple[int, torch.Tensor] | None = None  # (version, item codes) last announced

    def publish(self, state: LearnerState, health: dict, watermark: dict, created_at: float) -> Published:
        reasons = gate(health, self.min_utilisation)
        health = {**health, "gate": {"passed": not reasons, "reasons": reasons}}
        if self._previous is not None:
            codes, books = self._previous
            health["drift"] = {
                "parent_version": self.parent,
                **code_drift(codes, state.item_codes, books, state.codebooks),
            }
        snapshot = self._put(state, health, watermark, created_at, accepted=not reasons)
        self.parent = snapshot.version
        self._previous = (state.item_codes, state.codebooks)
        message = None
        if not reasons:
            message = self._message(snapshot)
            self._announced = (snapshot.version, state.item_codes)
        return Published(
            version=snapshot.version,
            created_at=created_at,
            accepted=not reasons,
            reasons=reasons,
            message=message,
        )

    def latest(self) -> dict | None:
        """The latest snapshot's manifest as JSON (blobs are not read), or None."""
        version = self.store.latest_version(model=self.model)
        if version is None:
            return None
        return self.store.manifest(version, model=self.model).as_dict()

    def close(self) -> None:
        self.store.close()

    def _put(self, state: LearnerState, health: dict, watermark: dict, created_at: float, accepted: bool):
        for _ in range(3):
            snapshot = Snapshot(
                model=self.model,
                version=self.next_version,
                parent=self.parent,
                created_at=created_at,
                watermark={"kafka": dict(watermark)},
                config=state.config,
                codebooks=state.codebooks,
                item_codes=state.item_codes,
                weights=state.weights,
                health=health,
            )
            try:
                self.store.put(snapshot, move_latest=accepted)
            except VersionExistsError:
                log.warning(
                    "%s v%d appeared in %s meanwhile; taking the next free version",
                    self.model,
                    self.next_version,
                    self.store_url,
                )
                versions = self.store.versions(model=self.model)
                self.next_version = max(self.next_version, versions[-1]) + 1
                continue
            self.next_version += 1
            return snapshot
        raise VersionExistsError(f"{self.model}: no free version after 3 tries in {self.store_url}")

    def _message(self, snapshot: Snapshot) -> bytes:
        remap = None
        if self._announced is not None:
            from_version, old = self._announced
            r = code_remap(old, snapshot.item_codes)
            if r.changed_items.numel() + r.added_items.numel() <= MAX_REMAP_ITEMS:
                remap = {
                    "from_version": from_version,
                    "changed_items": r.changed_items.tolist(),
                    "old_codes": r.old_codes.tolist(),
                    "new_codes": r.new_codes.tolist(),
                    "added_items": r.added_items.tolist(),
                    "added_codes": r.added_codes.tolist(),
                }
        body = {
            "schema": SCHEMA,
            "model": snapshot.model,
            "version": snapshot.version,
            "parent": snapshot.parent,
            "store": self.store_url,
            "manifest": self.store.manifest(snapshot.version, model=self.model).as_dict(),
            "remap": remap,
        }
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
