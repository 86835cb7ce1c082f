"""The learn role without a broker: streams.learn_loop.LearnLoop over a consumer that hands out recorded records
(the methods of kafka-python's KafkaConsumer the loop calls), streams.learning.Learning behind it, a file://
store. The loop joins train messages of several partitions into steps, applies item events, publishes beside
training, commits what a snapshot has learnt, publishes once more when stopped, and a restarted learner seeks
every partition to its snapshot's watermark. Fencing: a second learner's claim stops the first. The same loop
runs against the real broker in test_roles_kafka.py.
"""

from __future__ import annotations

import json
import threading
from collections import defaultdict

import pytest
from kafka import TopicPartition
from test_streams_agents import Record, RecordingOutputs, fb, train_messages
from worker_harness import learnt_event_ids, read_processed_log

from codebook_store import FencedError, open_store
from replay.synthetic import SyntheticConfig, generate
from streams.learn_loop import LearnLoop, assigned_train_partitions
from streams.learning import Learning
from streams.settings import WorkerSettings
from streams.views import health_payload, liveness


class FakeConsumer:
    """Hands out the given records (per topic-partition, from the position the loop seeks to), a few per poll;
    once they are all handed out, a poll sets `stop` (the end of the test's stream)."""

    def __init__(self, records: list[Record], stop: threading.Event, per_poll: int = 3,
                 committed: dict | None = None):
        self.by_tp: dict[TopicPartition, list[Record]] = defaultdict(list)
        for r in records:
            self.by_tp[TopicPartition(r.topic, r.partition)].append(r)
        self.stop, self.per_poll = stop, per_poll
        self.positions: dict[TopicPartition, int] = {}
        self.seeks: dict[TopicPartition, int | str] = {}
        self.commits: list[dict] = []
        self.stored = dict(committed or {})
        self.closed = False

    def assign(self, parts):
        self.assigned = list(parts)

    def committed(self, tp):
        return self.stored.get(tp)

    def seek(self, tp, offset):
        self.positions[tp] = self.seeks[tp] = offset

    def seek_to_beginning(self, tp):
        self.positions[tp], self.seeks[tp] = 0, "beginning"

    def poll(self, timeout_ms=0, max_records=500):
        out = {}
        for tp in self.assigned:
            records = [r for r in self.by_tp[tp] if r.offset >= self.positions[tp]][: self.per_poll]
            if records:
                out[tp] = records
                self.positions[tp] = records[-1].offset + 1
        if not out:
            self.stop.set()
        return out

    def highwater(self, tp):
        return len(self.by_tp[tp])

    def position(self, tp):
        return self.positions[tp]

    def commit(self, offsets):
        self.commits.append({(tp.topic, tp.partition): om.offset for tp, om in offsets.items()})
        self.stored.update({tp: om.offset for tp, om in offsets.items()})

    def close(self):
        self.closed = True


def settings(tmp_path, **over) -> WorkerSettings:
    base = dict(app_id="learn-test", store_url=f"file://{tmp_path}/store", partitions=2, dim=16, max_len=5,
                layers=1, codes=8, num_attributes=200, batch_size=32, snapshot_every_steps=4,
                snapshot_every_seconds=3600, processed_log=tmp_path / "processed.jsonl")
    return WorkerSettings(**{**base, **over})


@pytest.fixture(scope="module")
def stream():
    return generate(SyntheticConfig(n_users=40, n_events=900, n_initial_items=100, n_new_items=10, seed=1))


