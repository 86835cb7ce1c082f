"""Follow the codebook-updates topic: verified updates of one model, in version order, optionally mirrored
into a local store. Needs no torch (numpy arrays throughout).

    verifier = load_verifier(["/etc/sparc/updates.pub.pem"])          # or None: updates are not authenticated
    with subscribe("127.0.0.1:39092", "codebook-updates", start="latest", store_url="file:///var/sparc/mirror",
                   verifier=verifier, kafka_config={"security_protocol": "SSL", ...}) as updates:
        for update in updates:                  # messages.CodebookUpdate: version, parent, codebooks, manifest,
            cache.migrate(update.item_remap)    # remap (rows), item_remap (external ids), item_codes and item_ids
                                                # (None while unknown), weights (None unless sent)
        updates.stats                           # what was read, yielded, rejected, refused, skipped

What it yields: every update of `model` whose version is higher than the last one yielded. A version seen
again (a re-sent update) counts as a duplicate, a lower one as stale; neither is yielded again. A record or
update that fails verification (messages.py: checksums, the signature with a verifier, finiteness) is logged
with its topic, partition and offset, counted in `stats.rejected`, and skipped. An update whose version lies more
than `max_version_jump` above the highest version accepted so far (or the mirror's latest) is refused, counted in
`stats.refused`: a forged far-future version cannot make every genuine one look stale. Nothing rejected or
refused is yielded or stored, nor moves what the subscriber takes as latest.

Where it starts (the topic is read from its beginning either way, because a remap needs the base version
before it; the topic's retention bounds that read, docs/codebook-updates.md "Retention"):
  start=V or "earliest"  yield the updates with version >= V (>= 0); the ones before only serve as bases
  start="latest"         read up to the end of the topic as it is when subscribing, yield the highest version
                         found there, then every higher one as it arrives

Item codes and ids: an update sends either the whole item -> code table or a remap from a base version (or
both), and a snapshot's vocabulary (the external id of each row) whole or as a delta against the same base. The
subscriber keeps the tables and vocabularies of the last few versions it saw (and looks in `store_url` for
others) and rebuilds both from the base (messages.CodebookUpdate.with_base), each checked against the publisher's
manifest sha256; with the base held it also reads the remap by ids (`update.item_remap`: ids whose code changed,
ids added, ids removed or evicted). An update whose base it does not hold is still yielded (codebooks, manifest
and remap are verified) with item_codes or item_ids None, counted in `stats.unresolved`; the next update that
sends the whole table resolves again. A base whose vocabulary is unknown (a format-2 snapshot stored without its
item_ids blob) is no base: rows would be taken for ids.

Materialising (`store_url`): each yielded update is put into the store, so the store mirrors the publisher's:
  - every blob known (item codes, vocabulary and weights): the publisher's exact bytes (`put_raw`; the store
    verifies them again), so the mirror holds the very snapshot the worker stored and can warm-start or serve;
  - item codes and ids known, weights not sent: a codes-only snapshot with the same version, parent, created_at,
    watermark, config, health, codebooks and (verified) item codes and vocabulary, weights empty, and
    health["materialised"] = {"source": "codebook-updates", "publisher_manifest_sha256", "weights": false,
    "omitted": [blobs not sent]} saying so. Enough for code -> item lookups and cache migration; a model cannot
    load it (its weights are missing, so trainer.online.load_model / check_compatible refuse it);
  - item codes or ids unknown: nothing is stored (`stats.unmaterialised`).
A version the store already holds is left as it is. Latest moves as `SnapshotStore.put_raw` moves it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import safetensors.numpy

from codebook_store.checks import DEFAULT_MODEL, check_model_name
from codebook_store.drift import ItemId
from codebook_store.errors import (
    CodebookStoreError,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    SnapshotNotFoundError,
    VersionExistsError,
)
from codebook_store.format import (
    ITEM_CODES_BLOB,
    ITEM_IDS_BLOB,
    WEIGHTS_BLOB,
    BlobInfo,
    load_arrays,
    manifest_bytes,
    parse_manifest,
    read_item_ids,
)
from codebook_store.messages import DEFAULT_MAX_PENDING_BYTES, CodebookUpdate, Reassembler
from codebook_store.signing import Verifier
from codebook_store.store import SnapshotStore, open_store

log = logging.getLogger(__name__)

Start = Literal["earliest", "latest"] | int
DEFAULT_MAX_VERSION_JUMP = 10_000
# kafka-python settings the subscription sets itself; `kafka_config` may not override them
_OWN_KAFKA_SETTINGS = frozenset({"bootstrap_servers", "group_id", "enable_auto_commit", "client_id",
                                 "key_deserializer", "value_deserializer"})


@dataclass
class SubscribeStats:
    """Counters of one subscription (read them while iterating or after)."""

    records: int = 0  # records read from the topic
    repeated_records: int = 0  # records of an update already assembled or refused (re-sent): ignored
    updates: int = 0  # updates yielded
    rejected: int = 0  # records or assembled updates that failed verification: skipped, never applied
    refused: int = 0  # verified updates refused by policy (a version jump beyond max_version_jump)
    duplicates: int = 0  # updates of the version yielded last (or any already yielded)
    stale: int = 0  # updates below one already yielded
    skipped: int = 0  # other models' updates, and ours below `start` or before latest
    unresolved: int = 0  # remaps whose base was not held: yielded with item_codes or item_ids None
    materialised: int = 0  # updates put into the store
    unmaterialised: int = 0  # yielded updates the store could not take (item codes or ids unknown)


class Follower:
    """The subscriber's decisions, without Kafka: bound version jumps, resolve item codes and ids, de-duplicate,
    filter by start, store.

    `offer(update)` returns the update to yield (resolved against its base when possible) or None.
    `track(update)` only checks the jump and learns the update's item codes and ids as a base (for updates read
    but not yielded); it returns the update, resolved when possible, or None when refused.
    """

    def __init__(self, model: str = DEFAULT_MODEL, start: Start = "latest", store: SnapshotStore | None = None,
                 *, keep_bases: int = 4, max_version_jump: int = DEFAULT_MAX_VERSION_JUMP,
                 stats: SubscribeStats | None = None) -> None:
        if start == "earliest":
            start = 0
        if start != "latest" and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"start must be 'earliest', 'latest' or a version >= 0, got {start!r}")
        if max_version_jump < 1:
            raise ValueError(f"max_version_jump must be >= 1, got {max_version_jump}")
        self.model, self.start, self.store, self.keep_bases = check_model_name(model), start, store, keep_bases
        self.max_version_jump = max_version_jump
        self.stats = stats or SubscribeStats()
        self.last: int | None = None  # the last version yielded
        # the highest version accepted so far (read and verified, or the mirror's latest): what jumps are bound to
        self.reference: int | None = None if store is None else store.latest_version(model=self.model)
        self._bases: dict[int, tuple[np.ndarray, tuple[ItemId, ...]]] = {}  # version -> (codes, ids), highest few

    def track(self, update: CodebookUpdate) -> CodebookUpdate | None:
        if self.reference is not None and update.version > self.reference + self.max_version_jump:
            self.stats.refused += 1
            log.error("%s v%d refused: more than max_version_jump=%d above v%d, the highest accepted (a forged or "
                      "misconfigured publisher?)", update.model, update.version, self.max_version_jump,
                      self.reference)
            return None
        self.reference = max(update.version, -1 if self.reference is None else self.reference)
        if update.remap_from is not None:
            base = self._bases.get(update.remap_from)
            if base is None:
                base = self._stored_base(update.remap_from)
            if base is not None:
                try:
                    update = update.with_base(*base)
                except IncompatibleSnapshotError as exc:
                    log.warning("%s v%d: %s", update.model, update.version, exc)
        if _resolved(update):
            self._bases[update.version] = (update.item_codes, update.item_ids)
            for version in sorted(self._bases)[: -self.keep_bases]:
                del self._bases[version]
        return update

    def offer(self, update: CodebookUpdate) -> CodebookUpdate | None:
        if update.model != self.model:
            self.stats.skipped += 1
            return None
        tracked = self.track(update)
        if tracked is None:
            return None
        update = tracked
        if self.last is not None and update.version <= self.last:
            if update.version == self.last:
                self.stats.duplicates += 1
            else:
                self.stats.stale += 1
            return None
        if self.start != "latest" and update.version < self.start:
            self.stats.skipped += 1
            return None
        self.last = update.version
        if not _resolved(update):
            self.stats.unresolved += 1
            log.warning("%s v%d: no base v%s held; yielded without item codes or ids", update.model, update.version,
                        update.remap_from)
        if self.store is not None:
            self._materialise(update)
        self.stats.updates += 1
        return update

    def _stored_base(self, version: int) -> tuple[np.ndarray, tuple[ItemId, ...] | None] | None:
        """(item codes, ids; None: row i is item i) of a version in the store, or None when it cannot serve."""
        if self.store is None:
            return None
        try:
            raw, blobs = self.store.read_raw(version, model=self.model)
            manifest = parse_manifest(raw)
            codes = load_arrays(manifest, ITEM_CODES_BLOB, blobs.get(ITEM_CODES_BLOB))["item_codes"]
            if ITEM_IDS_BLOB in manifest.blobs:
                data = load_arrays(manifest, ITEM_IDS_BLOB, blobs[ITEM_IDS_BLOB])["item_ids"].tobytes()
                return codes, read_item_ids(data, manifest)
        except SnapshotNotFoundError:
            return None
        except CorruptSnapshotError as exc:
            log.warning("%s v%d in %s cannot serve as a base: %s", self.model, version, self.store.url, exc)
            return None
        if manifest.format_version >= 2:  # a vocabulary stored without its blob: its rows are not its ids
            log.warning("%s v%d in %s cannot serve as a base: its vocabulary is not stored", self.model, version,
                        self.store.url)
            return None
        return codes, None

    def _materialise(self, update: CodebookUpdate) -> None:
        assert self.store is not None
        if not _resolved(update):
            self.stats.unmaterialised += 1
            log.warning("%s v%d not stored in %s: item codes or ids unknown", update.model, update.version,
                        self.store.url)
            return
        try:
            self.store.put_raw(*(update_bytes(update) if update.complete else codes_only_bytes(update)))
        except VersionExistsError:
            return  # stored earlier (a restarted subscriber); versions are never overwritten
        self.stats.materialised += 1


def _resolved(update: CodebookUpdate) -> bool:
    """Item codes and ids known: the update names every item's codes."""
    return update.item_codes is not None and update.item_ids is not None


