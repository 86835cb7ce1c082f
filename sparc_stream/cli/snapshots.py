"""`sparc snapshots`: list, show, verify, diff, roll back and export the versions in a codebook store.

Read commands open the store read-only (for rocksdb:// a secondary instance, so they work beside a running
worker); `rollback` opens it for writing. `show`, `verify` and `export` verify every checksum; `list` reads
manifests, and the latest version's blobs too, so a corrupt latest is flagged where an operator looks first.
Store errors become one line on stderr and exit status 2; `verify` exits 1 when a version fails.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from codebook_store import DEFAULT_MODEL, CodebookStoreError, SnapshotStore, open_store
from codebook_store.store import VersionInfo
from sparc_stream.cli.errors import UserError

LATEST = "latest"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `snapshots` and its actions to the top-level parser."""
    parser = subparsers.add_parser(
        "snapshots",
        help="list, show, diff, roll back and export codebook snapshots",
        description="Inspect and manage the versioned codebook snapshots in a store "
        "(rocksdb://PATH, file://DIR or memory://).",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--store", required=True, metavar="URL", help="the store: rocksdb://PATH, file://DIR or memory://"
    )
    common.add_argument("--model", default=DEFAULT_MODEL, help=f"model name (default: {DEFAULT_MODEL})")
    common.add_argument("--json", action="store_true", help="print JSON instead of text")

    def add(name: str, func: Callable[[argparse.Namespace], int], summary: str, details: str):
        sub = actions.add_parser(name, parents=[common], help=summary, description=f"{summary}. {details}")
        sub.set_defaults(func=func)
        return sub

    add("list", _list, "list the versions of a model",
        "Reads manifests, and verifies the latest version's blobs; '*' marks latest, '!' a version that fails "
        "verification (its problem in the HEALTH column). `verify` checks every version's blobs.")
    add("verify", _verify, "verify every version of a model",
        "Reads every version's manifest and blobs and checks sizes, sha256s and tensor shapes: one line per "
        "version, and the latest pointer. Exits 1 if any fails (naming the version a worker's warm start falls "
        "back to when the latest fails), else 0.")
    show = add(
        "show",
        _show,
        "show one version's manifest",
        "Reads and verifies every blob's size and sha256 first; exits 2 naming the bad blob if one fails.",
    )
    show.add_argument("version", type=_version, help="a version number or 'latest'")
    diff = add(
        "diff",
        _diff,
        "compare two versions",
        "Counts items whose full code changed from A to B, per-level change shares and codeword movement.",
    )
    diff.add_argument("a", type=_version, help="the older version (number or 'latest')")
    diff.add_argument("b", type=_version, help="the newer version (number or 'latest')")
    diff.add_argument("--limit", type=int, default=10, help="changed items to print in text mode (default 10)")
    diff.add_argument("--items", action="store_true", help="with --json: include every changed/added item")
    rollback = add(
        "rollback",
        _rollback,
        "point latest at a stored version",
        "The version is verified in full first. Not a freeze: a later publish of a higher version "
        "moves latest again. Needs write access (for rocksdb://, no running worker holding the database).",
    )
    rollback.add_argument("version", type=int, help="the version latest should point to")
    export = add(
        "export",
        _export,
        "copy one version to a directory",
        "Writes DIR/<model>/<version>/manifest.json and its blobs (the file:// store layout, so "
        "file://DIR opens it), byte for byte as stored, after verifying every checksum.",
    )
    export.add_argument("version", type=_version, help="a version number or 'latest'")
    export.add_argument("dir", type=Path, help="target directory (created if missing)")


