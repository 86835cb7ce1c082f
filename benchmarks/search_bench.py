"""Benchmark per-code soft search (trainer.search) at catalogue scale, one thread, as a library call.

    python -m benchmarks.search_bench --out runs/search_bench.json

Data (seeded): --items unit vectors in --dim dimensions around --codes random unit centroids (clustered); each
item's level-1 code is its nearest centroid, so list c of the index holds the items nearest centroid c. Each
query is a user with a Dirichlet interest distribution over the codes, --top-codes codes chosen from it
(choose_codes, no exploration) and one user vector per code pointing into that code's cluster.

Measured, per query, wall time (perf_counter) and this thread's CPU time (thread_time; the machine is shared,
so wall percentiles include time the thread was descheduled):
  soft search  CodeIndex method "scan" (numpy over zero-copy views of the faiss IVF lists) and method "faiss"
               (search_preassigned on the same index, LSE from the same views);
  hard search  CodeIndex "scan", the argmax code's list only;
  baseline     soft_search_reference: the same definition by brute force, numpy over ALL items; its answers
               are the ground truth of recall@k (and of the exact-match rate) of the fast paths.
Index update: --update-items items get a new vector drawn around a random centroid (and so, mostly, a new
code); CodeIndex.update (copy of the served index, only changed items removed and re-added) is timed against
CodeIndex.build from scratch, --update-reps times each; the updated index must answer like the rebuilt one.
Targets (issue 4): soft p99 < 2 ms and recall@k >= 0.99; an update moves only the changed items.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # one thread, before numpy / faiss / torch load their thread pools

import argparse  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from benchmarks.common import write_json  # noqa: E402
from sparc_stream.cli.allocator import tune_allocator  # noqa: E402
from trainer.search import (  # noqa: E402
    CodeIndex,
    choose_codes,
    hard_search,
    soft_search,
    soft_search_reference,
)

TARGET_P99_MS = 2.0
TARGET_RECALL = 0.99


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_catalogue(items: int, dim: int, codes: int, seed: int, spread: float, chunk: int = 100_000):
    """(centroids (C, D), vectors (N+1, D) unit, row 0 zero, level-1 codes (N+1,) = nearest centroid)."""
    rng = np.random.default_rng(seed)
    centroids = unit(rng.standard_normal((codes, dim), dtype=np.float32))
    vectors = np.zeros((items + 1, dim), dtype=np.float32)
    item_codes = np.zeros(items + 1, dtype=np.int64)
    for start in tqdm(range(1, items + 1, chunk), desc="catalogue", leave=False):
        n = min(chunk, items + 1 - start)
        around = centroids[rng.integers(0, codes, n)]
        vectors[start : start + n], item_codes[start : start + n] = draw(around, centroids, spread, rng)
    return centroids, vectors, item_codes


def draw(around: np.ndarray, centroids: np.ndarray, spread: float, rng: np.random.Generator):
    """Unit vectors scattered around the given centroids, and their nearest centroid."""
    noise = rng.standard_normal(around.shape, dtype=np.float32) * (spread / np.sqrt(around.shape[1]))
    v = unit(around + noise).astype(np.float32)
    return v, np.argmax(v @ centroids.T, axis=1)


def make_queries(n: int, centroids: np.ndarray, top_codes: int, seed: int, scale: float = 8.0):
    """Per query: (user vectors (K, D), weights (K,), codes (K,))."""
    rng = np.random.default_rng(seed + 1)
    codes_n, dim = centroids.shape
    out = []
    for _ in range(n):
        probs = rng.dirichlet(np.full(codes_n, 0.05))
        codes, weights = choose_codes(probs, top_codes)
        u = scale * unit(centroids[codes] + rng.standard_normal((len(codes), dim), dtype=np.float32) * 0.1)
        out.append((u.astype(np.float32), weights, codes))
    return out


def timed(fn: Callable, queries: list, desc: str, warmup: int = 50) -> tuple[list, dict]:
    for q in queries[:warmup]:
        fn(*q)
    wall, cpu, results = [], [], []
    for q in tqdm(queries, desc=desc, leave=False):
        t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
        r = fn(*q)
        c1, t1 = time.thread_time_ns(), time.perf_counter_ns()
        wall.append((t1 - t0) / 1e6)
        cpu.append((c1 - c0) / 1e6)
        results.append(r)
    return results, {"wall_ms": percentiles(wall), "cpu_ms": percentiles(cpu)}


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {
        "p50": float(np.percentile(a, 50)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
        "mean": float(a.mean()),
        "max": float(a.max()),
    }


def recall(results: list, truth: list) -> dict:
    hits = [len(np.intersect1d(r.items, t.items)) / max(len(t.items), 1) for r, t in zip(results, truth, strict=True)]
    same = [np.array_equal(r.items, t.items) for r, t in zip(results, truth, strict=True)]
    return {"recall": float(np.mean(hits)), "min_recall": float(np.min(hits)), "exact_match_rate": float(np.mean(same))}


def bench_update(index: CodeIndex, centroids, vectors, item_codes, args, queries) -> dict:
    rng = np.random.default_rng(args.seed + 2)
    changed = rng.choice(np.arange(1, args.items + 1), size=args.update_items, replace=False)
    new_vectors, new_codes = vectors.copy(), item_codes.copy()
    around = centroids[rng.integers(0, args.codes, len(changed))]
    new_vectors[changed], new_codes[changed] = draw(around, centroids, args.spread, rng)
    updates, builds = [], []
    updated = rebuilt = None
    for _ in tqdm(range(args.update_reps), desc="update vs rebuild", leave=False):
        updated = rebuilt = None  # free the previous copies first
        t0 = time.perf_counter()
        updated, stats = index.update(new_vectors, new_codes)
        updates.append((time.perf_counter() - t0, stats))
        t0 = time.perf_counter()
        rebuilt = CodeIndex.build(new_vectors, new_codes, args.codes)
        builds.append(time.perf_counter() - t0)
    stats = updates[-1][1]
    all_codes = np.arange(args.codes)
    same_lists = bool(np.array_equal(updated.list_sizes(all_codes), rebuilt.list_sizes(all_codes)))
    check = queries[: args.update_check_queries]
    same_answers = all(
        np.array_equal(soft_search(u, w, c, updated, args.k).items, soft_search(u, w, c, rebuilt, args.k).items)
        for u, w, c in check
    )
    phases = {key: statistics.median(s.seconds[key] for _, s in updates) for key in stats.seconds}
    return {
        "changed_items": int(args.update_items),
        "moved": stats.moved,
        "code_changed": stats.code_changed,
        "written": stats.written,
        "only_changed_items_moved": stats.moved == args.update_items and stats.written == args.update_items,
        "incremental_s": {"median": statistics.median(t for t, _ in updates), "min": min(t for t, _ in updates)},
        "incremental_phases_median_s": phases,
        "rebuild_s": {"median": statistics.median(builds), "min": min(builds)},
        "answers_equal_rebuild": bool(same_lists and same_answers),
        "checked_queries": len(check),
    }


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--codes", type=int, default=256)
    p.add_argument("--top-codes", type=int, default=4)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--baseline-queries", type=int, default=None, help="brute-force queries (default: --queries)")
    p.add_argument("--spread", type=float, default=0.8, help="noise around the centroids (cluster overlap)")
    p.add_argument("--update-items", type=int, default=10_000)
    p.add_argument("--update-reps", type=int, default=3)
    p.add_argument("--update-check-queries", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    faiss.omp_set_num_threads(1)
    torch.set_num_threads(1)
    load_before = os.getloadavg()

    t0 = time.perf_counter()
    centroids, vectors, item_codes = make_catalogue(args.items, args.dim, args.codes, args.seed, args.spread)
    t_data = time.perf_counter() - t0
    t0 = time.perf_counter()
    scan_index = CodeIndex.build(vectors, item_codes, args.codes, centroids=centroids, method="scan")
    t_build = time.perf_counter() - t0
    faiss_index = CodeIndex(scan_index.index, vectors, item_codes, method="faiss")  # the same faiss index
    sizes = scan_index.list_sizes(np.arange(args.codes))
    queries = make_queries(args.queries, centroids, args.top_codes, args.seed)
    n_base = args.baseline_queries or args.queries

    k = args.k
    truth, base_t = timed(
        lambda u, w, c: soft_search_reference(u, w, c, vectors, item_codes, k), queries[:n_base], "brute force"
    )
    soft, soft_t = timed(lambda u, w, c: soft_search(u, w, c, scan_index, k), queries, "soft scan")
    soft_f, soft_f_t = timed(lambda u, w, c: soft_search(u, w, c, faiss_index, k), queries, "soft faiss")
    _, hard_t = timed(lambda u, w, c: hard_search(u[0], int(c[0]), scan_index, k), queries, "hard scan")
    update = bench_update(scan_index, centroids, vectors, item_codes, args, queries)

    soft_r, soft_f_r = recall(soft[:n_base], truth), recall(soft_f[:n_base], truth)
    report = {
        "benchmark": "search_bench",
        "config": {**{key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()}, "threads": 1},
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpus": os.cpu_count(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "faiss": faiss.__version__,
            "numpy": np.__version__,
        },
        "data": {
            "seconds": t_data,
            "list_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
        },
        "index_build_s": t_build,
        "soft_scan": {**soft_t, **soft_r},
        "soft_faiss": {**soft_f_t, **soft_f_r},
        "hard_scan": hard_t,
        "baseline_brute_force": {**base_t, "queries": n_base},
        "update": update,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "targets": {"soft_p99_ms": TARGET_P99_MS, "recall": TARGET_RECALL},
        "met": {
            "soft_p99_wall": soft_t["wall_ms"]["p99"] < TARGET_P99_MS,
            "soft_p99_cpu": soft_t["cpu_ms"]["p99"] < TARGET_P99_MS,
            "recall": soft_r["recall"] >= TARGET_RECALL,
            "update_moves_only_changed": update["only_changed_items_moved"] and update["answers_equal_rebuild"],
        },
    }
    write_json(args.out, report)
    print_table(report)
    return 0


def print_table(r: dict) -> None:
    c = r["config"]
    print(f"\n{c['items']:,} items, dim {c['dim']}, {c['codes']} codes (lists {r['data']['list_sizes']}), "
          f"K={c['top_codes']}, k={c['k']}, {c['queries']} queries, 1 thread; load {r['machine']['loadavg_before']}")
    print(f"{'path':<28} {'wall p50':>9} {'wall p99':>9} {'cpu p50':>8} {'cpu p99':>8} {'recall@k':>9} {'exact':>6}")
    rows = [("soft, IVF lists, numpy scan", "soft_scan"), ("soft, IVF lists, faiss", "soft_faiss"),
            ("hard, IVF list, numpy scan", "hard_scan"), ("baseline: brute force", "baseline_brute_force")]
    for name, key in rows:
        x = r[key]
        rec = f"{x['recall']:.4f}" if "recall" in x else ("1 (ref)" if key.startswith("baseline") else "")
        ex = f"{x['exact_match_rate']:.3f}" if "exact_match_rate" in x else ""
        print(f"{name:<28} {x['wall_ms']['p50']:>9.3f} {x['wall_ms']['p99']:>9.3f} {x['cpu_ms']['p50']:>8.3f} "
              f"{x['cpu_ms']['p99']:>8.3f} {rec:>9} {ex:>6}")
    u = r["update"]
    print(f"update of {u['changed_items']:,} items: moved {u['moved']:,} (code changed {u['code_changed']:,}), "
          f"incremental {u['incremental_s']['median']:.3f} s (phases {fmt(u['incremental_phases_median_s'])}) vs "
          f"rebuild {u['rebuild_s']['median']:.3f} s; answers equal to the rebuild: {u['answers_equal_rebuild']}")
    print(f"targets met: {r['met']}")


def fmt(phases: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in phases.items() if k != "total")


if __name__ == "__main__":
    raise SystemExit(main())
