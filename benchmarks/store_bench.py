"""Benchmark the codebook store: put/get of a production-sized snapshot on file:// and rocksdb://.

    python -m benchmarks.store_bench --out runs/store_bench.json

The snapshot: N = 1,000,000 items, codebooks 3 x 256 x 64 (float32), item codes (N+1, 3) int64, and the
weights serving needs: the item-embedding table (N+1, 64) float32 (by far the largest tensor) plus a small
SASRec-style encoder (2 blocks, dim 64) and an interest head. Reported: median/max seconds of put and get
over --reps repetitions (each put a new version; get right after it, so the page cache is warm, as in a
worker), store bytes on disk per snapshot vs the raw tensor bytes, in-memory encode/decode times, two
baselines in the same run (numpy.save/np.load of the same arrays, and a plain safetensors file write/read,
both fsync'ed like the store; the safetensors read parses bytes read from the file, as the store does),
and the share of single-byte flips (sampled positions) that decode detects.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch
from safetensors.torch import load as load_safetensors

from benchmarks.common import write_json
from codebook_store import CorruptSnapshotError, Snapshot, decode, encode, open_store
from sparc_stream.cli.allocator import tune_allocator

TARGET_SECONDS = 2.0
TARGET_DISK_RATIO = 1.5


def make_snapshot(items: int, levels: int, codes: int, dim: int, version: int, seed: int = 0) -> Snapshot:
    """A synthetic snapshot with the shapes of a production SPARC model (values are random)."""
    g = torch.Generator().manual_seed(seed)
    weights = {"item_tower.id_embedding": torch.randn(items + 1, dim, generator=g)}  # (N+1, D)
    weights["encoder.position"] = torch.randn(50, dim, generator=g)
    for block in range(2):
        for name, shape in {
            "attn.in_proj": (3 * dim, dim),
            "attn.out_proj": (dim, dim),
            "ffn.up": (4 * dim, dim),
            "ffn.down": (dim, 4 * dim),
            "norm1": (dim,),
            "norm2": (dim,),
        }.items():
            weights[f"encoder.blocks.{block}.{name}"] = torch.randn(*shape, generator=g)
    weights["interest_head"] = torch.randn(codes, dim, generator=g)
    item_codes = torch.randint(0, codes, (items + 1, levels), generator=g)
    return Snapshot(
        model="sparc",
        version=version,
        parent=version - 1 if version > 1 else None,
        created_at=time.time(),
        watermark={"kafka": {f"feedback-events:{p}": 1_000_000 + p for p in range(8)}},
        config={"num_items": items, "levels": levels, "codes": codes, "dim": dim},
        codebooks=torch.randn(levels, codes, dim, generator=g),
        item_codes=item_codes,
        weights=weights,
        health={"collision_rate": 0.01, "level1_utilisation": 1.0},
    )


def raw_tensor_bytes(snapshot: Snapshot) -> int:
    tensors = [snapshot.codebooks, snapshot.item_codes, *snapshot.weights.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


def disk_bytes(path: Path) -> int:
    """Apparent size of every file under path."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def stats(values: list[float]) -> dict[str, Any]:
    return {"median": statistics.median(values), "max": max(values), "all": values}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_backend(url: str, root: Path, base: Snapshot, reps: int) -> dict[str, Any]:
    puts, gets = [], []
    disk_one = 0
    with open_store(url) as store:
        for rep in range(reps):
            snap = Snapshot(**{**base.__dict__, "version": rep + 1, "parent": rep or None})
            put_s, _ = timed(lambda snap=snap: store.put(snap))
            get_s, back = timed(lambda snap=snap: store.get(snap.version))
            assert back.same_as(snap)
            del back
            puts.append(put_s)
            gets.append(get_s)
            if rep == 0:
                disk_one = disk_bytes(root)
            store.prune(keep_last=1)  # untimed; keeps the disk use of the run flat
        disk_after_prune = disk_bytes(root)
    return {
        "put_s": stats(puts),
        "get_s": stats(gets),
        "disk_bytes_one_snapshot": disk_one,
        "disk_bytes_after_reps_and_prune": disk_after_prune,
    }


