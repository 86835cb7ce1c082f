"""CPU seconds per 1,000 events of each stage of the scale-out roles' own code, no broker.

    python -m benchmarks.stage_profile --out runs/stage_profile.json
    python -m benchmarks.stage_profile --events 20000 --batch-size 1024 --out runs/stage_profile.json
    python -m benchmarks.stage_profile --torch-threads 2 --out runs/stage_profile_2threads.json

The Beauty events (as `sparc produce` sends them) go through the functions `sparc ingest` and `sparc learn`
call, in this process, each stage timed with the CPU clock (other jobs on the machine stretch the wall clock
far more than this): the thread's (time.thread_time) for every stage but `step`, which takes the process's
(time.process_time: torch's intra-op threads work for it):

  ingest (streams.agents.handle_feedback, per micro-batch of --batch-size messages):
    validate      records.validate_feedback of the raw bytes
    source        the record's Source
    route         routing.home_partition / train_partition
    history       the table value decoded, history.apply_feedback, the new value encoded (a dict stands in for
                  the RocksDB store: its own cost is not here)
    example       records.TrainExample
    encode        batching.encode_train_batches (the train message's bytes)
  learn (streams.learning.Learning.parse / learn_step; torch_threads 1, as `sparc learn` sets it):
    decode        batching.read_train_batch of each train message
    input         batching.learner_input
    step          OnlineLearner.learn
    capture       OnlineLearner.capture (every --snapshot-every steps; in the learner's thread)
    publish       Publisher.publish in a memory:// store (the publisher's thread in `sparc learn`)

Not here: Faust's and the Kafka clients' own work (polling, the producer, acks, commits), RocksDB, the broker.
`benchmarks.worker_bench` measures those end to end (CPU per event per process).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import write_json
from benchmarks.worker_bench import BEAUTY, BEAUTY_ITEMS, beauty_events


def profile(items: list[dict], feedback: list[dict], s, snapshot_every: int) -> dict:
    """The stages' CPU over `feedback` (after the catalogue `items`) with WorkerSettings `s`."""
    import torch

    from streams.batching import encode_train_batches, learner_input, read_train_batch
    from streams.history import apply_feedback, decode_state, encode_state
    from streams.publisher import Publisher
    from streams.records import Source, TrainExample, validate_feedback
    from streams.routing import home_partition, train_partition
    from trainer.online import OnlineLearner

    torch.set_num_threads(s.torch_threads)
    batch_size = s.batch_size
    raws = [json.dumps(e).encode() for e in feedback]
    cpu: Counter = Counter()
    clock = time.thread_time

    # ---------------------------------------------------------------- ingest
    table: dict[str, bytes] = {}
    messages: list[bytes] = []
    now = time.time()
    offset = 0
    for start in range(0, len(raws), batch_size):
        chosen = []
        updated: dict[str, dict] = {}
        for raw in raws[start:start + batch_size]:
            t0 = clock()
            event = validate_feedback(raw, max_bytes=s.max_event_bytes, now=now)
            t1 = clock()
            source = Source(topic="feedback-events", partition=0, offset=offset)
            offset += 1
            t2 = clock()
            home = home_partition(event.user_id, s.partitions)
            train_partition(home, s.train_topic_partitions)
            t3 = clock()
            user = event.user_id
            state = updated[user] if user in updated else decode_state(table.get(user))
            applied = apply_feedback(state, event.event_id, event.item_id, s.max_len, s.dedup_window,
                                     partition=0, offset=source.offset)
            t4 = clock()
            example = TrainExample(event=event, history=applied.history, source=source)
            t5 = clock()
            updated[user] = applied.state
            chosen.append(example)
            cpu["ingest.validate"] += t1 - t0
            cpu["ingest.source"] += t2 - t1
            cpu["ingest.route"] += t3 - t2
            cpu["ingest.history"] += t4 - t3
            cpu["ingest.example"] += t5 - t4
        t0 = clock()
        messages.extend(encode_train_batches(chosen, s.train_message_bytes))
        t1 = clock()
        for user, state in updated.items():
            table[user] = encode_state(state)
        t2 = clock()
        cpu["ingest.encode"] += t1 - t0
        cpu["ingest.history"] += t2 - t1

    # ---------------------------------------------------------------- learn
    learner = OnlineLearner(s.sparc_config(), s.train_config(), catalogue=s.catalogue_config())
    learner.observe_items(items)
    publisher = Publisher("memory://", "sparc", s.gate_thresholds())
    snapshots = steps = 0
    try:
        for i, raw in enumerate(messages):
            t0 = clock()
            batch = read_train_batch(raw)
            t1 = clock()
            inp = learner_input([batch], [Source(topic="train", partition=0, offset=i)])
            t2 = clock()
            p2 = time.process_time()
            steps += "loss" in learner.learn(inp.events, inp.histories)
            p3 = time.process_time()
            cpu["learn.decode"] += t1 - t0
            cpu["learn.input"] += t2 - t1
            cpu["learn.step"] += p3 - p2
            if (i + 1) % snapshot_every == 0:
                t0 = clock()
                state, health = learner.capture()
                t1 = clock()
                publisher.publish(state, health, inp.watermark, time.time())
                t2 = clock()
                cpu["learn.capture"] += t1 - t0
                cpu["learn.publish"] += t2 - t1
                snapshots += 1
    finally:
        publisher.close()
    n = len(feedback)
    per_k = {k: round(1000 * v / n, 4) for k, v in sorted(cpu.items())}
    for role in ("ingest", "learn"):
        per_k[f"{role}.total"] = round(sum(v for k, v in per_k.items() if k.startswith(f"{role}.")), 4)
    return {"events": n, "batch_size": batch_size, "train_messages": len(messages), "steps": steps,
            "snapshots": snapshots,
            "snapshot_every_messages": snapshot_every, "torch_threads": s.torch_threads,
            "cpu_seconds_per_1000_events": per_k}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.stage_profile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="write the JSON result here")
    p.add_argument("--data", type=Path, default=BEAUTY, help="S3-Rec dataset folder (default Amazon Beauty)")
    p.add_argument("--events", type=int, default=20_000, help="feedback events, first N in time order")
    p.add_argument("--batch-size", type=int, default=1024, help="micro-batch (messages per train message)")
    p.add_argument("--torch-threads", type=int, default=1,
                   help="the learner's torch_threads (2: what `sparc learn` used before it set it, on 2 cores)")
    p.add_argument("--snapshot-every", type=int, default=5, help="capture and publish every N train messages")
    args = p.parse_args(argv)
    from streams.settings import WorkerSettings

    items, feedback = beauty_events(args.data, args.events)
    settings = WorkerSettings(batch_size=args.batch_size, initial_items=BEAUTY_ITEMS, torch_threads=args.torch_threads)
    result = profile(items, feedback, settings, args.snapshot_every)
    result["command"] = "python -m benchmarks.stage_profile " + " ".join(argv if argv is not None else sys.argv[1:])
    result["loadavg"] = os.getloadavg()
    write_json(args.out, result)
    for stage, value in result["cpu_seconds_per_1000_events"].items():
        print(f"{stage:18s} {value:8.4f} CPU-s / 1,000 events")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
