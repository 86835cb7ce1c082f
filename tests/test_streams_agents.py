"""The worker's parts without a broker: the ingest agent through Faust's agent.test_context() with memory://
tables, the learner (streams.learning) fed train-topic records directly, and Outputs objects that record what
would have been sent. Also the recovery path without a broker: re-delivery (streams.history), warm start from a
file:// store, resume positions and the processed log (streams.learning).

Inside test_context a put returns once its event is in the agent's stream, and the ingest agent's micro-batches
are handled when full, after batch_seconds, or when the context ends; what reaches the train topic is checked
through the messages it would have sent, and the learner is given them as a consumer would (`learn`: one step per
message, then a snapshot when one is due, as streams.learn_loop does). Everything runs against the real broker in
test_worker_kafka.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid
from dataclasses import dataclass

import pytest
import torch
from faust.utils import json as faust_json

from codebook_store import CorruptSnapshotError, IncompatibleSnapshotError, Reassembler, Snapshot, open_store
from replay.synthetic import SyntheticConfig, generate
from streams.batching import encode_train_batches, read_train_batch
from streams.history import apply_feedback, decode_state, encode_state
from streams.records import Invalid, Source, TrainExample
from streams.roles import apply_process_settings
from streams.settings import WorkerSettings
from streams.views import health_payload, latest_payload, retrieve_payload
from streams.worker import StreamWorker


class RecordingOutputs:
    """What ingest (async) and the learner (sync: `.learn`) would have sent, in one place."""

    def __init__(self) -> None:
        self.dead: list[tuple[bytes, bytes | None, Invalid, Source]] = []
        self.messages: list[bytes] = []  # train-topic messages (encoded TrainBatch)
        self.partitions: list[int] = []  # ... and the train partition of each
        self.rekeyed: list[tuple[bytes, bytes, int]] = []  # (raw, key, partition) to the repartition topic
        self.announced: list = []  # codebook_store.CodebookUpdate, verified
        self._reassembler = Reassembler()
        self.learn = _LearnRecorder(self)

    async def dead_letter(self, raw, key, invalid, source) -> None:
        self.dead.append((raw, key, invalid, source))

    async def train(self, message, partition) -> None:
        self.messages.append(message)
        self.partitions.append(partition)

    async def repartition(self, raw, key, partition) -> None:
        self.rekeyed.append((raw, key, partition))

    def forwarded(self) -> list[tuple[str, list[int]]]:
        """(event id, the user's history before it) of every event sent to the train topic, in order: what the
        learner derives from each message (a user's first history in it, then the message's own events)."""
        out = []
        for message in self.messages:
            batch = read_train_batch(message)
            running = {user: list(items) for user, items in batch.histories.items()}
            for event in batch.events:
                out.append((event.event_id, list(running[event.user_id])))
                running[event.user_id].append(event.item_id)
        return out

    def announce(self, version, records) -> None:
        updates = [u for rec in records if (u := self._reassembler.accept(*rec)) is not None]
        assert [u.version for u in updates] == [version]
        self.announced.append(updates[0])


class _LearnRecorder:
    """The learner's (sync) outputs, recorded in the RecordingOutputs they belong to."""

    def __init__(self, into: RecordingOutputs):
        self.into = into

    def dead_letter(self, raw, key, invalid, source) -> None:
        self.into.dead.append((raw, key, invalid, source))

    def announce(self, version, records) -> None:
        self.into.announce(version, records)


@dataclass
class Record:
    """A consumed record, as kafka-python's consumer yields one."""

    topic: str
    partition: int
    offset: int
    value: bytes
    key: bytes | None = None


def learn(w: StreamWorker, raw: bytes, source: Source) -> dict | None:
    """A train-topic record through the learner as streams.learn_loop takes it (one message a step), then a
    snapshot if one is due. Returns the step's metrics (None: skipped)."""
    messages = w.learning.parse([Record(source.topic, source.partition, source.offset, raw)])
    metrics = w.learning.learn_step(messages) if messages else None
    if w.learning.publish_due():
        publish(w)
    return metrics


def publish(w: StreamWorker):
    return w.learning.publish(w.learning.capture())


def items(w: StreamWorker, messages: list[tuple[bytes, bytes | None, Source]]) -> int:
    return w.learning.observe_items([Record(s.topic, s.partition, s.offset, raw, key) for raw, key, s in messages])


def ingest_context(w: StreamWorker, topic: str | None = None):
    """The ingest agent's test_context, its events read from `topic` (default the feedback topic: the agent's
    channel has two topics, and test_context would name the source "<internal>")."""
    context = w.ingest_agent.test_context()
    context.original_channel = w.app.topic(topic or w.settings.feedback_topic)
    return context


def make_worker(tmp_path, **over) -> StreamWorker:
    settings = dict(
        app_id=f"test-{uuid.uuid4().hex[:8]}",
        store_url="memory://",
        partitions=1,
        data_dir=tmp_path,
        dim=16,
        max_len=5,
        layers=1,
        codes=8,
        num_attributes=200,
        batch_size=16,
        snapshot_every_steps=5,
        snapshot_every_seconds=3600,
        dedup_window=4,
    )
    outputs = RecordingOutputs()
    return StreamWorker(WorkerSettings(**{**settings, **over}), testing=True, outputs=outputs,
                        learn_outputs=outputs.learn)


def run(w: StreamWorker, scenario):
    async def main():
        w.app.finalize()
        w.app.flow_control.resume()
        try:
            return await scenario()
        finally:
            w.close()

    return asyncio.run(main())


def fb(event_id, user, item, ts=1_700_000_000) -> bytes:
    return json.dumps(
        {"event_id": event_id, "user_id": user, "item_id": item, "timestamp": ts, "event_type": "view"}
    ).encode()


@pytest.fixture(scope="module")
def stream():
    return generate(SyntheticConfig(n_users=40, n_events=1200, n_initial_items=100, n_new_items=10, seed=1))


def test_ingest_routes_invalid_to_the_dlq_dedups_and_updates_history(tmp_path):
    w = make_worker(tmp_path)
    out = w.outputs

    async def scenario():
        async with ingest_context(w) as agent:
            await agent.put(b"{not json", key=b"7")
            await agent.put(fb("a", 7, 3), key=b"7")
            await agent.put(fb("b", 7, 4), key=b"7")
            await agent.put(fb("a", 7, 3), key=b"7")  # re-delivered: dropped
            await agent.put(fb("c", 7, 0), key=b"7")  # item ids start at 1
            await agent.put(fb("d", 8, 4), key=b"8")
        return w.history_value("7"), w.history_value("8")

    seven, eight = run(w, scenario)
    assert [(d[0], d[1], d[2].reason) for d in out.dead] == [
        (b"{not json", b"7", "bad_json"),
        (fb("c", 7, 0), b"7", "out_of_range"),  # the original bytes, unchanged
    ]
    assert out.dead[0][3].topic == w.settings.feedback_topic and out.dead[1][3].offset == 4
    assert out.forwarded() == [("a", []), ("b", [3]), ("d", [])]
    assert read_train_batch(out.messages[-1]).watermark == {f"{w.settings.feedback_topic}:0": 6}
    assert seven == {"items": [3, 4], "recent": ["a", "b"], "offsets": [1, 2], "partition": 0}
    assert eight == {"items": [4], "recent": ["d"], "offsets": [5], "partition": 0}
    text = w.metrics.render().decode()
    assert 'sparc_dlq_messages_total{reason="bad_json",topic="' + w.settings.feedback_topic in text
    assert "sparc_duplicate_events_total 1.0" in text
    assert "sparc_events_total 3.0" in text


def test_history_keeps_max_len_items_and_a_window_of_event_ids(tmp_path):
    w = make_worker(tmp_path)

    async def scenario():
        async with ingest_context(w) as agent:
            for n in range(8):
                await agent.put(fb(f"e{n}", 1, n + 1), key=b"1")
            await agent.put(fb("e0", 1, 1), key=b"1")  # outside the window of 4 ids: accepted again
        return w.history_value("1")

    state = run(w, scenario)
    assert state == {"items": [5, 6, 7, 8, 1], "recent": ["e5", "e6", "e7", "e0"], "offsets": [5, 6, 7, 8],
                     "partition": 0}


def test_catalog_adds_a_row_per_item_and_rejects_bad_items(tmp_path):
    w = make_worker(tmp_path)
    where = [Source(topic=w.settings.item_topic, partition=0, offset=n) for n in range(3)]
    applied = items(w, [(b'{"item_id": 5, "attributes": [2, 9], "timestamp": 1700000000}', b"5", where[0]),
                        (b'{"item_id": 1.5, "timestamp": 1700000000}', b"x", where[1]),
                        (b'{"item_id": "B00-x", "attributes": [4], "timestamp": 1700000000}', b"2", where[2])])
    w.close()
    assert applied == 2 and w.learning.watermark == {f"{w.settings.item_topic}:0": 3}
    assert w.learning.learner.num_items == 2 and w.learning.learner.vocab.ids() == [None, 5, "B00-x"]
    assert w.learning.learner.model.items.attributes[1].tolist()[:2] == [2, 9]
    assert [d[2].reason for d in w.outputs.dead] == ["wrong_type"]
    assert w.outputs.dead[0][3].topic == w.settings.item_topic


def test_a_full_catalogue_dead_letters_new_items_and_their_feedback(tmp_path):
    """on_catalogue_full=refuse: an item event beyond max_items goes to the DLQ (reason catalogue_full, its
    original bytes); feedback naming a new item is not learnt and goes there too, as the train message carries
    it. Evicting instead: nothing is refused, the least recently seen item leaves (counted)."""
    w = make_worker(tmp_path, max_items=2)
    item = b'{"item_id": %d, "timestamp": 1700000000}'
    examples = [TrainExample.model_validate({
        "event": {"event_id": f"e{i}", "user_id": "u", "item_id": n, "timestamp": 1.7e9, "event_type": "view"},
        "history": [], "source": {"topic": "fb", "partition": 0, "offset": i}}) for i, n in enumerate((1, 9, 2))]
    [message] = encode_train_batches(examples, w.settings.train_message_bytes)

    def item_records(n: int) -> list:
        return [(item % i, str(i).encode(), Source(topic=w.settings.item_topic, partition=0, offset=i))
                for i in range(1, n + 1)]

    items(w, item_records(3))
    learn(w, message, Source(topic="train", partition=0, offset=0))
    w.close()
    assert w.learning.learner.vocab.ids() == [None, 1, 2]
    assert [(d[0], d[2].reason) for d in w.outputs.dead] == [
        (item % 3, "catalogue_full"),
        (examples[1].event.model_dump_json().encode(), "catalogue_full")]
    assert "max_items=2" in w.outputs.dead[0][2].detail and w.outputs.dead[1][3].topic == "train"
    text = w.metrics.render().decode()
    assert 'sparc_dlq_messages_total{reason="catalogue_full",topic="' + w.settings.item_topic in text
    assert "sparc_item_events_total 2.0" in text

    evicting = make_worker(tmp_path, max_items=2, on_catalogue_full="evict")

    items(evicting, item_records(3))
    evicting.close()
    assert evicting.learning.learner.vocab.ids() == [None, 3, 2] and evicting.outputs.dead == []
    assert "sparc_catalogue_evictions_total 1.0" in evicting.metrics.render().decode()


def test_train_publish_serve(tmp_path, stream):
    """Ingest a synthetic stream, train on its examples in micro-batches, publish, serve."""
    w = make_worker(tmp_path)
    out = w.outputs
    events = list(stream.iter_events())

    async def scenario():
        async with ingest_context(w) as ingest:
            for e in events:
                if "event_id" in e:
                    await ingest.put(json.dumps(e).encode(), key=str(e["user_id"]).encode())
        catalogue = [e for e in events if "event_id" not in e]
        items(w, [(json.dumps(e).encode(), str(e["item_id"]).encode(),
                   Source(topic=w.settings.item_topic, partition=0, offset=n)) for n, e in enumerate(catalogue)])
        assert await retrieve_payload(w, "1", {}) == (
            503,
            {"error": "no snapshot is served yet", "last_gate": []},
        )
        for offset, message in enumerate(out.messages):
            learn(w, message, Source(topic="train", partition=0, offset=offset))
        return (
            await retrieve_payload(w, "1", {"k": "20"}),
            await retrieve_payload(w, "1", {"k": "20", "explore": "0.5"}),
            await retrieve_payload(w, "1", {"k": "0"}),
            await latest_payload(w),
            health_payload(w),
            [await retrieve_payload(w, "1", q) for q in ({"k": "10"}, {"k": "20", "exploit": "10", "lift": "1"},
                                                         {"k": "20", "exploit": "1"}, {"k": "20", "lift": "-1"},
                                                         {"k": "15"}, {"k": "20", "exploit": "20"})],
            await plain_payload(),
        )

    async def plain_payload():  # the same worker with --no-exploration (the settings /retrieve reads)
        w.settings, settings = w.settings.model_copy(update={"exploration": False}), w.settings
        try:
            return await retrieve_payload(w, "1", {"k": "20"})
        finally:
            w.settings = settings

    (status, body), (x_status, x_body), (bad, _), (l_status, latest), health, slots, (_, plain) = run(w, scenario)
    assert len(out.forwarded()) == stream.num_events  # first events too: the learner skips them (no history)
    sizes = [len(read_train_batch(m).events) for m in out.messages]  # one message per micro-batch (1 partition)
    assert set(out.partitions) == {0}
    assert max(sizes) == w.settings.batch_size and len(sizes) >= -(-stream.num_events // w.settings.batch_size)
    steps = w.learning.learner.steps
    assert len(sizes) - 2 <= steps <= len(sizes)  # a batch of first events only takes no step
    assert [m.version for m in out.announced] == list(range(steps // 5))  # every 5 steps
    last = out.announced[-1]
    assert last.parent == last.version - 1 and last.remap_from == last.version - 1
    assert last.health["gate"] == {"passed": True, "reasons": [], "refused": []}
    watermark = last.watermark["kafka"]
    assert sorted(watermark) == [f"{w.settings.feedback_topic}:0", f"{w.settings.item_topic}:0", "train:0"]
    assert 0 < watermark["train:0"] <= len(out.messages)
    assert status == 200 and body["version"] == last.version and len(body["items"]) == 20
    head = body["scores"][:20 - body["explored"]]  # the plain slots, by probability (the explored ones follow)
    assert body["history_length"] == 5 and head == sorted(head, reverse=True)
    assert x_status == 200 and len(x_body["items"]) == 20
    # exploration slots: the first 10 are what k=10 serves, the other 10 explore; too few slots or a bad lift: 400
    (_, top10), (e_status, explored), (few, few_body), (neg, _), (_, top15), (_, asked_plain) = slots
    assert e_status == 200 and explored["items"][:10] == top10["items"] and explored["explored"] == 10
    assert len(set(explored["items"])) == 20
    # by default (trainer.config.EXPLORATION: exploit 15, lift 0.5) a list of 20 explores its last 5 slots and one
    # of 15 is plain; exploit=k and --no-exploration (exploration=False) serve the plain list
    assert body["explored"] == 5 and body["items"][:15] == top15["items"] and top15["explored"] == 0
    assert plain["explored"] == 0 and asked_plain["explored"] == 0 and plain["items"] == asked_plain["items"]
    assert plain["items"] != body["items"]
    assert (few, neg) == (400, 400) and "exploit must be in" in few_body["error"]
    assert bad == 400
    assert l_status == 200 and latest["version"] == last.version and latest["served"] == last.version
    assert health["status"] == "ok" and health["served_version"] == last.version
    text = w.metrics.render().decode()
    for name in (
        "sparc_train_loss",
        'sparc_codebook_utilisation{level="1"}',
        'sparc_codebook_perplexity{level="3"}',
        "sparc_snapshot_version",
        "sparc_snapshot_age_seconds",
        "sparc_index_items",
        "sparc_events_per_second",
    ):
        assert name in text, name


def test_items_named_by_skus_and_huge_ids_end_to_end(tmp_path):
    """Item ids are external ids, never rows: string SKUs and ids near 2**62 travel through ingest, the history
    table and the train topic as they are, cost one row each, and /retrieve answers with them."""
    w = make_worker(tmp_path, batch_size=32)
    items = [f"sku-{i:03d}" for i in range(12)] + [2**62 + i for i in range(12)]
    feedback = [fb(f"e{n}", n % 6, items[(n * 7 + n // 6) % len(items)]) for n in range(240)]

    async def scenario():
        async with ingest_context(w) as ingest:
            for n, raw in enumerate(feedback):
                await ingest.put(raw, key=str(n % 6).encode())
        for offset, message in enumerate(w.outputs.messages):
            learn(w, message, Source(topic="train", partition=0, offset=offset))
        publish(w)
        return await retrieve_payload(w, "1", {"k": "10"}), w.history_value("1")

    (status, body), history = run(w, scenario)
    assert w.learning.learner.num_items == 24 and set(w.learning.learner.vocab.ids()[1:]) == set(items)
    assert history["items"][-1] in items and any(isinstance(i, str) for i in history["items"])
    assert status == 200 and len(body["items"]) == 10 and set(body["items"]) <= set(items)
    assert w.outputs.dead == []


def test_a_snapshot_the_gate_rejects_is_not_served(tmp_path):
    """A collapsed codebook (every item on one codeword per level) is stored for inspection, never served or
    announced, and counted and explained by reason."""
    w = make_worker(tmp_path)
    examples = [
        TrainExample.model_validate(
            {
                "event": {
                    "event_id": f"e{i}",
                    "user_id": str(i % 3),
                    "item_id": 1 + i % 12,
                    "timestamp": 1.7e9,
                    "event_type": "view",
                },
                "history": [1 + (i + 5) % 12],
                "source": {"topic": "t", "partition": 0, "offset": i},
            }
        )
        for i in range(24)
    ]
    [message] = encode_train_batches(examples, w.settings.train_message_bytes)

    async def scenario():
        learn(w, message, Source(topic="train", partition=0, offset=0))
        with torch.no_grad():
            for level in w.learning.learner.model.rq.levels:
                level.codebook.copy_(level.codebook[:1].expand_as(level.codebook))
        publish(w)
        return await retrieve_payload(w, "0", {}), health_payload(w)

    (status, body), health = run(w, scenario)
    assert status == 503 and body["last_gate"] == [
        "level-1 utilisation 0.125 is below the floor 0.250", "collision rate 1.000 is above the ceiling 0.97"]
    assert health["status"] == "starting" and w.outputs.announced == []
    text = w.metrics.render().decode()
    assert 'sparc_snapshots_total{outcome="rejected"} 1.0' in text
    assert 'sparc_gate_refusals_total{reason="utilisation"} 1.0' in text  # counted by reason
    assert 'sparc_gate_refusals_total{reason="collisions"} 1.0' in text


# --- recovery: re-delivery (streams.history), warm start and the processed log (streams.learning)


def test_a_message_read_again_at_its_offset_is_forwarded_again_without_touching_the_history():
    state = None
    for n, item in enumerate([3, 4, 5]):
        state = apply_feedback(state, f"e{n}", item, 5, 8, partition=1, offset=10 + n).state
    assert state == {"items": [3, 4, 5], "recent": ["e0", "e1", "e2"], "offsets": [10, 11, 12], "partition": 1}
    again = apply_feedback(state, "e1", 4, 5, 8, partition=1, offset=11)  # the crash re-read the message
    assert again.redelivered and again.history == [3] and again.state == state
    assert apply_feedback(state, "e1", 4, 5, 8, partition=1, offset=40) is None  # sent twice: a duplicate
    assert apply_feedback(state, "e1", 4, 5, 8, partition=0, offset=11) is None
    assert apply_feedback(state, "e1", 4, 5, 8) is None  # replay passes no offsets: plain de-duplication
    old = {"items": [3, 4], "recent": ["e0", "e1"]}  # a value written before offsets were kept
    assert apply_feedback(old, "e1", 4, 5, 8, partition=1, offset=11) is None
    assert apply_feedback(old, "e2", 5, 5, 8, partition=1, offset=12).state["offsets"] == [None, None, 12]
    short = apply_feedback(state, "e3", 6, 2, 8, partition=1, offset=13).state  # max_len 2 keeps [5, 6]
    assert apply_feedback(short, "e0", 3, 2, 8, partition=1, offset=10).history == []  # older than max_len


def train_messages(w: StreamWorker, events: list[dict], first_offset: int = 0) -> list[tuple[bytes, Source]]:
    """The synthetic stream's feedback as train-topic messages of batch_size events (ingest done by hand, as the
    agent would), each with the train-topic position it is read at."""
    table: dict = {}
    examples = []
    for n, e in enumerate(x for x in events if "event_id" in x):
        user = str(e["user_id"])
        applied = apply_feedback(table.get(user), e["event_id"], e["item_id"], w.settings.max_len, 256)
        table[user] = applied.state
        examples.append(TrainExample.model_validate({"event": {**e, "user_id": user, "event_type": "view"},
                                                     "history": applied.history,
                                                     "source": {"topic": "fb", "partition": 0, "offset": n}}))
    b = w.settings.batch_size
    messages = [m for start in range(0, len(examples), b)
                for m in encode_train_batches(examples[start : start + b], w.settings.train_message_bytes)]
    return [(raw, Source(topic="train", partition=0, offset=first_offset + n)) for n, raw in enumerate(messages)]


def test_warm_start_continues_weights_steps_versions_and_position(tmp_path, stream):
    url, log = f"file://{tmp_path}/store", tmp_path / "processed.jsonl"
    events = list(stream.iter_events())
    first = make_worker(tmp_path, store_url=url, processed_log=log)
    batches = train_messages(first, events)

    async def train(w, chosen):
        for raw, source in chosen:
            learn(w, raw, source)
        return w.learning.learner.steps

    steps = run(first, lambda: train(first, batches[:12]))
    assert first.learning.warm_version is None and steps >= 10
    with open_store(url, read_only=True) as store:
        latest = store.latest_version()
        snap = store.get(latest)
    assert latest == 1 and snap.health["steps"] == 10 and snap.watermark["kafka"]["train:0"] == 10  # 10 messages

    second = make_worker(tmp_path, store_url=url, processed_log=log)  # warm start is the default
    assert second.learning.warm_version == latest and second.learning.learner.steps == 10
    state = second.learning.learner.snapshot_state()
    assert all(torch.equal(state.weights[k], snap.weights[k]) for k in snap.weights)
    assert torch.equal(state.item_codes, snap.item_codes)
    assert second.learning.resume["train:0"] == 10 and second.learning.watermark == snap.watermark["kafka"]
    assert second.serving.index.current.version == latest  # served at once
    assert health_payload(second)["served_version"] == latest
    assert "sparc_warm_start_version 1.0" in second.metrics.render().decode()

    # batches 10 and 11 were learnt after the snapshot: read again, they are learnt again; 0-9 are skipped
    steps = run(second, lambda: train(second, batches[8:16]))
    assert steps == 10 + 6
    text = second.metrics.render().decode()
    assert "sparc_resume_skipped_messages_total 2.0" in text
    with open_store(url, read_only=True) as store:
        assert store.versions() == [0, 1, 2] and store.manifest(2).parent == latest
        assert store.manifest(2).health["steps"] == 15

    lines = [json.loads(line) for line in log.read_text().splitlines()]
    starts = [n for n, line in enumerate(lines) if "start" in line]
    assert [lines[n]["start"]["version"] for n in starts] == [None, latest]
    assert lines[starts[1]]["start"]["resume"]["train:0"] == 10
    resumed = [line for line in lines[starts[1] + 1 :]]
    assert [line["read"]["train:0"] for line in resumed] == [[o, o + 1] for o in range(10, 16)]
    assert all(len(line["event_ids"]) == 16 for line in lines if "read" in line)

    fresh = make_worker(tmp_path, store_url=url, warm_start=False)  # explicit: a fresh model
    assert fresh.learning.warm_version is None and fresh.learning.learner.steps == 0
    assert fresh.serving.index.current is None
    steps = run(fresh, lambda: train(fresh, batches[:5]))
    with open_store(url, read_only=True) as store:
        assert store.versions() == [0, 1, 2, 3] and store.manifest(3).parent is None  # never a repeated version


def test_warm_start_refuses_a_snapshot_of_another_shape_and_starts_fresh_on_an_empty_store(tmp_path, stream):
    url = f"file://{tmp_path}/store"
    empty = make_worker(tmp_path, store_url=url)
    assert empty.learning.warm_version is None and empty.serving.index.current is None
    batches = train_messages(empty, list(stream.iter_events()))[:7]

    async def train():
        for raw, source in batches:
            learn(empty, raw, source)

    run(empty, train)
    assert empty.outputs.announced  # a snapshot is latest
    with pytest.raises(IncompatibleSnapshotError, match=r"encoder\.dim"):
        make_worker(tmp_path, store_url=url, dim=8)
    assert make_worker(tmp_path, store_url=url, dim=8, warm_start=False).learning.warm_version is None


def test_a_worker_warm_starts_from_a_store_trained_with_other_training_options(tmp_path, stream):
    """A store written under the offline training options (attribute dropout 0.3, the conditioned stop-gradient,
    as `sparc train` writes them): the worker continues it under its own online defaults, says so at start, and
    its next snapshots record them."""
    url = f"file://{tmp_path}/store"
    old = make_worker(tmp_path, store_url=url, attribute_dropout=0.3, conditioned_detach=True)
    cfg = old.learning.learner.model.cfg
    assert cfg.conditioned_detach is True and cfg.attribute_dropout == 0.3
    batches = train_messages(old, list(stream.iter_events()))

    async def train(w, chosen):
        for raw, source in chosen:
            learn(w, raw, source)

    run(old, lambda: train(old, batches[:7]))
    version = old.outputs.announced[-1].version
    resumed = make_worker(tmp_path, store_url=url)  # the worker's defaults: no dropout, no stop-gradient
    cfg = resumed.learning.learner.model.cfg
    assert resumed.learning.warm_version == version
    assert (cfg.attribute_dropout, cfg.conditioned_detach) == (0.0, False)
    assert "attribute_dropout=0.0, conditioned_detach=False" in resumed.learning.start.message
    assert "(the snapshot's: attribute_dropout=0.3, conditioned_detach=True)" in resumed.learning.start.message
    run(resumed, lambda: train(resumed, batches[7:14]))
    with open_store(url, read_only=True) as store:
        latest = store.get(store.latest_version())
    assert latest.parent == version
    assert (latest.config["attribute_dropout"], latest.config["conditioned_detach"]) == (0.0, False)


def test_a_worker_with_a_corrupt_latest_falls_back_or_refuses_as_told(tmp_path, stream):
    """A worker no longer refuses to start when the latest snapshot is corrupt: it warm-starts from the newest
    earlier version that verifies, says which it passed over, and rolls latest back; --on-corrupt refuse keeps
    the store as it is and names the version to roll back to."""
    url = f"file://{tmp_path}/store"
    first = make_worker(tmp_path, store_url=url)
    batches = train_messages(first, list(stream.iter_events()))

    async def train():
        for raw, source in batches[:16]:
            learn(first, raw, source)

    run(first, train)
    with open_store(url, read_only=True) as store:
        latest, versions = store.latest_version(), store.versions()
        good = max(v for v in versions if v < latest and store.manifest(v).health["gate"]["passed"])
    path = tmp_path / "store" / "sparc" / str(latest) / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    with pytest.raises(CorruptSnapshotError, match=f"v{latest}.*truncated.*rollback {good} "):
        make_worker(tmp_path, store_url=url, on_corrupt="refuse")
    w = make_worker(tmp_path, store_url=url)
    assert w.learning.warm_version == good and w.serving.index.current.version == good
    [warning] = w.learning.start.warnings
    assert f"fell back to v{good}" in warning and f"snapshot sparc v{latest}: blob 'weights.safetensors'" in warning
    with open_store(url, read_only=True) as store:
        assert store.latest_version() == good
    w.close()


def test_warm_start_from_an_offline_snapshot_reads_the_train_topic_from_its_start(tmp_path):
    """`sparc train` stores a snapshot with watermark {"offline": name}: nothing is skipped after it."""
    url = f"file://{tmp_path}/store"
    w = make_worker(tmp_path, store_url=url)
    w.learning.learner.observe_items([{"item_id": i} for i in range(1, 31)])
    state = w.learning.learner.snapshot_state()
    assert state.item_ids is None  # row i is item i: the table of an offline model
    w.close()
    with open_store(url) as store:
        store.put(Snapshot(model="sparc", version=4, parent=None, created_at=1.7e9, watermark={"offline": "beauty"},
                           config=state.config, codebooks=state.codebooks, item_codes=state.item_codes,
                           weights=state.weights, health={"finite": True}))
    warm = make_worker(tmp_path, store_url=url)
    assert warm.learning.warm_version == 4 and warm.learning.learner.steps == 0
    assert warm.learning.learner.num_items == 30
    assert warm.learning.resume == {} and warm.learning.resume_offset("train:0") is None
    warm.close()


def test_producer_linger_fetch_size_and_producer_buffer_come_from_worker_settings(tmp_path):
    w = make_worker(tmp_path, producer_linger=0.02, fetch_bytes=65_536, batch_size=512)
    try:
        assert w.app.conf.producer_linger == 0.02
        assert w.app.conf.consumer_max_fetch_size == 65_536
        assert w.app.producer.buffer.max_messages == 1024  # a micro-batch's table writes do not stall deliveries
    finally:
        w.close()


def test_process_settings_set_torch_threads_and_the_gil_switch_interval():
    before = sys.getswitchinterval(), torch.get_num_threads()
    try:
        apply_process_settings(WorkerSettings(torch_threads=1, switch_interval=0.0002))
        assert sys.getswitchinterval() == pytest.approx(0.0002) and torch.get_num_threads() == 1
    finally:
        sys.setswitchinterval(before[0])
        torch.set_num_threads(before[1])


def test_the_history_table_holds_json_bytes_that_faust_json_reads_and_writes(tmp_path):
    """The table stores encode_state's JSON bytes (raw serializer); a changelog written by Faust's json codec
    (the table's format before) reads back as the same value, and Faust's codec reads ours."""
    w = make_worker(tmp_path)

    async def scenario():
        async with ingest_context(w) as agent:
            await agent.put(fb("a", 7, 3), key=b"7")
        return w.history.get("7")

    stored = run(w, scenario)
    value = {"items": [3], "recent": ["a"], "offsets": [0], "partition": 0}
    assert isinstance(stored, bytes) and faust_json.loads(stored) == value == w.history_value("7")
    assert decode_state(faust_json.dumps(value).encode()) == value and decode_state(None) is None
    assert decode_state(encode_state(value)) == value


def test_a_record_outside_its_users_partition_is_rekeyed_to_it_and_examples_go_to_the_users_train_partition(
        tmp_path):
    """The issue's measured defect: events whose key is not their user id landed in other partitions and split the
    user's history (40 events: 12 and 13 in the history). Now a valid record read outside its user's home
    partition (streams.routing) is sent, unchanged and keyed by the user, to that partition of the repartition
    topic, and counted; its history is written only there. Examples leave for the train partition of the user's
    home, one message per train partition of a micro-batch."""
    from streams.routing import home_partition, train_partition

    w = make_worker(tmp_path, partitions=4, train_partitions=2)
    users = ["u1", "u2", "u3", "u4", "u5", "u6"]
    home = {u: home_partition(u, 4) for u in users}
    assert len(set(home.values())) > 1

    async def scenario():
        async with ingest_context(w) as agent:
            for n, user in enumerate(users):
                await agent.put(fb(f"a{n}", user, 3), key=None, partition=(home[user] + 1) % 4)  # off home
                await agent.put(fb(f"b{n}", user, 4), key=user.encode(), partition=home[user])
        async with ingest_context(w, w.settings.repartition_topic) as agent:
            for raw, key, partition in list(w.outputs.rekeyed):  # what the repartition topic delivers
                await agent.put(raw, key=key, partition=partition)
        return {u: w.history_value(u) for u in users}

    histories = run(w, scenario)
    assert [(raw, key, p) for raw, key, p in w.outputs.rekeyed] == [
        (fb(f"a{n}", u, 3), u.encode(), home[u]) for n, u in enumerate(users)]
    assert {u: h["items"] for u, h in histories.items()} == {u: [4, 3] for u in users}  # one history, both events
    assert all(h["partition"] == home[u] for u, h in histories.items())
    assert "sparc_rekeyed_events_total 6.0" in w.metrics.render().decode()
    for message, partition in zip(w.outputs.messages, w.outputs.partitions, strict=True):
        assert {train_partition(home[e.user_id], 2) for e in read_train_batch(message).events} == {partition}
    assert sorted(e for e, _ in w.outputs.forwarded()) == sorted([f"a{n}" for n in range(6)] +
                                                                [f"b{n}" for n in range(6)])

    dlq = make_worker(tmp_path, partitions=4, on_wrong_key="dlq")

    async def refused():
        async with ingest_context(dlq) as agent:
            await agent.put(fb("x", "u1", 3), key=b"u9", partition=(home["u1"] + 1) % 4)

    run(dlq, refused)
    [(raw, key, invalid, source)] = dlq.outputs.dead
    assert (raw, key, invalid.reason) == (fb("x", "u1", 3), b"u9", "wrong_key")
    assert f"user 'u1' belongs in partition {home['u1']}" in invalid.detail and dlq.outputs.rekeyed == []
