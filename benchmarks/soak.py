"""Soak: the worker's loop over a long stream, in-process, RSS and CPU with and without the memory setting side
by side, and the health of every snapshot it takes (the evidence behind the health gate's thresholds).

    python -m benchmarks.soak --events beauty --out runs/soak_beauty.json
    python -m benchmarks.soak --events synthetic --variants tuned --out runs/soak_synthetic.json

One child process per variant, all at the same time (the same machine load):
  tuned  calls sparc_stream.cli.allocator.tune_allocator() first, as every sparc entry point does (the heap trimmer);
  glibc  does not: glibc's defaults;
  mmap   glibc with MALLOC_MMAP_THRESHOLD_=65536 in its environment (the alternative
         sparc_stream/cli/allocator.py weighs).
No child inherits the caller's MALLOC_* variables. Each child does what the worker's threads do, without Kafka:
  ingest     streams.history.apply_feedback per event into a dict of JSON table values (the history table),
             micro-batches of --batch-size events with each user's history before its first event in the batch
  learner    in a thread of its own: observe_items for the item events, OnlineLearner.learn per micro-batch
  publisher  in a thread of its own, overlapping learning: a snapshot every --snapshot-every steps and at steps
             1, 2, 5, 10, 20, 50 and 100 (a worker's first snapshots come by time, after few steps): capture,
             the health gate, a put into a file:// store pruned to the last two versions, the codebook-updates
             records, the incremental serving index, and --retrievals lookups for random users
RSS (VmRSS) is sampled every --sample-every micro-batches. --passes N runs the stream N times (event ids made
unique per pass; histories carry on). The JSON holds per variant the RSS series, its peak, its end and its growth
over the second half, the CPU seconds (user, system: all threads) and minor page faults, and "health": per
snapshot the steps, items, per-level utilisation and perplexity, collision rate and the gate's verdict (the same
in every variant: the learning is seeded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from benchmarks.common import write_json
from sparc_stream.cli.allocator import tune_allocator

VARIANTS = ("tuned", "glibc", "mmap")
MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # the "mmap" variant's environment
EARLY_SNAPSHOTS = (1, 2, 5, 10, 20, 50, 100)


def rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def source_spec(events: str) -> str:
    from benchmarks.replay_bench import BEAUTY

    return str(BEAUTY) if events == "beauty" else events


class Loop:
    """The worker's threads over one stream (module doc), recording RSS and snapshot health."""

    def __init__(self, args: argparse.Namespace, store_dir: str):
        import torch

        from streams.index import IndexHolder
        from streams.publisher import Publisher
        from streams.settings import WorkerSettings
        from trainer.online import OnlineLearner

        torch.set_num_threads(1)
        self.args = args
        self.settings = s = WorkerSettings(batch_size=args.batch_size, store_url=f"file://{store_dir}")
        self.learner = OnlineLearner(s.sparc_config(), s.train_config(), catalogue=s.catalogue_config())
        self.publisher = Publisher(s.store_url, s.model_name, s.gate_thresholds())
        self.holder = IndexHolder()
        self.learner_pool = ThreadPoolExecutor(1, thread_name_prefix="learner")
        self.publisher_pool = ThreadPoolExecutor(1, thread_name_prefix="publisher")
        self.publishing: Future | None = None
        self.table: dict[str, bytes] = {}  # user -> JSON table value, as the worker's history table holds it
        self.rng = random.Random(0)
        self.health: list[dict] = []
        self.series: list[dict] = []
        self.events = self.batches = 0
        self.start = time.perf_counter()

    def run(self, records: list[dict]) -> None:
        from replay.sources import is_feedback
        from streams.history import apply_feedback, decode_state, encode_state

        s = self.settings
        for n in range(self.args.passes):
            items: list[dict] = []
            batch: list[tuple[dict, list]] = []
            for record in records:
                if not is_feedback(record):
                    items.append(record)
                    continue
                event = {**record, "event_id": f"{record['event_id']}#{n}"}
                user = event["user_id"]
                applied = apply_feedback(decode_state(self.table.get(user)), event["event_id"], event["item_id"],
                                         s.max_len, s.dedup_window)
                if applied is None:
                    continue
                self.table[user] = encode_state(applied.state)
                batch.append((event, applied.history))
                if len(batch) == s.batch_size:
                    self.step(items, batch)
                    items, batch = [], []
            if batch or items:
                self.step(items, batch)
        if self.publishing is not None:
            self.publishing.result()
        self.sample()

    def step(self, items: list[dict], batch: list[tuple[dict, list]]) -> None:
        if items:
            self.learner_pool.submit(self.learner.observe_items, items).result()
        histories: dict[str, list] = {}
        for event, history in batch:
            histories.setdefault(event["user_id"], history)
        before = self.learner.steps
        self.learner_pool.submit(self.learner.learn, [e for e, _ in batch], histories).result()
        self.events += len(batch)
        self.batches += 1
        steps = self.learner.steps
        if steps > before and (steps in EARLY_SNAPSHOTS or steps % self.args.snapshot_every == 0):
            state, health = self.learner_pool.submit(self.learner.capture).result()
            if self.publishing is not None:
                self.publishing.result()
            self.publishing = self.publisher_pool.submit(self.publish, state, health, self.events)
        if self.batches % self.args.sample_every == 0:
            self.sample()

    def publish(self, state, health: dict, events: int) -> None:
        from streams.history import decode_state, history_of
        from streams.index import build_index

        result = self.publisher.publish(state, health, {}, time.time())
        levels = self.settings.levels
        self.health.append({
            "steps": state.steps, "events": events, "items": health["items"],
            **{f"level{k}_utilisation": health[f"level{k}_utilisation"] for k in range(1, levels + 1)},
            **{f"level{k}_perplexity": health[f"level{k}_perplexity"] for k in range(1, levels + 1)},
            "collision_rate": health["collision_rate"], "gate_passed": result.accepted, "gate": result.reasons,
        })
        if result.accepted:
            index = build_index(state, result.version, result.created_at, self.settings.top_codes, "faiss",
                                self.holder.current)
            self.holder.swap(index)
            users = list(self.table)
            for user in self.rng.sample(users, min(self.args.retrievals, len(users))):
                index.retrieve(history_of(decode_state(self.table[user])), 50)
        self.publisher.store.prune(keep_last=2)

    def sample(self) -> None:
        self.series.append({"events": self.events, "seconds": round(time.perf_counter() - self.start, 2),
                            "rss_mb": round(rss_mb(), 1)})

    def close(self) -> None:
        self.learner_pool.shutdown()
        self.publisher_pool.shutdown()
        self.publisher.close()


