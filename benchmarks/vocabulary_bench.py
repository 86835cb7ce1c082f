"""Benchmark the vocabulary in codebook updates (contract 3.1): bytes sent whole vs as a row delta, and what a
subscriber spends rebuilding it.

    python -m benchmarks.vocabulary_bench --out runs/vocabulary_bench.json

For vocabularies of N items (integer ids up to 2**62, or 16-character SKU strings) and a share of rows handed to
new items between two versions (evictions), the update the publisher encodes (messages.encode, remap from the
base, no whole table) is read back: which vocabulary part it chose and its bytes, beside the baseline in the same
run, the whole blob (what an update carries without deltas). Then a subscriber's `with_base` (rebuild the item
codes and the vocabulary, check both against the manifest's sha256, read the remap by ids): median milliseconds
over --reps, beside the same update of snapshots without a vocabulary (row i is item i: no vocabulary to
rebuild or check; the remap by ids reads identities). Timings are noisy on a shared machine; the byte counts are
exact.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.common import write_json
from codebook_store import CodebookUpdate, Reassembler, Snapshot
from codebook_store.format import encode as encode_snapshot
from codebook_store.messages import IDS_DELTA_PART, encode

CHURN = (0.0, 0.001, 0.01, 0.1, 0.5, 0.9)


def vocabularies(n: int, kind: str, churn: float, seed: int = 0) -> tuple[list, list]:
    """(base, new): `n` distinct ids, and the same with round(churn * n) rows handed to new ids."""
    rng = random.Random(seed)
    fresh = (lambda: rng.randrange(1, 2**62)) if kind == "int" else (lambda: f"sku-{rng.randrange(10**12):012d}")
    base = list(dict.fromkeys(fresh() for _ in range(n + 16)))[:n]
    new, taken = list(base), set(base)
    for row in rng.sample(range(n), round(churn * n)):
        while (item := fresh()) in taken:
            pass
        taken.add(item)
        new[row] = item
    return base, new


def snapshots(n: int, base_ids: list, new_ids: list, seed: int = 0) -> tuple[Snapshot, Snapshot]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n + 1, 3), generator=g)
    moved = codes.clone()
    moved[torch.randint(0, n + 1, (n // 20,), generator=g)] = 7  # some codes change too
    common = {"model": "sparc", "watermark": {}, "config": {"codes": 256}, "health": {},
              "codebooks": torch.randn(3, 256, 16, generator=g)}
    base = Snapshot(version=1, parent=None, created_at=1.0, item_codes=codes, item_ids=base_ids, **common)
    new = Snapshot(version=2, parent=1, created_at=2.0, item_codes=moved, item_ids=new_ids, **common)
    return base, new


def received(new: Snapshot, base: Snapshot) -> tuple[list, CodebookUpdate]:
    """The records of `new` as a remap from `base`, and the update a subscriber reassembles from them."""
    records = encode(new, base)
    reassembler = Reassembler()
    (update,) = [u for record in records if (u := reassembler.accept(*record)) is not None]
    return records, update


def median_ms(update: CodebookUpdate, base: Snapshot, reps: int) -> tuple[float, CodebookUpdate]:
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        resolved = update.with_base(base.item_codes.numpy(), base.item_ids)
        seconds.append(time.perf_counter() - started)
    return round(1000 * statistics.median(seconds), 2), resolved


def measure(n: int, kind: str, churn: float, reps: int) -> dict:
    base_ids, new_ids = vocabularies(n, kind, churn)
    base, new = snapshots(n, base_ids, new_ids)
    records, update = received(new, base)
    parts = {p["name"]: p["size"] for p in update.header["parts"]}
    sent = IDS_DELTA_PART if IDS_DELTA_PART in parts else "item_ids.safetensors"
    ms, resolved = median_ms(update, base, reps)
    assert resolved.item_ids == new.item_ids
    plain_base, plain = (replace(s, item_ids=None) for s in (base, new))
    plain_ms, _ = median_ms(received(plain, plain_base)[1], plain_base, reps)
    return {
        "ids": kind,
        "items": n,
        "rows_handed_on": round(churn * n),
        "vocabulary_part": sent,
        "vocabulary_part_bytes": parts[sent],
        "baseline_whole_bytes": len(encode_snapshot(new)[1]["item_ids.safetensors"]),
        "update_bytes": sum(len(k) + len(v) + sum(len(a) + len(b) for a, b in h) for k, v, h in records),
        "ids_removed": len(resolved.item_remap.removed),
        "with_base_ms_median": ms,
        "baseline_with_base_without_vocabulary_ms_median": plain_ms,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/vocabulary_bench.json"))
    p.add_argument("--items", type=int, nargs="+", default=[1_000, 100_000])
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args(argv)
    rows = [measure(n, kind, churn, args.reps) for n in args.items for kind in ("int", "sku") for churn in CHURN]
    for row in rows:
        print(f"{row['ids']:>3} N={row['items']:>7} handed on {row['rows_handed_on']:>6}: "
              f"{row['vocabulary_part']:<27} {row['vocabulary_part_bytes']:>9} B "
              f"(whole {row['baseline_whole_bytes']:>9} B), with_base {row['with_base_ms_median']:.1f} ms "
              f"(without a vocabulary {row['baseline_with_base_without_vocabulary_ms_median']:.1f} ms)")
    write_json(args.out, {"machine": platform.platform(), "reps": args.reps, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
