"""The online learner's events/s on each device torch sees, and for K data-parallel gloo ranks on the CPU.

    python -m benchmarks.learner_bench --out runs/learner_bench.json          # cpu (+ cuda where present), K = 1, 2
    python -m benchmarks.learner_bench --events 16384 --batch-sizes 64,1024 --ranks 1,2,4 --out runs/lb.json

Beauty events in time order, as `sparc produce --data` sends them (benchmarks.worker_bench.beauty_events), the
worker's model and optimiser (streams.settings.WorkerSettings defaults: the item table grown to the catalogue's
12,101 items by its item events, dim 64, two layers, full softmax), one torch thread per process unless --threads.

1. devices: trainer.online.OnlineLearner on the CPU and, where torch sees a GPU, on cuda, one after the other in
   this run, for each micro-batch size. The first --warmup batches are not timed (k-means initialisation, CUDA's
   kernel loading); then events/s and ms per step over the remaining events. Every step reads its loss back as a
   Python float, so GPU work is finished when the clock stops. Without a GPU the result says so.
2. data-parallel: trainer.distributed.DataParallelLearner in K processes (a gloo group over loopback, file store
   in a temp dir), each with --threads torch threads. Each round reads the next K x B events; each rank learns
   those of the users it owns (a hash, as Kafka partitions by key), so the group takes one step per K x B events
   (B = the first --batch-sizes entry). events/s = the events of the timed rounds over rank 0's wall time. K = 1
   is the same code in a group of one; beside the largest K, one process with K x --threads threads taking the
   group's steps (micro-batches of K x B): the same cores and steps without a group.

Timings depend on what else runs on the machine: the JSON records the load average before and after, and the
process CPU seconds beside the wall seconds (rank 0's for a group; each rank uses about as much).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import write_json
from benchmarks.worker_bench import BEAUTY, beauty_events, settings_for
from sparc_stream.cli.allocator import tune_allocator


def owner(user, ranks: int) -> int:
    return zlib.crc32(str(user).encode()) % ranks


def time_rounds(learner, rounds: Sequence[tuple[int, list[dict]]], warmup: int, start_clock=None) -> dict:
    """learner.learn on each round's events, histories advanced after it; all but the first `warmup` rounds
    timed. rounds: (events the round reads, the events this learner learns of them). start_clock: called when
    the clock starts (a barrier, for ranks)."""
    from trainer.online import advance_histories

    histories: dict[str, list[int]] = {}
    timed = steps = 0
    start, cpu0 = None, 0.0
    for n, (read, events) in enumerate(rounds):
        if n == warmup:
            if start_clock is not None:
                start_clock()
            start, cpu0 = time.perf_counter(), time.process_time()
        metrics = learner.learn(events, histories)
        advance_histories(histories, events, learner.max_len)
        if start is not None:
            timed += read
            steps += "loss" in metrics
    seconds = time.perf_counter() - start if start is not None else 0.0
    cpu = time.process_time() - cpu0 if start is not None else 0.0
    return {"events_timed": timed, "steps_timed": steps, "seconds": seconds, "cpu_seconds": cpu,
            "events_per_second": timed / seconds if seconds else None,
            "events_per_cpu_second": timed / cpu if cpu else None,
            "ms_per_step": 1000 * seconds / steps if steps else None}


def batches(feedback: Sequence[dict], size: int) -> list[list[dict]]:
    return [list(feedback[i : i + size]) for i in range(0, len(feedback), size)]


def device_runs(items, feedback, batch_sizes: Sequence[int], warmup: int, threads: int,
                devices: Sequence[str] = ("cpu", "cuda")) -> dict[str, Any]:
    """Part 1 on each of `devices` that torch has (cuda: where it sees a GPU)."""
    import torch

    from trainer.online import OnlineLearner

    torch.set_num_threads(threads)
    settings = settings_for({})
    out: dict[str, Any] = {}
    for device in [d for d in devices if d != "cuda" or torch.cuda.is_available()]:
        rows = []
        for bs in batch_sizes:
            learner = OnlineLearner(settings.sparc_config(), settings.train_config(), device=device)
            learner.observe_items(items)
            rounds = [(len(b), b) for b in batches(feedback, bs)]
            rows.append({"batch_size": bs, **time_rounds(learner, rounds, warmup)})
            print(f"{device:<5} B={bs:<5} {rows[-1]['events_per_second']:>8.0f} events/s "
                  f"{rows[-1]['ms_per_step']:>7.1f} ms/step", flush=True)
        out[device] = {"device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or
                       platform.machine(), "runs": rows}
    if "cuda" in devices and "cuda" not in out:
        out["cuda"] = "not measured: torch sees no CUDA GPU on this machine"
    return out


def _rank(rank: int, ranks: int, store: str, out: str, events: int, batch_size: int, warmup: int,
          threads: int) -> None:
    """One rank of the data-parallel run (spawned): rounds of ranks x batch_size events, its users' share."""
    import torch
    import torch.distributed as dist

    from trainer.distributed import DataParallelLearner, init_group, leave_group

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    torch.set_num_threads(threads)
    items, feedback = beauty_events(BEAUTY, events)
    init_group(rank, ranks, f"file://{store}", backend="gloo", timeout_s=600)
    try:
        settings = settings_for({})
        learner = DataParallelLearner(settings.sparc_config(), settings.train_config())
        learner.observe_items(items if rank == 0 else [])
        rounds = [(len(w), [e for e in w if owner(e["user_id"], ranks) == rank])
                  for w in batches(feedback, ranks * batch_size)]
        timing = time_rounds(learner, rounds, warmup, start_clock=dist.barrier)
        in_sync = learner.parallel.in_sync(learner.model)  # a collective: every rank takes part
        if rank == 0:
            Path(out).write_text(json.dumps({"ranks": ranks, "threads_per_rank": threads, "batch_per_rank": batch_size,
                                             **timing, "in_sync": in_sync}))
    finally:
        leave_group()