def update_bytes(update: CodebookUpdate) -> tuple[bytes, dict[str, bytes]]:
    """The publisher's stored bytes of a complete update: (manifest, {blob name: bytes})."""
    return update.manifest_raw, {name: update.blobs[name] for name in update.manifest.blobs}


def codes_only_bytes(update: CodebookUpdate) -> tuple[bytes, dict[str, bytes]]:
    """A snapshot's bytes from an update whose item codes are known but some blobs (the weights) were not sent:
    the blobs sent, an empty weights blob, and a manifest listing those, with health["materialised"] saying so."""
    m = update.manifest
    blobs = {name: update.blobs[name] for name in m.blobs if name in update.blobs}
    omitted = sorted(set(m.blobs) - set(blobs))
    blobs.setdefault(WEIGHTS_BLOB, safetensors.numpy.save({}))
    provenance = {"source": "codebook-updates", "weights": WEIGHTS_BLOB not in omitted, "omitted": omitted,
                  "publisher_manifest_sha256": hashlib.sha256(update.manifest_raw).hexdigest()}
    manifest = replace(
        m,
        health={**m.health, "materialised": provenance},
        tensors={name: t for name, t in m.tensors.items() if t.blob in update.blobs},
        blobs={name: BlobInfo(hashlib.sha256(data).hexdigest(), len(data)) for name, data in blobs.items()},
    )
    return manifest_bytes(manifest), blobs