# --- actions ---
def _list(args: argparse.Namespace) -> int:
    with _open(args.store, read_only=True) as store:
        infos = _call(store.list, model=args.model)
        latest = next((info for info in infos if info.is_latest and info.problem is None), None)
        if latest is not None:  # the version readers get: verify its blobs too
            problem = _problem(store, latest.version, args.model)
            infos = [replace(info, problem=problem) if info is latest else info for info in infos]
    if args.json:
        _print_json([info.as_dict() for info in infos])
    elif not infos:
        print(f"no snapshots of model {args.model!r} in {args.store}")
    else:
        print(
            _table(
                ["", "VERSION", "PARENT", "CREATED (UTC)", "ITEMS", "SIZE", "HEALTH"],
                [_list_row(info) for info in infos],
            )
        )
        bad = next((info for info in infos if info.is_latest and info.problem), None)
        if bad is not None:
            print(f"latest (v{bad.version}) fails verification; a worker warm-starting with --on-corrupt fallback "
                  f"continues from the newest earlier version that verifies (`sparc snapshots verify` names it)")
    return 0


def _verify(args: argparse.Namespace) -> int:
    with _open(args.store, read_only=True) as store:
        versions = _call(store.versions, model=args.model)
        results = {v: _problem(store, v, args.model) for v in versions}
        try:
            latest, pointer = store.latest_version(model=args.model), None
        except CodebookStoreError as exc:  # an unreadable latest pointer
            latest, pointer = None, str(exc)
        fallback = None
        if pointer or (latest is not None and results.get(latest)):
            fallback = _call(store.fallback, below=None if pointer else latest, model=args.model)[0]
    bad = [v for v, problem in results.items() if problem]
    if args.json:
        _print_json({"model": args.model, "latest": latest, "latest_problem": pointer,
                     "versions": [{"version": v, "ok": not p, "problem": p} for v, p in results.items()],
                     "fallback": None if fallback is None else fallback.version})
    else:
        for v, problem in results.items():
            mark = "*" if v == latest else " "
            print(f"{mark} v{v:<6} {'CORRUPT: ' + problem if problem else 'ok'}")
        if pointer:
            print(f"latest pointer CORRUPT: {pointer}")
        elif latest is None:
            print(f"no latest version of model {args.model!r}")
        if pointer or (latest is not None and results.get(latest)):
            goes = f"v{fallback.version}" if fallback else "nothing (no earlier version verifies)"
            print(f"latest fails: a worker warm start with --on-corrupt fallback continues from {goes}")
        print(f"{len(results) - len(bad)} of {len(results)} versions verify")
    return 1 if bad or pointer else 0


def _show(args: argparse.Namespace) -> int:
    with _open(args.store, read_only=True) as store:
        version = _resolve(store, args.version, args.model)
        _call(store.get, version, model=args.model)  # verifies every blob, or raises naming it
        manifest = _call(store.manifest, version, model=args.model)
        is_latest = _call(store.latest_version, model=args.model) == version
    if args.json:
        _print_json({"manifest": manifest.as_dict(), "verified": True, "is_latest": is_latest})
        return 0
    print(
        f"{manifest.model} v{manifest.version}{' (latest)' if is_latest else ''}: "
        f"{len(manifest.blobs)} blobs verified (sha256), {_size(manifest.total_size)}"
    )
    print(f"  parent      {'-' if manifest.parent is None else manifest.parent}")
    print(f"  created     {_when(manifest.created_at)}")
    print(f"  watermark   {json.dumps(manifest.watermark, sort_keys=True)}")
    print(f"  config      {json.dumps(manifest.config, sort_keys=True)}")
    print("  tensors")
    for name, t in sorted(manifest.tensors.items()):
        print(f"    {name:<24} {t.dtype:<8} {list(t.shape)!s:<18} in {t.blob}")
    print("  blobs")
    for name, b in sorted(manifest.blobs.items()):
        print(f"    {name:<24} {_size(b.size):>10}  sha256 {b.sha256}")
    print("  health")
    for key, value in sorted(manifest.health.items()):
        print(f"    {key:<24} {json.dumps(value, sort_keys=True)}")
    return 0