def fsync_write(path: Path, write: Callable[[Path], None]) -> None:
    write(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def bench_numpy(root: Path, snap: Snapshot, reps: int) -> dict[str, Any]:
    arrays = {"codebooks": snap.codebooks, "item_codes": snap.item_codes, **snap.weights}
    arrays = {k: v.numpy() for k, v in arrays.items()}
    writes, reads = [], []
    for rep in range(reps):
        directory = root / f"np{rep}"
        directory.mkdir(parents=True)

        def write(directory: Path = directory) -> None:
            for name, array in arrays.items():
                fsync_write(directory / f"{name}.npy", lambda p, a=array: np.save(p, a))

        def read(directory: Path = directory) -> dict[str, np.ndarray]:
            return {name: np.load(directory / f"{name}.npy") for name in arrays}

        writes.append(timed(write)[0])
        reads.append(timed(read)[0])
        size = disk_bytes(directory)
        shutil.rmtree(directory)
    return {"write_s": stats(writes), "read_s": stats(reads), "disk_bytes": size}


def bench_safetensors_file(root: Path, snap: Snapshot, reps: int) -> dict[str, Any]:
    tensors = {"codebooks": snap.codebooks, "item_codes": snap.item_codes, **snap.weights}
    writes, reads = [], []
    for rep in range(reps):
        path = root / f"plain{rep}.safetensors"
        writes.append(timed(lambda p=path: fsync_write(p, lambda q: safetensors.torch.save_file(tensors, q)))[0])
        reads.append(timed(lambda p=path: load_safetensors(p.read_bytes()))[0])  # bytes, like the store
        size = path.stat().st_size
        path.unlink()
    return {"write_s": stats(writes), "read_s": stats(reads), "disk_bytes": size}


def bench_codec(snap: Snapshot, reps: int) -> dict[str, Any]:
    encodes, decodes, hashes = [], [], []
    for _ in range(reps):
        encode_s, (manifest, blobs) = timed(lambda: encode(snap))
        decode_s, _ = timed(lambda manifest=manifest, blobs=blobs: decode(manifest, blobs))
        hash_s, _ = timed(lambda blobs=blobs: [hashlib.sha256(b).digest() for b in blobs.values()])
        encodes.append(encode_s)
        decodes.append(decode_s)
        hashes.append(hash_s)
    return {
        "encode_s": stats(encodes),
        "decode_s": stats(decodes),
        "sha256_all_blobs_s": stats(hashes),
        "encoded_bytes": len(manifest) + sum(len(b) for b in blobs.values()),
        "blob_bytes": {name: len(b) for name, b in blobs.items()},
    }


def flip_detection(snap: Snapshot, per_blob: dict[str, int], seed: int = 0) -> dict[str, Any]:
    """Flip one byte (random position, random non-zero xor mask) per try and decode; count detections."""
    manifest, blobs = encode(snap)
    rng = random.Random(seed)
    out: dict[str, Any] = {"per_blob": {}}
    tried = detected = 0
    for name, count in per_blob.items():
        data = bytearray(blobs[name])
        hits = 0
        for position in rng.sample(range(len(data)), min(count, len(data))):
            original = data[position]
            data[position] ^= rng.randrange(1, 256)
            try:
                decode(manifest, {**blobs, name: bytes(data)})
            except CorruptSnapshotError as exc:
                hits += exc.kind == "checksum"
            data[position] = original
        out["per_blob"][name] = {"tried": min(count, len(data)), "detected": hits}
        tried += min(count, len(data))
        detected += hits
    out.update({"tried": tried, "detected": detected, "rate": detected / tried if tried else None})
    return out


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--levels", type=int, default=3)
    parser.add_argument("--codes", type=int, default=256)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="repetitions per measurement (default 5)")
    parser.add_argument("--dir", type=Path, default=None, help="scratch directory (default: a new temp dir)")
    parser.add_argument(
        "--flips",
        type=int,
        nargs=3,
        default=[400, 100, 40],
        metavar=("CODEBOOKS", "ITEM_CODES", "WEIGHTS"),
        help="sampled single-byte flips per blob (default 400 100 40; each weights flip re-hashes 256 MB)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    scratch = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    try:
        snap = make_snapshot(args.items, args.levels, args.codes, args.dim, version=1)
        raw = raw_tensor_bytes(snap)
        results: dict[str, Any] = {
            "command": " ".join([Path(sys.executable).name, "-m", "benchmarks.store_bench", *(argv or sys.argv[1:])]),
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "safetensors": safetensors.__version__,
                "scratch_dir": str(scratch),
                "load_average_at_start": os.getloadavg(),
            },
            "snapshot": {
                "items": args.items,
                "codebooks": list(snap.codebooks.shape),
                "item_codes": list(snap.item_codes.shape),
                "weights": {k: list(v.shape) for k, v in snap.weights.items()},
                "raw_tensor_bytes": raw,
            },
            "targets": {"put_and_get_under_s": TARGET_SECONDS, "disk_over_raw_under": TARGET_DISK_RATIO},
        }
        print(f"snapshot: {args.items:,} items, raw tensors {raw / 2**20:.1f} MiB; {args.reps} reps", flush=True)
        results["codec"] = bench_codec(snap, args.reps)
        print(
            f"  encode median {results['codec']['encode_s']['median']:.3f}s, "
            f"decode median {results['codec']['decode_s']['median']:.3f}s",
            flush=True,
        )

        results["backends"] = {}
        for scheme in ("file", "rocksdb"):
            root = scratch / scheme
            res = bench_backend(f"{scheme}://{root}", root, snap, args.reps)
            res["disk_over_raw"] = res["disk_bytes_one_snapshot"] / raw
            res["meets_targets"] = (
                res["put_s"]["max"] < TARGET_SECONDS
                and res["get_s"]["max"] < TARGET_SECONDS
                and res["disk_over_raw"] < TARGET_DISK_RATIO
            )
            results["backends"][scheme] = res
            shutil.rmtree(root, ignore_errors=True)
            print(
                f"  {scheme}://  put median {res['put_s']['median']:.3f}s max {res['put_s']['max']:.3f}s | "
                f"get median {res['get_s']['median']:.3f}s max {res['get_s']['max']:.3f}s | "
                f"disk {res['disk_over_raw']:.3f}x raw",
                flush=True,
            )

        results["baselines"] = {
            "numpy_save_fsync": bench_numpy(scratch / "numpy", snap, args.reps),
            "safetensors_file_fsync": bench_safetensors_file(scratch, snap, args.reps),
        }
        for name, res in results["baselines"].items():
            print(
                f"  baseline {name}: write median {res['write_s']['median']:.3f}s, "
                f"read median {res['read_s']['median']:.3f}s, disk {res['disk_bytes'] / raw:.3f}x raw",
                flush=True,
            )

        blob_names = ["codebooks.safetensors", "item_codes.safetensors", "weights.safetensors"]
        results["flip_detection"] = flip_detection(snap, dict(zip(blob_names, args.flips, strict=True)))
        fd = results["flip_detection"]
        print(f"  single-byte flips detected: {fd['detected']}/{fd['tried']}", flush=True)
        results["machine"]["load_average_at_end"] = os.getloadavg()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
