"""`sparc subscribe`: follow the codebook-updates topic, verify every update, mirror the versions into a store
and/or print one JSON line per version. Needs only the subscriber install (no torch): numpy, safetensors,
kafka-python, cryptography.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import Any

from sparc_stream.cli.errors import UserError

DEFAULT_BROKER = "127.0.0.1:39092"

_DESCRIPTION = """\
Follow a codebook-updates topic as a subscriber service would: reassemble each update, verify its checksums,
its signature (with --verify-key), finiteness and version, rebuild the item codes from remaps, and print one
line per version (JSON with --jsonl) and/or mirror each version into a store (--to-store), so a serving fleet
can follow one learner. The contract every subscriber follows, in any language: docs/codebook-updates.md.

--from: 'latest' (default) yields the highest version on the topic, then each new one; 'earliest' every version
on the topic; a VERSION that one (or the first above it) and every later one. The topic is read from its
beginning in every case (a remap needs its base); retention bounds that read.

Runs until interrupted (Ctrl-C), or until --idle-timeout seconds pass without a record. Rejected records and
refused updates are logged on stderr with their reason and never applied; a summary goes to stderr at the end."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "subscribe",
        help="follow codebook-updates: verify, mirror into a store and/or print one JSON line per version",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--broker", default=None,
                   help="Kafka bootstrap servers host:port[,host:port] (default: the --config file's or SPARC_BROKER "
                   "with --config, else 127.0.0.1:39092)")
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="the workers' TOML settings file: its [kafka] settings (servers, security protocol, SASL, "
                   "TLS; secrets from their files or SPARC_* variables) connect this subscriber as they connect the "
                   "workers. Needs the full install; the subscriber install takes --kafka-config")
    p.add_argument("--topic", default="codebook-updates", help="the updates topic (default codebook-updates)")
    p.add_argument("--model", default="sparc", help="the model whose updates to follow (default sparc)")
    p.add_argument("--from", dest="start", default="latest", metavar="earliest|latest|VERSION",
                   help="where to start (default latest)")
    p.add_argument("--to-store", metavar="URL",
                   help="mirror every version into this store: file://DIR, rocksdb://PATH or memory://")
    p.add_argument("--jsonl", action="store_true", help="print one JSON object per version (default: a line of text)")
    p.add_argument("--verify-key", action="append", type=Path, default=[], metavar="FILE",
                   help="accept only updates signed with this key: an Ed25519 public key (PEM) or an HMAC-SHA256 "
                   "shared key file; repeat during a key rotation (default: signatures are not checked)")
    p.add_argument("--max-version-jump", type=int, default=None, metavar="N",
                   help="refuse an update more than N versions above the highest one accepted (default 10000)")
    p.add_argument("--kafka-config", type=Path, metavar="FILE",
                   help="a JSON object of extra kafka-python consumer settings (security_protocol, sasl_*, ssl_*); "
                   "with --config, these override its settings")
    p.add_argument("--group-id", help="commit read positions under this consumer group (for lag monitoring)")
    p.add_argument("--idle-timeout", type=float, default=None, metavar="SECONDS",
                   help="stop after this long without a record (default: follow until interrupted)")
    p.set_defaults(func=run)


def parse_start(text: str) -> str | int:
    if text in ("earliest", "latest"):
        return text
    if text.isdigit():
        return int(text)
    raise UserError(f"--from must be earliest, latest or a version >= 0, got {text!r}")


def read_kafka_config(path: Path | None) -> dict[str, Any]:
    """The extra kafka-python settings of a JSON file (never echoed: it may hold passwords)."""
    if path is None:
        return {}
    try:
        config = json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"cannot read --kafka-config {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise UserError(f"--kafka-config {path} is not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise UserError(f"--kafka-config {path} must hold a JSON object of kafka-python settings")
    return config


def connection(args: argparse.Namespace) -> tuple[str | list[str], dict[str, Any]]:
    """The bootstrap servers and kafka-python settings: --broker and --kafka-config alone, or, with --config, the
    workers' own connection settings (flags, then SPARC_* variables, then the file: streams.settings) under
    --kafka-config's."""
    extra = read_kafka_config(args.kafka_config)
    if args.config is None:
        return args.broker or DEFAULT_BROKER, extra
    from sparc_stream.cli.worker import build_settings  # the full install's (pydantic): only with --config
    from streams.kafka_connection import KafkaConfigError

    settings = build_settings(args.config, broker=args.broker)
    try:
        config = settings.kafka_connection().kafka_python()
    except KafkaConfigError as exc:
        raise UserError(str(exc)) from None
    return config.pop("bootstrap_servers"), {**config, **extra}


