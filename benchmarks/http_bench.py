"""Benchmark GET /retrieve/{user_id}?k=50 over HTTP at Amazon Beauty size, through the worker's real view code.

    python -m benchmarks.http_bench --out runs/http_bench.json

Server: a StreamWorker (streams.worker) is constructed without a broker (testing mode: memory tables, nothing
consumed); its Faust web app (aiohttp), with the routes streams.views registered on it, is served on
127.0.0.1 by aiohttp's AppRunner in this process, so a request goes through Faust's view dispatch,
views.retrieve_payload (history from the worker's table, retrieval in the loop's executor) and
ServingIndex.retrieve, exactly as in a running worker. Starting the whole worker would need Kafka; only the
web server is started here.
Model: SPARC built by replay.evaluate.build_sparc on the Beauty dataset (--data; 12,101 items, attributes
included) or, when it is absent, on a synthetic dataset of the same size. Its weights are UNTRAINED (random
init): fine for latency, meaningless for quality. The level-1 codebook gets its k-means initialisation from the
item vectors (what the first training step does), so the code lists have realistic sizes. The index is built
by streams.index.build_index from the model's state and swapped into the worker's IndexHolder.
Users: --users users of the dataset, each with its last max_len items as history in the worker's table.
Client: another process, http.client with one keep-alive connection, --requests sequential requests (after
--warmup), cycling over the users; wall time per request. Beside it, in this process: the same retrievals as a
direct call of ServingIndex.retrieve (the function behind the view), wall and CPU time.
Target (issue 4): p99 < 10 ms over HTTP.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import multiprocessing as mp
import os
import platform
import resource
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import numpy as np
import torch
from aiohttp import web
from tqdm import tqdm

from benchmarks.common import write_json
from benchmarks.harness import free_port
from replay.datasets import SequenceDataset, load_s3rec
from replay.evaluate import EvalSettings, build_sparc
from sparc_stream.cli.allocator import tune_allocator
from streams.index import build_index
from streams.settings import WorkerSettings
from streams.worker import StreamWorker
from trainer.config import EncoderConfig
from trainer.online import capture_state

TARGET_P99_MS = 10.0
BEAUTY_ITEMS = 12_101


def synthetic_dataset(items: int, users: int, seed: int) -> SequenceDataset:
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(1, items + 1, size=int(rng.integers(5, 60))) for _ in range(users)]
    sequences[0][0] = items  # every item id exists
    attributes = {i: rng.integers(1, 1000, size=3).tolist() for i in range(1, items + 1)}
    return SequenceDataset(
        name="synthetic-beauty-size", user_ids=np.arange(1, users + 1), sequences=sequences, num_items=items,
        item_attributes=attributes, num_attributes=1000,
    )


def make_model(ds: SequenceDataset, args):
    settings = EvalSettings(seed=args.seed, encoder=EncoderConfig(max_len=args.max_len),
                            sparc={"codes": args.codes} if args.codes else {})
    torch.manual_seed(args.seed)
    model = build_sparc(ds, settings)
    model.train()
    with torch.no_grad():  # the k-means initialisation of the codebooks that the first training step does
        model.rq.update_(model.items(), torch.Generator().manual_seed(args.seed))
    return model.eval()


def percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {key: float(np.percentile(a, q)) for key, q in (("p50", 50), ("p90", 90), ("p99", 99))} | {
        "mean": float(a.mean()), "max": float(a.max())
    }


def client(port: int, paths: list[str], warmup: int, out: mp.Queue) -> None:
    """Sequential GETs over one keep-alive connection; puts (latencies ms, statuses, a sample body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port)
    statuses: dict[int, int] = {}
    lat, sample = [], None
    for i, path in enumerate(paths):
        t0 = time.perf_counter_ns()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        t1 = time.perf_counter_ns()
        if i >= warmup:
            lat.append((t1 - t0) / 1e6)
            statuses[resp.status] = statuses.get(resp.status, 0) + 1
        if sample is None or resp.status != 200:
            sample = body.decode()
    conn.close()
    out.put((lat, statuses, sample))