def records_of(s: WorkerSettings, stream) -> tuple[list[Record], list[Record]]:
    """The stream's catalogue as item-events records (2 partitions) and its feedback as train messages of 16
    events, alternately in train partitions 0 and 1 (each partition's offsets from 0)."""
    events = list(stream.iter_events())
    catalogue = [e for e in events if "event_id" not in e]
    items = [Record(s.item_topic, n % 2, n // 2, json.dumps(e).encode(), str(e["item_id"]).encode())
             for n, e in enumerate(catalogue)]
    small = s.model_copy(update={"batch_size": 16})
    train = [Record(s.train_topic, n % 2, n // 2, raw)
             for n, (raw, _) in enumerate(train_messages(_Holder(small), events))]
    return items, train


class _Holder:  # what train_messages reads of a worker
    def __init__(self, s):
        self.settings = s


def run_loop(learning: Learning, s: WorkerSettings, consumer: FakeConsumer) -> LearnLoop:
    loop = LearnLoop(learning, s, consumer_factory=lambda _: consumer)
    loop.run(consumer.stop)
    return loop


def test_the_loop_joins_messages_into_steps_publishes_beside_training_and_commits_what_snapshots_learnt(
        tmp_path, stream):
    s = settings(tmp_path)
    items, train = records_of(s, stream)
    out = RecordingOutputs()
    learning = Learning(s, out.learn)
    stop = threading.Event()
    consumer = FakeConsumer(items + train, stop)
    run_loop(learning, s, consumer)
    learning.close()

    assert consumer.closed and {tp.topic for tp in consumer.assigned} == {s.train_topic, s.item_topic}
    assert all(v == "beginning" for v in consumer.seeks.values())  # a cold start, no committed positions
    lines = read_processed_log(s.processed_log)
    steps = [line for line in lines if "step" in line]
    assert all(len(line["event_ids"]) <= 32 for line in steps)
    assert max(len(line["read"]) for line in steps) == 2  # a step joins both partitions' messages
    with open_store(s.store_url, read_only=True) as store:
        latest = store.get(store.latest_version())
        versions = store.versions()
    assert latest.health["steps"] == learning.learner.steps == len(steps)  # the stop published the last steps
    watermark = latest.watermark["kafka"]
    ends = {f"{tp.topic}:{tp.partition}": len(records) for tp, records in consumer.by_tp.items()}
    assert {k: v for k, v in watermark.items() if k.split(":")[0] in (s.train_topic, s.item_topic)} == ends
    every = {e["event_id"] for e in stream.iter_events() if "event_id" in e}
    assert set(learnt_event_ids(lines, watermark)) == every
    assert consumer.commits[-1] == {tuple([k.rsplit(":", 1)[0], int(k.rsplit(":", 1)[1])]): v
                                    for k, v in ends.items()}
    assert len(consumer.commits) == len(versions) == len(out.announced)  # every snapshot committed its positions
    assert learning.learner.num_items == 110

    # a restart: the new learner seeks every partition to the snapshot's positions; nothing is learnt twice
    again = Learning(s, RecordingOutputs().learn)
    assert again.warm_version == latest.version
    stop = threading.Event()
    resumed = FakeConsumer(items + train, stop, committed=consumer.stored)
    run_loop(again, s, resumed)
    again.close()
    assert {f"{tp.topic}:{tp.partition}": v for tp, v in resumed.seeks.items()} == ends
    assert again.learner.steps == latest.health["steps"]


def test_data_parallel_ranks_split_the_train_partitions():
    s = WorkerSettings(train_partitions=8, world_size=3, rank=1)
    assert assigned_train_partitions(s) == [1, 4, 7]
    assert assigned_train_partitions(s.model_copy(update={"rank": 0})) == [0, 3, 6]
    with pytest.raises(ValueError, match="rank 3 is not below world_size 3"):
        WorkerSettings(world_size=3, rank=3)


def test_a_second_learner_fences_the_first_which_stops_saying_why(tmp_path, stream):
    """Two learners of one model on one store: the one started later claims the model, the first's next
    publication is refused by the store (nothing stored) and its loop stops; its probes say why."""
    s = settings(tmp_path, snapshot_every_steps=2)
    items, train = records_of(s, stream)
    first = Learning(s, RecordingOutputs().learn)
    first.observe_items(items)
    first.learn_step(first.parse(train[:2]))
    assert first.publish(first.capture()).accepted
    second = Learning(s, RecordingOutputs().learn)  # warm-starts from the first's snapshot, claims the model
    assert second.warm_version == 0 and second.epoch == first.epoch + 1
    first.learn_step(first.parse(train[2:4]))
    with pytest.raises(FencedError, match=f"holds epoch {first.epoch}, but epoch {second.epoch} is learn rank 0"):
        first.publish(first.capture())
    assert first.fenced and "learn rank 0 on" in first.fenced
    with open_store(s.store_url, read_only=True) as store:
        assert store.versions() == [0]  # the fenced learner stored nothing

    stop = threading.Event()
    loop = LearnLoop(first, s, consumer_factory=lambda _: FakeConsumer(train[4:], stop))
    loop.run(stop)  # ends at once: a fenced learner takes no further step and publishes nothing
    assert first.learner.steps == 2 and not stop.is_set()

    class Node:  # what the probes read of a learn process
        learning, serving, metrics, settings = first, None, first.metrics, s

        def problems(self):
            return [f"fenced: {first.fenced}"]

        def failure(self):
            return f"fenced: {first.fenced}"

    assert health_payload(Node())["status"] == "fenced"
    status, body = liveness(Node())
    assert status == 503 and body["reason"].startswith("fenced: ")
    assert second.publish(second.capture()).accepted  # the second writes on
    with open_store(s.store_url, read_only=True) as store:
        assert store.versions() == [0, 1] and store.writer()[0] == second.epoch
    first.close()
    second.close()


def test_train_records_below_the_warm_start_position_and_malformed_ones_are_skipped(tmp_path, caplog):
    s = settings(tmp_path)
    learning = Learning(s, RecordingOutputs().learn)
    learning.resume = {f"{s.train_topic}:0": 5}
    good = json.dumps({"events": [json.loads(fb("a", 1, 2))], "histories": {"1": []}, "watermark": {}}).encode()
    parsed = learning.parse([Record(s.train_topic, 0, 4, good), Record(s.train_topic, 0, 5, good),
                             Record(s.train_topic, 0, 6, b"{broken"), Record(s.train_topic, 1, 0, good)])
    assert [(m.source.partition, m.source.offset) for m in parsed] == [(0, 5), (1, 0)]
    assert "skipping a malformed train message" in caplog.text
    assert "sparc_resume_skipped_messages_total 1.0" in learning.metrics.render().decode()
    learning.close()


def test_a_step_takes_the_partitions_in_turn_so_a_backlog_cannot_hold_fresh_messages_back():
    from streams.learn_loop import Buffer
    from streams.learning import TrainMessage
    from streams.records import Source

    def messages(partition: int, n: int, events: int) -> list:
        batch = type("B", (), {"events": [None] * events})()
        return [TrainMessage(batch, Source(topic="t", partition=partition, offset=o)) for o in range(n)]

    buffer = Buffer()
    buffer.add(0, messages(0, 50, 16))  # a backlog in partition 0
    buffer.add(1, messages(1, 2, 16))
    buffer.add(2, messages(2, 1, 40))
    first = buffer.take(64)  # partition 2's 40 events do not fit after 32: the others fill the step
    assert [(m.source.partition, m.source.offset) for m in first] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    second = buffer.take(64)  # ... and the next step starts with partition 2
    assert [(m.source.partition, m.source.offset) for m in second] == [(2, 0), (0, 2)]
    assert buffer.events == 47 * 16
    big = Buffer()
    big.add(3, messages(3, 1, 500))
    assert len(big.take(64)) == 1 and big.events == 0  # a message larger than a step is a step of its own


def test_a_step_the_trainer_refuses_is_dead_lettered_event_by_event(tmp_path, stream, monkeypatch):
    """A non-finite loss or gradient (trainer.step refuses the batch, changing nothing): every event of that step
    goes to the DLQ with reason train_error and its bytes, the error is counted, and the next step trains (found by
    the fault suite: before, the step's events were dropped without a trace)."""
    s = settings(tmp_path)
    _, train = records_of(s, stream)
    out = RecordingOutputs()
    learning = Learning(s, out.learn)
    messages = learning.parse(train[:3])
    learn, calls = learning.learner.learn, {"n": 0}

    def poisoned(events, histories):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("non-finite gradient at step 1 under a finite loss")
        return learn(events, histories)

    monkeypatch.setattr(learning.learner, "learn", poisoned)
    results = [learning.learn_step([m]) for m in messages]
    assert results[0] is not None and results[1] is None and results[2] is not None
    dead = out.dead
    assert [json.loads(raw)["event_id"] for raw, *_ in dead] == [e.event_id for e in messages[1].batch.events]
    assert {invalid.reason for _, _, invalid, _ in dead} == {"train_error"}
    assert all("non-finite gradient" in invalid.detail for _, _, invalid, _ in dead)
    assert {source for *_, source in dead} == {messages[1].source}
    assert "sparc_train_errors_total 1.0" in learning.metrics.render().decode() and learning.learner.steps == 2
    learning.close()


def test_a_publish_that_cannot_write_the_store_keeps_the_previous_latest_and_raises_the_alarm(
        tmp_path, stream, monkeypatch, caplog):
    """The store's disk full during a publish (ENOSPC): training goes on, the latest version stays, the failures
    are counted and sparc_publish_failing is 1 until a publish succeeds again; a run of failures logs one
    traceback, then a line per try naming the version that stays."""
    s = settings(tmp_path)
    _, train = records_of(s, stream)
    learning = Learning(s, RecordingOutputs().learn)
    messages = learning.parse(train[:4])
    learning.learn_step(messages[:1])
    first = learning.publish(learning.capture()).version
    real = learning.publisher.publish

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(learning.publisher, "publish", full)
    for m in messages[1:3]:
        learning.learn_step([m])
        assert learning.publish(learning.capture()) is None
    text_during = learning.metrics.render().decode()
    with open_store(s.store_url, read_only=True) as store:
        latest_during = store.latest_version()
    monkeypatch.setattr(learning.publisher, "publish", real)
    learning.learn_step(messages[3:])
    after = learning.publish(learning.capture()).version
    assert latest_during == first and after > first and learning.learner.steps == 4
    assert "sparc_publish_failing 1.0" in text_during
    assert 'sparc_snapshots_total{outcome="failed"} 2.0' in text_during
    assert "sparc_publish_failing 0.0" in learning.metrics.render().decode()
    failures = [r for r in caplog.records if "storing the snapshot" in r.getMessage()]
    assert [r.exc_info is not None for r in failures] == [True, False]
    assert all(f"v{first} stays latest" in r.getMessage() for r in failures)
    learning.close()


def test_the_learn_and_serve_processes_take_the_process_settings(tmp_path, monkeypatch):
    """`sparc learn` and `sparc serve` set torch's intra-op threads (torch_threads) as `sparc worker` does; before,
    they left torch a thread per core, and on a 2-core machine the learner's second one took ~4 s of CPU from
    ingest and the broker per 30,000 events drained (benchmarks.worker_bench --roles)."""
    import sys

    import torch

    from streams import roles

    monkeypatch.setattr(roles, "learn_outputs", lambda s: RecordingOutputs().learn)
    before = torch.get_num_threads(), sys.getswitchinterval()
    try:
        for node in (roles.LearnNode, roles.ServeNode):
            torch.set_num_threads(2)
            built = node(settings(tmp_path, torch_threads=1, switch_interval=0.0002, data_dir=tmp_path / "data"))
            assert torch.get_num_threads() == 1 and sys.getswitchinterval() == pytest.approx(0.0002)
            if isinstance(built, roles.LearnNode):
                built.learning.close()
    finally:
        torch.set_num_threads(before[0])
        sys.setswitchinterval(before[1])
