"""Follow the codebook-updates topic: verified updates of one model, in version order, optionally mirrored
into a local store.

    with subscribe("127.0.0.1:39092", "codebook-updates", start="latest", store_url="file:///var/sparc/mirror",
                   timeout=None) as updates:
        for update in updates:                  # messages.CodebookUpdate: version, parent, codebooks, manifest,
            cache.migrate(update.remap)         # remap, item_codes (None while unknown), weights (None unless sent)
        updates.stats                           # what was read, yielded, rejected, skipped

What it yields: every update of `model` whose version is higher than the last one yielded. A version seen
again (a re-sent update) counts as a duplicate, a lower one as stale; neither is yielded again. A record or
update that fails verification (messages.py) is logged with its topic, partition and offset, counted in
`stats.rejected`, and skipped: nothing of it is yielded or stored.

Where it starts (the topic is read from its beginning either way, because a remap needs the base version
before it; topic retention bounds that read):
  start=V         yield the updates with version >= V; the ones before only serve as bases
  start="latest"  read up to the end of the topic as it is when subscribing, yield the highest version found
                  there, then every higher one as it arrives

Item codes: an update sends either the whole item -> code table or a remap from a base version. The subscriber
keeps the tables of the last few versions it saw (and looks in `store_url` for others) and rebuilds the table
by applying the remap (messages.CodebookUpdate.with_base), checked against the publisher's manifest sha256. An
update whose base it does not hold is still yielded (codebooks, manifest and remap are verified) with
item_codes None, counted in `stats.unresolved`; the next update that sends the whole table resolves again.

Materialising (`store_url`): each yielded update is put into the store, so the store mirrors the publisher's:
  - item codes and weights both known: the publisher's exact bytes (`put_raw`; the store verifies them again),
    so the mirror holds the very snapshot the worker stored and can warm-start or serve a model;
  - item codes known, weights not sent: a codes-only snapshot with the same version, parent, created_at,
    watermark, config, health, codebooks and (verified) item codes, weights empty, and
    health["materialised"] = {"source": "codebook-updates", "publisher_manifest_sha256", "weights": false}
    saying so. Enough for code -> item lookups and cache migration; a model cannot load it (its weights are
    missing, so trainer.online.load_model / check_compatible with weight shapes refuse it);
  - item codes unknown: nothing is stored (`stats.unmaterialised`).
A version the store already holds is left as it is. Latest moves as `SnapshotStore.put` moves it.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any, Literal

import torch

from codebook_store.errors import (
    CodebookStoreError,
    CorruptSnapshotError,
    IncompatibleSnapshotError,
    SnapshotNotFoundError,
    VersionExistsError,
)
from codebook_store.messages import CodebookUpdate, Reassembler
from codebook_store.snapshot import DEFAULT_MODEL, check_model_name
from codebook_store.store import SnapshotStore, open_store

log = logging.getLogger(__name__)

Start = Literal["latest"] | int


@dataclass
class SubscribeStats:
    """Counters of one subscription (read them while iterating or after)."""

    records: int = 0  # records read from the topic
    repeated_records: int = 0  # records of an update already assembled (the same bytes re-sent): ignored
    updates: int = 0  # updates yielded
    rejected: int = 0  # records or assembled updates that failed verification: skipped, never applied
    duplicates: int = 0  # updates of the version yielded last (or any already yielded)
    stale: int = 0  # updates below one already yielded
    skipped: int = 0  # other models' updates, and ours below `start` or before latest
    unresolved: int = 0  # remaps whose base was not held: yielded with item_codes None
    materialised: int = 0  # updates put into the store
    unmaterialised: int = 0  # yielded updates the store could not take (item codes unknown)


class Follower:
    """The subscriber's decisions, without Kafka: resolve item codes, de-duplicate, filter by start, store.

    `offer(update)` returns the update to yield (item codes resolved when possible) or None.
    `track(update)` only learns the update's item codes as a base (for updates read but not yielded).
    """

    def __init__(self, model: str = DEFAULT_MODEL, start: Start = "latest", store: SnapshotStore | None = None,
                 *, keep_bases: int = 4, stats: SubscribeStats | None = None) -> None:
        if start != "latest" and (isinstance(start, bool) or not isinstance(start, int) or start < 0):
            raise ValueError(f"start must be 'latest' or a version >= 0, got {start!r}")
        self.model, self.start, self.store, self.keep_bases = check_model_name(model), start, store, keep_bases
        self.stats = stats or SubscribeStats()
        self.last: int | None = None  # the last version yielded
        self._bases: dict[int, torch.Tensor] = {}  # version -> item codes, the highest few

    def track(self, update: CodebookUpdate) -> CodebookUpdate:
        """`update` with its item codes rebuilt when its base is held; remembers them as a base."""
        if update.item_codes is None and update.remap_from is not None:
            base = self._bases.get(update.remap_from)
            if base is None:
                base = self._stored_codes(update.remap_from)
            if base is not None:
                try:
                    update = update.with_base(base)
                except IncompatibleSnapshotError as exc:
                    log.warning("%s v%d: %s", update.model, update.version, exc)
        if update.item_codes is not None:
            self._bases[update.version] = update.item_codes
            for version in sorted(self._bases)[: -self.keep_bases]:
                del self._bases[version]
        return update

    def offer(self, update: CodebookUpdate) -> CodebookUpdate | None:
        if update.model != self.model:
            self.stats.skipped += 1
            return None
        update = self.track(update)
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
        if update.item_codes is None:
            self.stats.unresolved += 1
            log.warning("%s v%d: no base v%s held; yielded without item codes", update.model, update.version,
                        update.remap_from)
        if self.store is not None:
            self._materialise(update)
        self.stats.updates += 1
        return update

    def _stored_codes(self, version: int) -> torch.Tensor | None:
        if self.store is None:
            return None
        try:
            return self.store.get(version, model=self.model).item_codes
        except SnapshotNotFoundError:
            return None
        except CorruptSnapshotError as exc:
            log.warning("%s v%d in %s cannot serve as a base: %s", self.model, version, self.store.url, exc)
            return None

    def _materialise(self, update: CodebookUpdate) -> None:
        assert self.store is not None
        if update.item_codes is None:
            self.stats.unmaterialised += 1
            log.warning("%s v%d not stored in %s: item codes unknown", update.model, update.version, self.store.url)
            return
        try:
            if update.complete:
                self.store.put_raw(update.manifest_raw, update.blobs)
            else:
                snap = update.to_snapshot()
                provenance = {"source": "codebook-updates", "weights": False,
                              "publisher_manifest_sha256": hashlib.sha256(update.manifest_raw).hexdigest()}
                self.store.put(replace(snap, health={**snap.health, "materialised": provenance}))
        except VersionExistsError:
            return  # stored earlier (a restarted subscriber); versions are never overwritten
        self.stats.materialised += 1


class Subscription:
    """An iterable over verified updates (see the module doc); iterate once. Closing ends the iteration."""

    def __init__(self, bootstrap: str | list[str], topic: str, model: str = DEFAULT_MODEL, start: Start = "latest",
                 store_url: str | None = None, group_id: str | None = None, timeout: float | None = None,
                 *, kafka_config: Mapping[str, Any] | None = None, poll_ms: int = 200, max_pending: int = 8) -> None:
        self.bootstrap, self.topic, self.group_id, self.timeout = bootstrap, topic, group_id, timeout
        self.kafka_config = dict(kafka_config or {})
        self.poll_ms = poll_ms
        self.stats = SubscribeStats()
        self.store = open_store(store_url) if store_url else None
        self.follower = Follower(model, start, self.store, stats=self.stats)
        self.reassembler = Reassembler(max_pending=max_pending)
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
        while True:
            if catch_up is not None and all(consumer.position(tp) >= end for tp, end in catch_up.items()):
                catch_up = None  # the topic as it was when subscribing is read: its highest version first
                if candidate is not None and (update := self.follower.offer(candidate)) is not None:
                    yield self._yielded(consumer, update)
            batch = consumer.poll(timeout_ms=self.poll_ms)
            if not batch:
                if deadline is not None and time.monotonic() > deadline:
                    return
                continue
            if self.timeout is not None:
                deadline = time.monotonic() + self.timeout
            for _, records in sorted(batch.items()):
                for record in records:
                    update = self._accept(record)
                    if update is None:
                        continue
                    if catch_up is not None:
                        if update.model != self.follower.model:
                            self.stats.skipped += 1
                            continue
                        update = self.follower.track(update)
                        if candidate is not None:
                            self.stats.skipped += 1
                        if candidate is None or update.version >= candidate.version:
                            candidate = update
                    elif (update := self.follower.offer(update)) is not None:
                        yield self._yielded(consumer, update)

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
              store_url: str | None = None, group_id: str | None = None,
              timeout: float | None = None, *, kafka_config: Mapping[str, Any] | None = None) -> Subscription:
    """Verified updates of `model` from `topic`, in version order (see the module doc).

    bootstrap : Kafka bootstrap servers ("host:port" or a list)
    start     : "latest", or a version: yield that one (or the first above it on the topic) and every later one
    store_url : materialise each yielded update into this store (codebook_store.open_store URL)
    group_id  : the consumer group the reader commits its positions under (for lag monitoring); None: none
    timeout   : stop after this many seconds without a record; None: follow until closed
    kafka_config : more kafka-python consumer settings, e.g. security (streams.kafka_connection.KafkaConnection
                   .kafka_python() less bootstrap_servers)
    """
    return Subscription(bootstrap, topic, model, start, store_url, group_id, timeout, kafka_config=kafka_config)