def describe(update: Any, stored: bool | None) -> dict[str, Any]:
    """One version as the JSON line `--jsonl` prints: identity, lineage, what was sent or rebuilt, the remap's
    counts by row and by item, the vocabulary, and the sha256 of every tensor known (the raw little-endian bytes;
    "item_ids" is the vocabulary's JSON), so two subscribers can compare their state."""
    from codebook_store.format import item_ids_json

    arrays: dict[str, Any] = {"codebooks": update.codebooks}
    if update.item_codes is not None:
        arrays["item_codes"] = update.item_codes
    vocabulary = None  # the snapshot has none: row i is item i
    if "item_ids" in update.manifest.tensors:
        vocabulary = {"known": update.item_ids is not None, "sent": update.vocabulary_sent,
                      "delta_rows": None if update.ids_delta is None else int(update.ids_delta.rows.size)}
        if update.item_ids is not None:
            text = item_ids_json(update.item_ids)
            arrays["item_ids"] = text
            vocabulary.update(sha256=hashlib.sha256(text).hexdigest(), bytes=len(text),
                              strings=sum(isinstance(item, str) for item in update.item_ids))
    arrays.update(update.weights or {})
    remap, by_id = update.remap, update.item_remap
    return {
        "model": update.model,
        "version": update.version,
        "parent": update.parent,
        "created_at": update.created_at,
        "remap_from": update.remap_from,
        "changed_items": None if remap is None else int(remap.changed_items.size),
        "added_items": None if remap is None else int(remap.added_items.size),
        "removed_items": None if remap is None else int(remap.removed_items.size),
        "ids_changed": None if by_id is None else len(by_id.changed),
        "ids_added": None if by_id is None else len(by_id.added),
        "ids_removed": None if by_id is None else len(by_id.removed),
        "rows_reused": None if by_id is None else int(by_id.reused_rows.size),
        "num_items": update.num_items,
        "vocabulary": vocabulary,
        "item_codes_known": update.item_codes is not None,
        "weights_sent": update.weights is not None,
        "complete": update.complete,
        "stored": stored,
        "update_sha256": update.sha256,
        "signed_by": update.signed_by,
        "tensor_sha256": {name: hashlib.sha256(_bytes(a)).hexdigest() for name, a in sorted(arrays.items())},
    }


def _bytes(array: Any) -> bytes:
    return array if isinstance(array, bytes) else array.tobytes()


def text_line(row: dict[str, Any]) -> str:
    lineage = "whole table" if row["remap_from"] is None else (
        f"remap from v{row['remap_from']}: {row['changed_items']} changed, {row['added_items']} added, "
        f"{row['removed_items']} removed")
    if row["ids_changed"] is not None:
        lineage += (f"; by item: {row['ids_changed']} changed, {row['ids_added']} added, {row['ids_removed']} "
                    f"removed, {row['rows_reused']} rows reused")
    vocab = row["vocabulary"]
    if vocab is not None:
        lineage += f", vocabulary {vocab['sent'] or 'not sent'}"
        if vocab["delta_rows"] is not None:
            lineage += f" ({vocab['delta_rows']} rows)"
        lineage += f" sha256 {vocab['sha256'][:12]}" if vocab["known"] else " unknown"
    codes = "" if row["item_codes_known"] else ", item codes unknown (no base held)"
    signed = f", signed by {row['signed_by']}" if row["signed_by"] else ""
    stored = {None: "", True: ", stored", False: ", not stored"}[row["stored"]]
    return f"{row['model']} v{row['version']}: {row['num_items']} items, {lineage}{codes}{signed}{stored}"


def run(args: argparse.Namespace) -> int:
    from codebook_store import CodebookStoreError, load_verifier, subscribe
    from codebook_store.subscribe import DEFAULT_MAX_VERSION_JUMP

    logging.basicConfig(level=logging.WARNING, format="sparc subscribe: %(levelname)s %(message)s", stream=sys.stderr)
    start = parse_start(args.start)
    bootstrap, kafka_config = connection(args)
    jump = DEFAULT_MAX_VERSION_JUMP if args.max_version_jump is None else args.max_version_jump
    if jump < 1:
        raise UserError("--max-version-jump must be >= 1")
    if args.idle_timeout is not None and args.idle_timeout <= 0:
        raise UserError("--idle-timeout must be > 0")
    try:
        verifier = load_verifier(args.verify_key) if args.verify_key else None
        subscription = subscribe(bootstrap, args.topic, args.model, start, store_url=args.to_store,
                                 group_id=args.group_id, timeout=args.idle_timeout, verifier=verifier,
                                 max_version_jump=jump, kafka_config=kafka_config)
    except (CodebookStoreError, ValueError) as exc:
        raise UserError(str(exc)) from None
    try:
        follow(subscription, args.jsonl, args.to_store is not None)
    finally:
        s = subscription.stats
        print(f"sparc subscribe: {s.records} records read; {s.updates} versions yielded, {s.materialised} stored, "
              f"{s.rejected} rejected, {s.refused} refused, {s.unresolved} without item codes, "
              f"{s.duplicates + s.stale} duplicate or stale", file=sys.stderr)
    return 0


def follow(subscription: Any, jsonl: bool, storing: bool) -> None:
    from kafka.errors import KafkaConfigurationError, KafkaError

    try:
        for update in subscription:  # a version with its item codes known is in the store (now or before)
            row = describe(update, stored=(update.item_codes is not None) if storing else None)
            print(json.dumps(row, sort_keys=True) if jsonl else text_line(row), flush=True)
    except KafkaConfigurationError as exc:
        raise UserError(f"bad Kafka setting: {exc}") from None
    except KafkaError as exc:
        raise UserError(f"Kafka at {subscription.bootstrap}: {exc}") from None