def data_parallel_runs(events: int, batch_size: int, warmup: int, ranks: Sequence[int], threads: int
                       ) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    rows = []
    for k in ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/rank0.json"
            mp.start_processes(_rank, args=(k, f"{tmp}/store", out, events, batch_size, warmup, threads),
                               nprocs=k, start_method="spawn")
            rows.append(json.loads(Path(out).read_text()))
        print(f"K={k} x {threads} thread(s), B={batch_size} per rank: {rows[-1]['events_per_second']:.0f} events/s "
              f"{rows[-1]['ms_per_step']:.1f} ms/step", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    tune_allocator()  # as every entry point does (sparc_stream/cli/allocator.py)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSON result")
    p.add_argument("--events", type=int, default=12_288, help="feedback events per run (default 12,288)")
    p.add_argument("--batch-sizes", default="64,1024", help="micro-batch sizes of part 1 (default 64,1024; "
                   "64 is the worker's default)")
    p.add_argument("--warmup", type=int, default=2, help="untimed batches (rounds) at the start (default 2)")
    p.add_argument("--ranks", default="1,2", help="data-parallel group sizes of part 2 (default 1,2; '' skips)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    args = p.parse_args(argv)
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    ranks = [int(k) for k in args.ranks.split(",") if k.strip()]
    load_before = os.getloadavg()
    items, feedback = beauty_events(BEAUTY, args.events)
    result: dict[str, Any] = {
        "command": "python -m benchmarks.learner_bench " + " ".join(sys.argv[1:] if argv is None else argv),
        "events": len(feedback), "warmup_batches": args.warmup, "cpus": os.cpu_count(),
        "devices": device_runs(items, feedback, batch_sizes, args.warmup, args.threads),
    }
    if ranks:
        result["data_parallel"] = data_parallel_runs(args.events, batch_sizes[0], args.warmup, ranks, args.threads)
        k = max(ranks)
        if k > 1:  # the group's steps (K x B events) on the same cores, in one process without a group
            single = device_runs(items, feedback, [k * batch_sizes[0]], args.warmup, args.threads * k, ["cpu"])
            result["one_process_same_cores"] = {"threads": args.threads * k, **single["cpu"]["runs"][0]}
    result["load_average"] = {"before": load_before, "after": os.getloadavg()}
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