def child(args: argparse.Namespace) -> dict:
    """One variant (module doc): the allocator setting first, then the loop."""
    allocator = {"tuned": tune_allocator, "glibc": lambda: "glibc default",
                 "mmap": lambda: "mmap threshold 64 KiB"}[args.child]()
    from replay.sources import open_source, take_feedback

    source = open_source(source_spec(args.events))
    records = list(take_feedback(source.records(), args.limit))
    with tempfile.TemporaryDirectory(prefix="sparc-soak-") as store_dir:
        loop = Loop(args, store_dir)
        loop.sample()
        try:
            loop.run(records)
        finally:
            loop.close()
    rss = [p["rss_mb"] for p in loop.series]
    half = next(p["rss_mb"] for p in loop.series if p["events"] >= loop.events / 2)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "allocator": allocator, "source": source.name, "events": loop.events, "steps": loop.learner.steps,
        "items": loop.learner.num_items, "seconds": round(time.perf_counter() - loop.start, 1),
        "cpu_user_seconds": round(usage.ru_utime, 1), "cpu_system_seconds": round(usage.ru_stime, 1),
        "minor_page_faults": usage.ru_minflt,
        "peak_rss_mb": max(rss), "final_rss_mb": rss[-1], "second_half_growth_mb": round(rss[-1] - half, 1),
        "series": loop.series, "health": loop.health,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="write the JSON result here")
    p.add_argument("--events", default="beauty",
                   help="beauty (the S3-Rec Beauty folder), synthetic[:SEED][?...] or another `sparc replay` source")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--passes", type=int, default=1, help="times the stream is run (default 1)")
    p.add_argument("--limit", type=int, default=None, help="feedback events per pass (default: all)")
    p.add_argument("--batch-size", type=int, default=64, help="micro-batch (default 64, the worker's)")
    p.add_argument("--snapshot-every", type=int, default=200, help="steps between snapshots (default 200)")
    p.add_argument("--sample-every", type=int, default=20, help="micro-batches between RSS samples (default 20)")
    p.add_argument("--retrievals", type=int, default=100, help="lookups per served snapshot (default 100)")
    p.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        args.child_out.write_text(json.dumps(child(args)))
        return 0
    if args.out is None:
        p.error("--out is required")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        p.error(f"--variants takes {', '.join(VARIANTS)}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    tmp = Path(tempfile.mkdtemp(prefix="sparc-soak-out-"))
    given = [a for a in (argv if argv is not None else sys.argv[1:])]
    children = {v: subprocess.Popen([sys.executable, "-m", "benchmarks.soak", *given, "--child", v,
                                     "--child-out", str(tmp / f"{v}.json")],
                                    env={**env, **(MMAP_ENV if v == "mmap" else {})}) for v in variants}
    failed = [v for v, proc in children.items() if proc.wait() != 0]
    if failed:
        print(f"soak: the {', '.join(failed)} child failed", file=sys.stderr)
        return 1
    results = {v: json.loads((tmp / f"{v}.json").read_text()) for v in variants}
    health = results[variants[0]].pop("health")
    identical = all(r.pop("health") == health for r in list(results.values())[1:])
    result = {
        "benchmark": "soak", "machine": platform.platform(), "python": platform.python_version(),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "child", "child_out")},
        "variants": results, "health": health, "health_identical_across_variants": identical,
    }
    write_json(args.out, result)
    print(f"{'variant':<8} {'allocator':<22} {'events':>9} {'peak RSS':>10} {'final RSS':>10} {'2nd-half growth':>16} "
          f"{'CPU user+sys':>14}")
    for v, r in results.items():
        print(f"{v:<8} {r['allocator']:<22} {r['events']:>9,} {r['peak_rss_mb']:>8.0f} MB {r['final_rss_mb']:>7.0f} MB "
              f"{r['second_half_growth_mb']:>13.0f} MB {r['cpu_user_seconds'] + r['cpu_system_seconds']:>12.0f} s")
    worst = {k: (min if k != "collision_rate" else max)(h[k] for h in health)
             for k in health[0] if k.startswith(("level", "collision"))} if health else {}
    print(f"{len(health)} snapshots, {sum(h['gate_passed'] for h in health)} passed the gate; worst values: "
          + ", ".join(f"{k}={v:.3f}" for k, v in worst.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
