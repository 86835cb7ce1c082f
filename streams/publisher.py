"""Snapshots out of the worker: the health gate, the codebook store and the codebook-updates records.

This is the worker's only module that imports codebook_store; everything the store's API means to the worker
is here.

Versions: the next version is one above the highest the store holds for the model (so a restarted worker
never reuses one; a version that appears meanwhile raises VersionExistsError and the next free one is taken).
`parent` is the previous snapshot this worker made (its training lineage), None for its first, unless the
worker warm-started: then the snapshot it started from (`warm_start`).
A snapshot the gate (streams.gate) rejects is stored for inspection but latest does not move and nothing is
announced.

Warm start (`warm_start`): the latest snapshot, verified. When it fails verification (a blob's checksum, a torn
manifest, a latest pointer that names nothing), on_corrupt="fallback" takes the newest earlier version that the
gate passed and that verifies, rolls latest back to it (so readers of the store stop meeting the bad one) and
names every version it passed over; on_corrupt="refuse" raises, naming the bad version and the one to roll back to.

Retention: with keep_versions N (streams.settings), each put is followed by a prune that keeps the N highest
versions and latest (codebook_store's prune), so the store holds at most N + 1 versions of the model however long
the learner runs; the highest version always stays, so a restarted learner never reuses a number.

Fencing: a learner claims the model in the store before it writes (`claim`: streams.learning), and every put
and latest move then carries its epoch; once another learner has claimed the model, a put raises
codebook_store.FencedError and stores nothing (codebook_store.store's module doc).

codebook-updates: an accepted snapshot is announced as codebook_store.messages records (docs/codebook-updates.md;
key = the model name, one or more chunks under `max_message_bytes` each): the manifest, the codebooks and the
remap from the previously ANNOUNCED version (what subscribers hold; a rejected snapshot never reached them).
The first announcement of this worker, and every `full_codes_every`-th, also carries the whole item -> code
table, so a subscriber that missed a version (or joins after retention removed the first) catches up there.
Weights travel only with `announce_weights` (subscribers then hold the exact stored snapshot; see
codebook_store.subscribe). With a `signing_key` every update is signed (codebook_store.signing).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from codebook_store import (
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    Snapshot,
    SnapshotNotFoundError,
    VersionExistsError,
    code_drift,
    load_signer,
    open_store,
)
from codebook_store.messages import DEFAULT_MAX_BYTES, Record, encode
from streams.gate import GateThresholds, Refusal, gate, verdict
from trainer.config import SparcConfig
from trainer.online import LearnerState, config_differences

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Published:
    version: int
    created_at: float
    accepted: bool  # latest moved to it; announce `messages` and serve it
    refusals: list[Refusal]  # why the gate rejected it (empty when accepted)
    messages: list[Record]  # codebook-updates records, in order (none when rejected)

    @property
    def reasons(self) -> list[str]:
        return [r.detail for r in self.refusals]


@dataclass(frozen=True)
class WarmStart:
    """The snapshot a warm start continues, and the versions passed over on the way (one line each: why)."""

    snapshot: Snapshot
    passed_over: list[str]


class Publisher:
    """Owns the store handle; call `publish` from one thread at a time (the worker serialises it)."""

    def __init__(
        self,
        store_url: str,
        model: str,
        thresholds: GateThresholds,
        *,
        max_message_bytes: int = DEFAULT_MAX_BYTES,
        full_codes_every: int = 10,
        announce_weights: bool = False,
        signing_key: Path | None = None,
        read_only: bool = False,
        keep_versions: int = 0,
    ):
        """read_only: only warm starts read the store (a data-parallel rank other than 0; nothing is published).
        keep_versions: after each put, delete the model's versions beyond the `keep_versions` highest (latest and
        the highest always stay, so versions never repeat); 0 keeps every version."""
        if full_codes_every < 1:
            raise ValueError(f"full_codes_every must be >= 1, got {full_codes_every}")
        if keep_versions < 0:
            raise ValueError(f"keep_versions must be >= 0, got {keep_versions}")
        self.keep_versions = keep_versions
        self.store_url, self.model, self.thresholds = store_url, model, thresholds
        self.max_message_bytes, self.full_codes_every = max_message_bytes, full_codes_every
        self.announce_weights = announce_weights
        self.signer = None if signing_key is None else load_signer(signing_key)  # raises KeyFileError
        if self.signer is not None:
            log.info("codebook updates are signed with %s key %s", self.signer.scheme, self.signer.key_id)
        self.store = open_store(store_url, read_only=read_only)
        self.epoch: int | None = None  # the writer epoch claimed (claim); None: unfenced
        versions = self.store.versions(model=model)
        self.next_version = versions[-1] + 1 if versions else 0
        self.parent: int | None = None
        # (item codes, codebooks, item ids) of parent: drift compares items, not rows
        self._previous: tuple[torch.Tensor, torch.Tensor, tuple | None] | None = None
        self._announced: Snapshot | None = None  # the last announced snapshot (no weights): the remap's base
        self._announcements = 0

    def publish(self, state: LearnerState, health: dict, watermark: dict, created_at: float) -> Published:
        refusals = gate(health, self.thresholds, int(state.config["codes"]))
        health = {**health, "gate": verdict(refusals)}
        if self._previous is not None:
            codes, books, ids = self._previous
            health["drift"] = {
                "parent_version": self.parent,
                **code_drift(codes, state.item_codes, books, state.codebooks, ids, state.item_ids),
            }
        snapshot = self._put(state, health, watermark, created_at, accepted=not refusals)
        self._prune()
        self.parent = snapshot.version
        self._previous = (state.item_codes, state.codebooks, state.item_ids)
        messages = []
        if not refusals:
            messages = self._messages(snapshot)
            self._announced = replace(snapshot, weights={})
        return Published(
            version=snapshot.version,
            created_at=created_at,
            accepted=not refusals,
            refusals=refusals,
            messages=messages,
        )

    def claim(self, holder: str) -> int:
        """Become the one writer of this model in the store (fencing the writer before, if any): every later
        put and latest move carries the epoch returned, and fails with FencedError once another claim follows."""
        self.epoch = self.store.claim_writer(holder, model=self.model)
        return self.epoch

    def warm_start(self, cfg: SparcConfig, on_corrupt: str = "fallback", version: int | None = None
                   ) -> WarmStart | None:
        """The latest snapshot of this model (verified), or with a corrupt latest what `on_corrupt` says (module
        doc); None when the store has none. `version`: that version instead (the one rank 0 of a data-parallel
        group chose). This publisher then continues its lineage (the next snapshot's
        parent, drift and remap are relative to it). Raises CorruptSnapshotError when no version can be used (or
        on_corrupt="refuse"), IncompatibleSnapshotError when the model differs from `cfg` in anything but the
        item table's size."""
        found = self._verified_latest(on_corrupt) if version is None else WarmStart(
            self.store.get(version, model=self.model), [])
        if found is None:
            return None
        snapshot, version = found.snapshot, found.snapshot.version
        try:
            differences = config_differences(snapshot.config, cfg)
        except (TypeError, ValueError) as exc:  # a config this code cannot read (another model's, a newer one)
            differences = [f"unreadable config: {exc}"]
        if differences:
            raise IncompatibleSnapshotError(
                f"cannot warm-start from {self.model} v{version} in {self.store_url}: its model differs from the "
                f"worker's in {', '.join(differences)} (set the worker's SPARC_* model settings to match, or start "
                "with --no-warm-start)",
                differences,
            )
        self.parent = version
        self._previous = (snapshot.item_codes, snapshot.codebooks, snapshot.item_ids)
        self._announced = replace(snapshot, weights={})
        return found

    def _verified_latest(self, on_corrupt: str) -> WarmStart | None:
        bad: list[str] = []
        try:
            latest = self.store.latest_version(model=self.model)
            if latest is None:
                return None
            return WarmStart(self.store.get(latest, model=self.model), [])
        except (CorruptSnapshotError, SnapshotNotFoundError) as exc:  # a bad blob or manifest, a bad pointer
            bad.append(str(exc))
            latest = getattr(exc, "version", None) if isinstance(exc, CorruptSnapshotError) else None
        where = f"{self.model} in {self.store_url}"
        good, passed_over = self.store.fallback(below=latest, model=self.model)
        if on_corrupt != "fallback":
            hint = f"roll back with `sparc snapshots rollback {good.version} --store {self.store_url}`" if good \
                else "no earlier version verifies either; start with --no-warm-start"
            raise CorruptSnapshotError(
                f"the latest snapshot of {where} fails verification: {bad[0]}; the worker refuses to start "
                f"(on_corrupt=refuse): {hint}, or use --on-corrupt fallback", kind="latest", model=self.model)
        bad += passed_over
        if good is None:
            raise CorruptSnapshotError(
                f"no snapshot of {where} to warm-start from: {'; '.join(bad)} (start with --no-warm-start)",
                kind="latest", model=self.model)
        if not self.store.read_only:
            self.store.set_latest(good.version, model=self.model, epoch=self.epoch)
        return WarmStart(good, bad)

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
                item_ids=state.item_ids,
            )
            try:
                self.store.put(snapshot, move_latest=accepted, epoch=self.epoch)
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

    def _prune(self) -> None:
        """Retention (keep_versions): the store stays bounded however long the learner runs. A failure is logged
        and retried after the next put; it never stops publishing."""
        if not self.keep_versions:
            return
        try:
            deleted = self.store.prune(keep_last=self.keep_versions, model=self.model)
        except Exception as exc:  # e.g. a full disk or a reader's lock; the next put tries again
            log.warning("could not prune %s in %s: %s", self.model, self.store_url, exc)
            return
        if deleted:
            log.debug("pruned %s versions %d..%d (keep_versions=%d)", self.model, deleted[0], deleted[-1],
                      self.keep_versions)

    def _messages(self, snapshot: Snapshot) -> list[Record]:
        full = self._announcements % self.full_codes_every == 0
        self._announcements += 1
        return encode(
            snapshot,
            self._announced,
            self.max_message_bytes,
            full_codes=full,
            with_weights=self.announce_weights,
            signer=self.signer,
        )