async def serve_and_measure(w: StreamWorker, paths: list[str], warmup: int, port: int) -> tuple:
    runner = web.AppRunner(w.app.web.web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        queue: mp.Queue = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=client, args=(port, paths, warmup, queue))
        proc.start()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, queue.get)  # the loop keeps serving meanwhile
        await loop.run_in_executor(None, proc.join)
        return result
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", default="../shared/datasets/amazon_beauty", help="S3-Rec folder (else synthetic)")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--codes", type=int, default=None, help="codes per RQ level (default: SparcConfig's, 64)")
    p.add_argument("--top-codes", type=int, default=4)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # as the worker does (WorkerSettings.torch_threads)
    faiss.omp_set_num_threads(1)
    load_before = os.getloadavg()

    if Path(args.data).exists():
        ds, source = load_s3rec(args.data), f"load_s3rec({args.data!r})"
    else:
        ds, source = synthetic_dataset(BEAUTY_ITEMS, 22_363, args.seed), "synthetic (Beauty's size)"
    model = make_model(ds, args)
    t0 = time.perf_counter()
    index = build_index(capture_state(model), 1, time.time(), args.top_codes)
    t_index = time.perf_counter() - t0
    sizes = index.retriever.list_sizes(np.arange(index.retriever.num_codes))

    with tempfile.TemporaryDirectory() as tmp:
        settings = WorkerSettings(
            app_id=f"http-bench-{uuid.uuid4().hex[:8]}", store_url="memory://", partitions=1, data_dir=Path(tmp),
            table_store="memory://", dim=model.cfg.encoder.dim, max_len=args.max_len, codes=model.cfg.codes,
            top_codes=args.top_codes,
        )
        w = StreamWorker(settings, testing=True, learn=False)  # no broker: memory tables; web app not started
        try:
            rng = np.random.default_rng(args.seed)
            chosen = rng.choice(ds.num_users, size=min(args.users, ds.num_users), replace=False)
            histories = {str(ds.user_ids[u]): ds.sequences[u][-args.max_len :].tolist() for u in chosen}
            for user, items in histories.items():
                w.history.data[user] = {"items": items, "recent": []}  # the table's store, as ingest leaves it
            w.serving.index.swap(index)
            users = list(histories)
            order = [users[i % len(users)] for i in range(args.warmup + args.requests)]
            paths = [f"/retrieve/{u}?k={args.k}" for u in order]

            direct_wall, direct_cpu = [], []
            for u in tqdm(order, desc="direct ServingIndex.retrieve", leave=False):
                t0, c0 = time.perf_counter_ns(), time.thread_time_ns()
                index.retrieve(histories[u], args.k)
                direct_cpu.append((time.thread_time_ns() - c0) / 1e6)
                direct_wall.append((time.perf_counter_ns() - t0) / 1e6)

            print(f"serving {len(paths)} requests over HTTP ...", flush=True)
            lat, statuses, sample = asyncio.run(serve_and_measure(w, paths, args.warmup, free_port()))
        finally:
            w.close()

    body = json.loads(sample)
    report = {
        "benchmark": "http_bench",
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}},
        "machine": {
            "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        },
        "model": {
            "dataset": source, **ds.summary(), "weights": "untrained (random init; codebooks k-means initialised)",
            "config": model.cfg.to_json(),
        },
        "index": {
            "kind": type(index.retriever).__name__, "build_s": t_index,
            "list_sizes": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max()),
                           "empty": int((sizes == 0).sum())},
        },
        "http": {"requests": len(lat), "statuses": {str(k): v for k, v in statuses.items()}, **percentiles(lat)},
        "direct_call": {"wall_ms": percentiles(direct_wall[args.warmup :]),
                        "cpu_ms": percentiles(direct_cpu[args.warmup :])},
        "sample_response": {key: body.get(key) for key in ("user_id", "version", "codes", "history_length")}
        | {"items": len(body.get("items", []))},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "target_p99_ms": TARGET_P99_MS,
        "met": bool(np.percentile(lat, 99) < TARGET_P99_MS and set(statuses) == {200}),
    }
    write_json(args.out, report)
    h, d = report["http"], report["direct_call"]
    print(f"\n{source}: {ds.num_items:,} items, {model.cfg.codes} codes (lists {report['index']['list_sizes']}), "
          f"untrained weights, k={args.k}, {len(lat)} sequential keep-alive requests; load {load_before}")
    print(f"{'path':<34} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'mean':>8}")
    print(f"{'HTTP GET /retrieve (wall)':<34} {h['p50']:>8.3f} {h['p90']:>8.3f} {h['p99']:>8.3f} {h['mean']:>8.3f}")
    for name, x in (("ServingIndex.retrieve (wall)", d["wall_ms"]), ("ServingIndex.retrieve (cpu)", d["cpu_ms"])):
        print(f"{name:<34} {x['p50']:>8.3f} {x['p90']:>8.3f} {x['p99']:>8.3f} {x['mean']:>8.3f}")
    print(f"statuses {h['statuses']}; target p99 < {TARGET_P99_MS} ms met: {report['met']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