def _diff(args: argparse.Namespace) -> int:
    with _open(args.store, read_only=True) as store:
        a, b = _resolve(store, args.a, args.model), _resolve(store, args.b, args.model)
        diff = _call(store.diff, a, b, model=args.model)
    if args.json:
        _print_json(diff.as_dict(with_items=args.items))
        return 0
    d, remap = diff.drift, diff.remap
    print(
        f"{diff.model} v{a} -> v{b}: {d['changed_items']} of {d['common_items']} common items changed code "
        f"({d['changed_share']:.2%}), {d['new_items']} added, {d['removed_items']} removed"
    )
    rows = [
        [str(level + 1), f"{share:.2%}", f"{move:.6g}"]
        for level, (share, move) in enumerate(zip(d["level_changed_share"], d["codeword_movement"], strict=True))
    ]
    print(_table(["LEVEL", "CHANGED", "CODEWORD MOVEMENT (mean L2)"], rows))
    shown = min(args.limit, int(remap.changed_items.size))
    if shown:
        print(f"changed items (first {shown} of {remap.changed_items.size}):")
        for i in range(shown):
            old, new = tuple(remap.old_codes[i].tolist()), tuple(remap.new_codes[i].tolist())
            row = int(remap.changed_items[i])
            print(f"  {'row 0 (padding)' if row == 0 else f'item {row}'}: {old} -> {new}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    with _open(args.store, read_only=False) as store:
        previous = _call(store.latest_version, model=args.model)
        _call(store.set_latest, args.version, model=args.model)
    if args.json:
        _print_json({"model": args.model, "latest": args.version, "previous": previous})
    else:
        was = "none" if previous is None else f"v{previous}"
        print(f"{args.model}: latest -> v{args.version} (was {was}); v{args.version} verified")
    return 0


def _export(args: argparse.Namespace) -> int:
    with _open(args.store, read_only=True) as store:
        version = _resolve(store, args.version, args.model)
        manifest, blobs = _call(store.read_raw, version, model=args.model)  # verified bytes
    with _open(f"file://{args.dir}", read_only=False) as target:
        _call(target.put_raw, manifest, blobs)
    path = args.dir / args.model / str(version)
    files = sorted(["manifest.json", *blobs])
    if args.json:
        _print_json({"model": args.model, "version": version, "path": str(path), "files": files})
    else:
        size = len(manifest) + sum(len(b) for b in blobs.values())
        print(f"exported {args.model} v{version} to {path} ({len(files)} files, {_size(size)}, verified)")
    return 0


# --- helpers ---
def _version(text: str) -> int | str:
    if text == LATEST:
        return LATEST
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a version number or 'latest'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"versions are >= 0, got {value}")
    return value


def _open(url: str, *, read_only: bool) -> SnapshotStore:
    return _call(open_store, url, read_only=read_only)


def _call(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a store operation; its errors are things the user can act on, so report them as one line."""
    try:
        return func(*args, **kwargs)
    except CodebookStoreError as exc:
        raise UserError(str(exc)) from exc


def _resolve(store: SnapshotStore, version: int | str, model: str) -> int:
    if version != LATEST:
        return int(version)
    latest = _call(store.latest_version, model=model)
    if latest is None:
        raise UserError(f"model {model!r} has no latest snapshot in {store.url}")
    return latest


def _problem(store: SnapshotStore, version: int, model: str) -> str | None:
    """Why `version` fails verification (every blob read and checked), or None."""
    try:
        store.get(version, model=model)
    except CodebookStoreError as exc:
        return str(exc)
    return None


def _list_row(info: VersionInfo) -> list[str]:
    scalars = [(k, v) for k, v in sorted(info.health.items()) if isinstance(v, int | float)]
    drift = info.health.get("drift")
    if isinstance(drift, dict) and isinstance(drift.get("changed_share"), int | float):
        scalars.append(("drift", drift["changed_share"]))
    health = f"CORRUPT: {info.problem}" if info.problem else " ".join(f"{k}={v:.4g}" for k, v in scalars[:4])
    return [
        ("*" if info.is_latest else "") + ("!" if info.problem else ""),
        str(info.version),
        "-" if info.parent is None else str(info.parent),
        "-" if info.created_at is None else _when(info.created_at),
        "-" if info.num_items is None else f"{info.num_items:,}",
        "-" if info.size_bytes is None else _size(info.size_bytes),
        health,
    ]


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    return "\n".join(lines)


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=UTC).strftime("%Y-%m-%d %H:%M:%S")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in ("KiB", "MiB"):
        if value < 1024:
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))
