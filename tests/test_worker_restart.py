"""Restart recovery against a real broker: `sparc worker` stopped by SIGTERM and killed by SIGKILL while events
keep arriving, and started again each time (warm start from the store, tables from RocksDB + changelog).

A producer thread feeds 3,600 events (120 users x 30, unique event ids) at a modest pace, so both stops land
while events are in flight. Run 1 starts cold and is SIGTERMed after its first snapshot; run 2 warm-starts and
is SIGKILLed after it has published one more; run 3 warm-starts and finishes the stream. Then:
- no event is lost: the latest snapshot has learnt every event id (the worker's processed log, read by
  worker_harness.learnt_event_ids: the lineage of learnt batches below the snapshot's train watermark);
- user history is recovered: every user's history (/retrieve's history_length) holds each of its 30 events
  exactly once (max_len is 50, so nothing is cut);
- versions: those announced on codebook-updates increase strictly across the three runs (no repeat), every
  one is in the store, and every stored version after the first has a parent (runs 2 and 3 continued the
  lineage of the snapshot they started from instead of starting a fresh model).
Every wait is bounded and fails naming what it waited for; nothing is timed.
"""

from __future__ import annotations

import uuid
from collections import Counter

import numpy as np
import pytest
from worker_harness import (
    TINY_MODEL,
    PacedProducer,
    Reader,
    WorkerProcess,
    announced,
    delete_topics_of,
    get_json,
    json_messages,
    learnt_event_ids,
    log_tail,
    read_processed_log,
    train_positions,
)

from codebook_store import open_store

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

USERS, PER_USER, ITEMS = 120, 30, 250
EVENTS_PER_SECOND = 150


def feedback_events(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(1, USERS + 1), PER_USER))
    return [
        {"event_id": f"r{n}", "user_id": int(user), "item_id": int(rng.integers(1, ITEMS + 1)),
         "timestamp": 1_700_000_000 + n, "event_type": "view"}
        for n, user in enumerate(order)
    ]


def test_worker_recovers_from_sigterm_and_sigkill(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    topics = {name: f"restart-{name.lower()}-{run}" for name in ("FEEDBACK", "ITEM", "UPDATES", "DLQ")}
    app_id, processed = f"restart-{run}", tmp_path / "processed.jsonl"
    env = {**{f"SPARC_{name}_TOPIC": topic for name, topic in topics.items()}, **TINY_MODEL,
           "SPARC_MAX_LEN": "50", "SPARC_SESSION_TIMEOUT": "10"}
    flags = (f"--broker {kafka_bootstrap} --store rocksdb://{tmp_path}/store --data-dir {tmp_path}/faust "
             f"--batch-size 32 --app-id {app_id} --partitions 2 --snapshot-every-steps 5 "
             f"--snapshot-every-seconds 2 --processed-log {processed}")
    events = feedback_events()
    w = WorkerProcess(tmp_path, flags.split(), env)
    producer = PacedProducer(kafka_bootstrap, topics["FEEDBACK"], json_messages(events), EVENTS_PER_SECOND)
    updates = None
    code = "never stopped"
    try:
        # run 1: cold start, stopped by SIGTERM after its first snapshot, mid-stream
        w.start()
        updates = Reader(kafka_bootstrap, topics["UPDATES"])
        producer.start()
        w.wait_for("a first codebook update", lambda: announced(updates.poll()), 180)
        w.wait_for("300 events ingested", lambda: w.metric("sparc_events_total") >= 300, 120)
        at_sigterm = producer.sent
        assert w.terminate() == 0, f"SIGTERM: the worker did not stop cleanly; log:\n{log_tail(w.log)}"
        before_kill = max(u.version for u in announced(updates.poll()))

        # run 2: warm start, killed by SIGKILL once it has published a snapshot of its own
        w.start()
        w.wait_for("the warm start in the log", lambda: "warm start from sparc v" in w.log.read_text(), 30)
        w.wait_for(f"a codebook update after v{before_kill}",
                   lambda: max(u.version for u in announced(updates.poll())) > before_kill, 180)
        w.wait_for("300 more events learnt", lambda: w.metric("sparc_learnt_events_total") >= 300, 120)
        at_sigkill = producer.sent
        w.kill()

        # run 3: warm start again; it finishes the stream
        w.start()
        w.wait_for("the warm start in the log", lambda: "warm start from sparc v" in w.log.read_text(), 30)
        producer.join(timeout=120)
        assert not producer.is_alive() and producer.error is None, f"the producer failed: {producer.error!r}"
        wanted = {e["event_id"] for e in events}

        def missing() -> set[str] | None:
            status, latest = get_json(w.port, "/snapshots/latest")
            if status != 200:
                return None
            upto = train_positions(latest["watermark"]["kafka"], app_id)
            return wanted - set(learnt_event_ids(read_processed_log(processed), upto)) if upto else None

        w.wait_for("a latest snapshot that has learnt every event", lambda: missing() == set(), 300)

        # user history: every event exactly once
        for user in range(1, USERS + 1):
            status, body = get_json(w.port, f"/retrieve/{user}?k=5")
            assert status == 200, body
            assert body["history_length"] == PER_USER, f"user {user}: {body['history_length']} items in history"
        redelivered = w.metric("sparc_redelivered_events_total")
        skipped = w.metric("sparc_resume_skipped_messages_total")
        messages = announced(updates.poll())
    finally:
        producer.finish()
        if updates is not None:
            updates.close()
        if w.process is not None:
            code = w.terminate()
        delete_topics_of(kafka_bootstrap, run)
    assert code == 0, f"worker exit status {code}; log tail:\n{log_tail(w.log)}"

    # versions: strictly increasing across the three runs, all stored, one lineage
    versions = [m.version for m in messages]
    assert versions == sorted(versions) and len(versions) == len(set(versions)), versions
    with open_store(f"rocksdb://{tmp_path}/store", read_only=True) as store:
        stored = store.versions()
        parents = {v: store.manifest(v).parent for v in stored}
    assert set(versions) <= set(stored)
    assert all(parents[v] is not None and parents[v] < v for v in stored[1:]), parents

    # the processed log: a cold start, then two warm starts from stored versions
    starts = [line["start"] for line in read_processed_log(processed) if "start" in line]
    assert [s["version"] is None for s in starts] == [True, False, False], starts
    assert all(s["version"] in stored and train_positions(s["resume"], app_id) for s in starts[1:]), starts
    everything = {f"{app_id}-train-examples:{p}": 10**12 for p in range(2)}
    learnt = Counter(learnt_event_ids(read_processed_log(processed), everything))
    print(f"producer at SIGTERM {at_sigterm}, at SIGKILL {at_sigkill} of {len(events)}; versions {versions}; "
          f"starts {starts}; re-delivered {redelivered}, skipped on resume {skipped}, "
          f"learnt twice {sum(1 for n in learnt.values() if n > 1)}")