class Subscription:
    """An iterable over verified updates (see the module doc); iterate once. Closing ends the iteration."""

    def __init__(self, bootstrap: str | list[str], topic: str, model: str = DEFAULT_MODEL, start: Start = "latest",
                 store_url: str | None = None, group_id: str | None = None, timeout: float | None = None,
                 *, verifier: Verifier | None = None, max_version_jump: int = DEFAULT_MAX_VERSION_JUMP,
                 kafka_config: Mapping[str, Any] | None = None, poll_ms: int = 200, max_pending: int = 8,
                 max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES) -> None:
        clash = sorted(_OWN_KAFKA_SETTINGS & set(kafka_config or {}))
        if clash:
            raise ValueError(f"kafka_config may not set {', '.join(clash)} (the subscription sets them)")
        self.bootstrap, self.topic, self.group_id, self.timeout = bootstrap, topic, group_id, timeout
        self.kafka_config, self.poll_ms = dict(kafka_config or {}), poll_ms
        self.stats = SubscribeStats()
        self.store = open_store(store_url) if store_url else None
        self.follower = Follower(model, start, self.store, max_version_jump=max_version_jump, stats=self.stats)
        self.reassembler = Reassembler(verifier=verifier, max_pending=max_pending,
                                       max_pending_bytes=max_pending_bytes)
        if verifier is None:
            log.warning("codebook updates on %r are not authenticated: no verification key configured", topic)
        self._consumer: Any = None

    def __iter__(self) -> Iterator[CodebookUpdate]:
        try:
            yield from self._follow()
        finally:
            self.close()

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        if self.store is not None:
            self.store.close()
            self.store = self.follower.store = None

    def _follow(self) -> Iterator[CodebookUpdate]:
        from kafka import KafkaConsumer, TopicPartition  # Kafka stays at this edge of the package

        deadline = None if self.timeout is None else time.monotonic() + self.timeout
        consumer = self._consumer = KafkaConsumer(
            bootstrap_servers=self.bootstrap, group_id=self.group_id, enable_auto_commit=False,
            client_id=f"sparc-subscribe-{self.follower.model}", **self.kafka_config,
        )
        partitions = consumer.partitions_for_topic(self.topic)
        while not partitions:
            if deadline is not None and time.monotonic() > deadline:
                log.warning("topic %r has no partitions on %s; nothing to follow", self.topic, self.bootstrap)
                return
            time.sleep(self.poll_ms / 1000)
            partitions = consumer.partitions_for_topic(self.topic)
        assigned = [TopicPartition(self.topic, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        consumer.seek_to_beginning(*assigned)
        catch_up = consumer.end_offsets(assigned) if self.follower.start == "latest" else None
        candidate: CodebookUpdate | None = None
        active = time.monotonic()  # idle time counts from the last record handled (and the caller's last turn)
        while True:
            if catch_up is not None and all(consumer.position(tp) >= end for tp, end in catch_up.items()):
                catch_up = None  # the topic as it was when subscribing is read: its highest version first
                if candidate is not None and (update := self.follower.offer(candidate)) is not None:
                    yield self._yielded(consumer, update)
                    active = time.monotonic()
            batch = consumer.poll(timeout_ms=self.poll_ms)
            if not batch:
                if self.timeout is not None and time.monotonic() - active > self.timeout:
                    return
                continue
            for _, records in sorted(batch.items()):
                for record in records:
                    update = self._accept(record)
                    if update is None:
                        continue
                    if catch_up is not None:
                        if update.model != self.follower.model:
                            self.stats.skipped += 1
                            continue
                        tracked = self.follower.track(update)
                        if tracked is None:
                            continue
                        if candidate is not None:
                            self.stats.skipped += 1
                        if candidate is None or tracked.version >= candidate.version:
                            candidate = tracked
                    elif (update := self.follower.offer(update)) is not None:
                        yield self._yielded(consumer, update)
            active = time.monotonic()

    def _accept(self, record: Any) -> CodebookUpdate | None:
        self.stats.records += 1
        try:
            return self.reassembler.accept(record.key, record.value, record.headers)
        except CodebookStoreError as exc:
            self.stats.rejected += 1
            log.error("rejected a codebook-updates record at %s[%d]@%d: %s", record.topic, record.partition,
                      record.offset, exc)
            return None
        finally:
            self.stats.repeated_records = self.reassembler.repeated

    def _yielded(self, consumer: Any, update: CodebookUpdate) -> CodebookUpdate:
        if self.group_id is not None:
            consumer.commit()  # positions read so far, for lag monitoring; never used to choose the start
        return update


def subscribe(bootstrap: str | list[str], topic: str, model: str = DEFAULT_MODEL, start: Start = "latest",
              store_url: str | None = None, group_id: str | None = None, timeout: float | None = None, *,
              verifier: Verifier | None = None, max_version_jump: int = DEFAULT_MAX_VERSION_JUMP,
              kafka_config: Mapping[str, Any] | None = None) -> Subscription:
    """Verified updates of `model` from `topic`, in version order (see the module doc).

    bootstrap        : Kafka bootstrap servers ("host:port" or a list)
    start            : "latest", "earliest", or a version: yield that one (or the first above it on the topic)
                       and every later one
    store_url        : materialise each yielded update into this store (codebook_store.open_store URL)
    group_id         : the consumer group the reader commits its positions under (for lag monitoring); None: none
    timeout          : stop after this many seconds without a record; None: follow until closed
    verifier         : accept only updates signed by one of its keys (signing.load_verifier); None: any
    max_version_jump : refuse an update more than this many versions above the highest one accepted
    kafka_config     : extra kafka-python consumer settings (security_protocol, sasl_*, ssl_*, ...)
    """
    return Subscription(bootstrap, topic, model, start, store_url, group_id, timeout, verifier=verifier,
                        max_version_jump=max_version_jump, kafka_config=kafka_config)
