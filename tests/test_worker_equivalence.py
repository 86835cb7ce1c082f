"""The same events through replay in-process and through the Kafka worker give the same snapshots, bit for bit.

Replay side: replay.prequential.Prequential (the evolving regime only), which drives the worker's own functions
in-process: streams.history.apply_feedback (de-duplication, the history before each event), micro-batches of B
events with each user's history before its first event in the batch (streams.batching's view) and
trainer.online.OnlineLearner.learn. Worker side: `sparc worker` in a subprocess against the real broker.

Why equality can hold, and what the test fixes to make it hold:
- same seed and model config: both come from one WorkerSettings (the worker gets them as flags/environment);
- same catalogue before the first step: 1,024 item events (= the catalog agent's batch size, so they arrive in one
  batch) are applied before any feedback is produced, as replay applies them with its first micro-batch;
- same batches in the same order: one feedback partition, one train partition, 320 events = 10 batches of
  B = 32, and a batch timeout (batch_seconds) far longer than any gap, so every train batch is full; the
  worker's processed log shows its batches, and the test checks them against replay's before comparing tensors;
- same random numbers: the learner's dropout draws from its own RNG state and its codebook updates from its own
  generator (trainer.online), and the worker's publisher thread builds serving models without touching them;
- same arithmetic: one torch thread on both sides (the worker's torch_threads, the tests' conftest), same machine.
So the tolerance is zero: every tensor of every snapshot (codebooks, item codes, all weights) is bit-equal to
replay's model after the same number of steps. A snapshot is published after every step (snapshot_every_steps 1).
Every wait is bounded and fails naming what it waited for; nothing is timed.
"""

from __future__ import annotations

import json
import uuid

import numpy as np
import pytest
import torch
from kafka import KafkaProducer
from worker_harness import WorkerProcess, delete_topics_of, log_tail, read_processed_log

from codebook_store import open_store
from replay.prequential import Prequential, ReplaySettings
from streams.settings import WorkerSettings
from trainer.online import LearnerState

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(600)]

USERS, CATALOGUE, EVENTS, BATCH = 40, 1024, 320, 32
MODEL = {"dim": 32, "layers": 1, "max_len": 20, "codes": 16, "num_attributes": 64, "seed": 3}


def make_events(seed: int = 0) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(seed)
    items = [{"item_id": i, "attributes": sorted({int(a) for a in rng.integers(1, 65, size=int(rng.integers(1, 4)))}),
              "timestamp": 1_700_000_000} for i in range(1, CATALOGUE + 1)]
    # a few popular items per user so that there is something to learn; users interleaved at random
    users = rng.integers(1, USERS + 1, size=EVENTS)
    feedback = [{"event_id": f"q{n}", "user_id": int(u), "item_id": int((u * 25 + rng.integers(0, 12)) % CATALOGUE + 1),
                 "timestamp": 1_700_000_000 + n, "event_type": "view"} for n, u in enumerate(users)]
    return items, feedback


def replayed(settings: WorkerSettings, items: list[dict], feedback: list[dict]) -> dict[int, LearnerState]:
    """Replay's model after each number of steps (captured before each micro-batch is learnt, and at the end)."""
    engine = Prequential(ReplaySettings(
        model=settings.sparc_config(), train=settings.train_config(), regimes=("evolving",),
        batch_size=settings.batch_size, window_events=10**6, freeze_at=10**9, eval_per_batch=1,
        dedup_window=settings.dedup_window,
    ))
    states: dict[int, LearnerState] = {}
    capture = lambda _scored: states.setdefault(engine.online.steps, engine.online.snapshot_state())  # noqa: E731
    for _ in engine.run([*items, *feedback], observer=capture):
        pass
    states[engine.online.steps] = engine.online.snapshot_state()
    return states


def differences(state: LearnerState, snapshot) -> list[str]:
    out = [] if state.config == snapshot.config else ["config"]
    pairs = {"codebooks": (state.codebooks, snapshot.codebooks), "item_codes": (state.item_codes, snapshot.item_codes)}
    pairs.update({f"weights[{k}]": (v, snapshot.weights.get(k)) for k, v in state.weights.items()})
    for name, (a, b) in pairs.items():
        if b is None or a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
            out.append(name if b is None or a.shape != b.shape else f"{name} (max |diff| "
                       f"{(a.double() - b.double()).abs().max().item():.3g})")
    return out


def test_replay_and_worker_give_the_same_snapshots(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    topics = {name: f"equiv-{name.lower()}-{run}" for name in ("FEEDBACK", "ITEM", "UPDATES", "DLQ")}
    app_id, processed = f"equiv-{run}", tmp_path / "processed.jsonl"
    fields = {**MODEL, "batch_size": BATCH, "batch_seconds": 600.0, "partitions": 1, "snapshot_every_steps": 1,
              "snapshot_every_seconds": 3600.0, "torch_threads": 1, "app_id": app_id,
              **{f"{name.lower()}_topic": topic for name, topic in topics.items()}}
    settings = WorkerSettings(**fields)  # the one source of both sides' settings
    items, feedback = make_events()
    states = replayed(settings, items, feedback)
    final_steps = max(states)
    assert final_steps >= 8
    # replay learns consecutive micro-batches of exactly B events (no duplicates here, delay 0)
    replay_batches = [[e["event_id"] for e in feedback[i : i + BATCH]] for i in range(0, EVENTS, BATCH)]

    env = {f"SPARC_{k.upper()}": str(v) for k, v in fields.items()}
    w = WorkerProcess(tmp_path, [f"--broker={kafka_bootstrap}", f"--store=file://{tmp_path}/store",
                                 f"--data-dir={tmp_path}/faust", f"--processed-log={processed}"], env)
    url = f"file://{tmp_path}/store"
    code = "never stopped"
    try:
        w.start()
        producer = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for item in items:
            producer.send(topics["ITEM"], key=str(item["item_id"]).encode(), value=json.dumps(item).encode())
        producer.flush()
        w.wait_for(f"{CATALOGUE} item events applied", lambda: w.metric("sparc_item_events_total") == CATALOGUE, 120)
        for e in feedback:
            producer.send(topics["FEEDBACK"], key=str(e["user_id"]).encode(), value=json.dumps(e).encode())
        producer.flush()
        producer.close()

        def final_snapshot_stored() -> bool:
            with open_store(url, read_only=True) as store:
                return any(info.health.get("steps") == final_steps for info in store.list())

        w.wait_for(f"a snapshot of step {final_steps}", final_snapshot_stored, 180)
    finally:
        if w.process is not None:
            code = w.terminate()
        delete_topics_of(kafka_bootstrap, run)
    assert code == 0, f"worker exit status {code}; log tail:\n{log_tail(w.log)}"

    worker_batches = [line["event_ids"] for line in read_processed_log(processed) if "event_ids" in line]
    assert worker_batches == replay_batches, "the worker's micro-batches differ from replay's: no equality to expect"
    with open_store(url, read_only=True) as store:
        snapshots = {(s := store.get(v)).health["steps"]: s for v in store.versions()}
    assert final_steps in snapshots and len(snapshots) >= 5
    compared = sorted(set(snapshots) & set(states))
    assert final_steps in compared and len(compared) >= 5, (sorted(snapshots), sorted(states))
    for steps in compared:
        assert differences(states[steps], snapshots[steps]) == [], f"after step {steps}"
    assert "codebooks" in " ".join(differences(states[compared[0]], snapshots[final_steps]))  # learning moved them
    print(f"bit-equal after steps {compared} ({len(snapshots)} snapshots, {len(worker_batches)} batches)")
