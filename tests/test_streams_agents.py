"""The worker's agents and views without a broker: Faust's agent.test_context() with memory:// tables, and an
Outputs object that records what would have been sent. Also the recovery path without a broker: re-delivery
(streams.history), warm start from a file:// store, resume positions and the processed log (streams.worker).

Inside test_context a put returns once its event is in the agent's stream, and the ingest agent's micro-batches
are handled when full, after batch_seconds, or when the context ends; what reaches the train topic is checked
through the messages it would have sent, and the train agent's handler (handle_train_message) is called
directly. Both agents run against the real broker in test_worker_kafka.py.
"""

from __future__ import annotations

import asyncio
import json
import sys
import uuid

import pytest
import torch
from faust.utils import json as faust_json

from codebook_store import CorruptSnapshotError, IncompatibleSnapshotError, Reassembler, Snapshot, open_store
from replay.synthetic import SyntheticConfig, generate
from streams.agents import handle_items, handle_train_message, publish
from streams.batching import encode_train_batches, read_train_batch
from streams.history import apply_feedback, decode_state, encode_state
from streams.records import Invalid, Source, TrainExample
from streams.settings import WorkerSettings
from streams.views import health_payload, latest_payload, retrieve_payload
from streams.worker import StreamWorker, apply_process_settings


class RecordingOutputs:
    def __init__(self) -> None:
        self.dead: list[tuple[bytes, bytes | None, Invalid, Source]] = []
        self.messages: list[bytes] = []  # train-topic messages (encoded TrainBatch)
        self.announced: list = []  # codebook_store.CodebookUpdate, verified
        self._reassembler = Reassembler()

    async def dead_letter(self, raw, key, invalid, source) -> None:
        self.dead.append((raw, key, invalid, source))

    async def train(self, message) -> None:
        self.messages.append(message)

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

    async def announce(self, version, records) -> None:
        updates = [u for rec in records if (u := self._reassembler.accept(*rec)) is not None]
        assert [u.version for u in updates] == [version]
        self.announced.append(updates[0])


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
    return StreamWorker(WorkerSettings(**{**settings, **over}), testing=True, outputs=RecordingOutputs())


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
        async with w.agents.ingest.test_context() as agent:
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
        async with w.agents.ingest.test_context() as agent:
            for n in range(8):
                await agent.put(fb(f"e{n}", 1, n + 1), key=b"1")
            await agent.put(fb("e0", 1, 1), key=b"1")  # outside the window of 4 ids: accepted again
        return w.history_value("1")

    state = run(w, scenario)
    assert state == {"items": [5, 6, 7, 8, 1], "recent": ["e5", "e6", "e7", "e0"], "offsets": [5, 6, 7, 8],
                     "partition": 0}


def test_catalog_adds_a_row_per_item_and_rejects_bad_items(tmp_path):
    w = make_worker(tmp_path)

    async def scenario():
        async with w.agents.catalog.test_context() as agent:
            await agent.put(b'{"item_id": 5, "attributes": [2, 9], "timestamp": 1700000000}', key=b"5")
            await agent.put(b'{"item_id": 1.5, "timestamp": 1700000000}', key=b"x")
            await agent.put(b'{"item_id": "B00-x", "attributes": [4], "timestamp": 1700000000}', key=b"2")

    run(w, scenario)
    assert w.learner.num_items == 2 and w.learner.vocab.ids() == [None, 5, "B00-x"]
    assert w.learner.model.items.attributes[1].tolist()[:2] == [2, 9]
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

    def items(n: int) -> list:
        return [(item % i, str(i).encode(), Source(topic=w.settings.item_topic, partition=0, offset=i))
                for i in range(1, n + 1)]

    async def scenario():
        await handle_items(w, items(3))
        await handle_train_message(w, message, Source(topic="train", partition=0, offset=0))

    run(w, scenario)
    assert w.learner.vocab.ids() == [None, 1, 2]
    assert [(d[0], d[2].reason) for d in w.outputs.dead] == [
        (item % 3, "catalogue_full"),
        (examples[1].event.model_dump_json().encode(), "catalogue_full")]
    assert "max_items=2" in w.outputs.dead[0][2].detail and w.outputs.dead[1][3].topic == "train"
    text = w.metrics.render().decode()
    assert 'sparc_dlq_messages_total{reason="catalogue_full",topic="' + w.settings.item_topic in text
    assert "sparc_item_events_total 2.0" in text

    evicting = make_worker(tmp_path, max_items=2, on_catalogue_full="evict")

    async def evict():
        await handle_items(evicting, items(3))

    run(evicting, evict)
    assert evicting.learner.vocab.ids() == [None, 3, 2] and evicting.outputs.dead == []
    assert "sparc_catalogue_evictions_total 1.0" in evicting.metrics.render().decode()


def test_train_publish_serve(tmp_path, stream):
    """Ingest a synthetic stream, train on its examples in micro-batches, publish, serve."""
    w = make_worker(tmp_path)
    out = w.outputs
    events = list(stream.iter_events())

    async def scenario():
        async with w.agents.catalog.test_context() as catalog, w.agents.ingest.test_context() as ingest:
            for e in events:
                if "event_id" in e:
                    await ingest.put(json.dumps(e).encode(), key=str(e["user_id"]).encode())
                else:
                    await catalog.put(json.dumps(e).encode(), key=str(e["item_id"]).encode())
        assert await retrieve_payload(w, "1", {}) == (
            503,
            {"error": "no snapshot is served yet", "last_gate": []},
        )
        for offset, message in enumerate(out.messages):
            await handle_train_message(w, message, Source(topic="train", partition=0, offset=offset))
        return (
            await retrieve_payload(w, "1", {"k": "20"}),
            await retrieve_payload(w, "1", {"k": "20", "explore": "0.5"}),
            await retrieve_payload(w, "1", {"k": "0"}),
            await latest_payload(w),
            health_payload(w),
        )

    (status, body), (x_status, x_body), (bad, _), (l_status, latest), health = run(w, scenario)
    assert len(out.forwarded()) == stream.num_events  # first events too: the learner skips them (no history)
    sizes = [len(read_train_batch(m).events) for m in out.messages]  # one message per micro-batch
    assert max(sizes) == w.settings.batch_size and len(sizes) >= -(-stream.num_events // w.settings.batch_size)
    steps = w.learner.steps
    assert len(sizes) - 2 <= steps <= len(sizes)  # a batch of first events only takes no step
    assert [m.version for m in out.announced] == list(range(steps // 5))  # every 5 steps
    last = out.announced[-1]
    assert last.parent == last.version - 1 and last.remap_from == last.version - 1
    assert last.health["gate"] == {"passed": True, "reasons": [], "refused": []}
    watermark = last.watermark["kafka"]
    assert sorted(watermark) == [f"{w.settings.feedback_topic}:0", "train:0"]
    assert 0 < watermark["train:0"] <= len(out.messages)
    assert status == 200 and body["version"] == last.version and len(body["items"]) == 20
    assert body["history_length"] == 5 and body["scores"] == sorted(body["scores"], reverse=True)
    assert x_status == 200 and len(x_body["items"]) == 20
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
        async with w.agents.ingest.test_context() as ingest:
            for n, raw in enumerate(feedback):
                await ingest.put(raw, key=str(n % 6).encode())
        for offset, message in enumerate(w.outputs.messages):
            await handle_train_message(w, message, Source(topic="train", partition=0, offset=offset))
        await publish(w)
        return await retrieve_payload(w, "1", {"k": "10"}), w.history_value("1")

    (status, body), history = run(w, scenario)
    assert w.learner.num_items == 24 and set(w.learner.vocab.ids()[1:]) == set(items)
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
        await handle_train_message(w, message, Source(topic="train", partition=0, offset=0))
        with torch.no_grad():
            for level in w.learner.model.rq.levels:
                level.codebook.copy_(level.codebook[:1].expand_as(level.codebook))
        await publish(w)
        return await retrieve_payload(w, "0", {}), health_payload(w)

    (status, body), health = run(w, scenario)
    assert status == 503 and body["last_gate"] == [
        "level-1 utilisation 0.125 is below the floor 0.250", "collision rate 1.000 is above the ceiling 0.97"]
    assert health["status"] == "starting" and w.outputs.announced == []
    text = w.metrics.render().decode()
    assert 'sparc_snapshots_total{outcome="rejected"} 1.0' in text
    assert 'sparc_gate_refusals_total{reason="utilisation"} 1.0' in text  # counted by reason
    assert 'sparc_gate_refusals_total{reason="collisions"} 1.0' in text


# --- recovery: re-delivery (streams.history), warm start and the processed log (streams.worker)


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
            await handle_train_message(w, raw, source)
        return w.learner.steps

    steps = run(first, lambda: train(first, batches[:12]))
    assert first.warm_version is None and steps >= 10
    with open_store(url, read_only=True) as store:
        latest = store.latest_version()
        snap = store.get(latest)
    assert latest == 1 and snap.health["steps"] == 10 and snap.watermark["kafka"]["train:0"] == 10  # 10 messages

    second = make_worker(tmp_path, store_url=url, processed_log=log)  # warm start is the default
    assert second.warm_version == latest and second.learner.steps == 10
    state = second.learner.snapshot_state()
    assert all(torch.equal(state.weights[k], snap.weights[k]) for k in snap.weights)
    assert torch.equal(state.item_codes, snap.item_codes)
    assert second.resume["train:0"] == 10 and second.watermark == snap.watermark["kafka"]
    assert second.index.current.version == latest  # served at once
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
    assert fresh.warm_version is None and fresh.learner.steps == 0 and fresh.index.current is None
    steps = run(fresh, lambda: train(fresh, batches[:5]))
    with open_store(url, read_only=True) as store:
        assert store.versions() == [0, 1, 2, 3] and store.manifest(3).parent is None  # never a repeated version


def test_warm_start_refuses_a_snapshot_of_another_shape_and_starts_fresh_on_an_empty_store(tmp_path, stream):
    url = f"file://{tmp_path}/store"
    empty = make_worker(tmp_path, store_url=url)
    assert empty.warm_version is None and empty.index.current is None
    batches = train_messages(empty, list(stream.iter_events()))[:7]

    async def train():
        for raw, source in batches:
            await handle_train_message(empty, raw, source)

    run(empty, train)
    assert empty.outputs.announced  # a snapshot is latest
    with pytest.raises(IncompatibleSnapshotError, match=r"encoder\.dim"):
        make_worker(tmp_path, store_url=url, dim=8)
    assert make_worker(tmp_path, store_url=url, dim=8, warm_start=False).warm_version is None


def test_a_worker_warm_starts_from_a_store_trained_with_other_training_options(tmp_path, stream):
    """A store written under the offline training options (attribute dropout 0.3, the conditioned stop-gradient,
    as `sparc train` writes them): the worker continues it under its own online defaults, says so at start, and
    its next snapshots record them."""
    url = f"file://{tmp_path}/store"
    old = make_worker(tmp_path, store_url=url, attribute_dropout=0.3, conditioned_detach=True)
    assert old.learner.model.cfg.conditioned_detach is True and old.learner.model.cfg.attribute_dropout == 0.3
    batches = train_messages(old, list(stream.iter_events()))

    async def train(w, chosen):
        for raw, source in chosen:
            await handle_train_message(w, raw, source)

    run(old, lambda: train(old, batches[:7]))
    version = old.outputs.announced[-1].version
    resumed = make_worker(tmp_path, store_url=url)  # the worker's defaults: no dropout, no stop-gradient
    cfg = resumed.learner.model.cfg
    assert resumed.warm_version == version and (cfg.attribute_dropout, cfg.conditioned_detach) == (0.0, False)
    assert "attribute_dropout=0.0, conditioned_detach=False" in resumed.start_message
    assert "(the snapshot's: attribute_dropout=0.3, conditioned_detach=True)" in resumed.start_message
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
            await handle_train_message(first, raw, source)

    run(first, train)
    with open_store(url, read_only=True) as store:
        latest, versions = store.latest_version(), store.versions()
        good = max(v for v in versions if v < latest and store.manifest(v).health["gate"]["passed"])
    path = tmp_path / "store" / "sparc" / str(latest) / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-8])  # truncated
    with pytest.raises(CorruptSnapshotError, match=f"v{latest}.*truncated.*rollback {good} "):
        make_worker(tmp_path, store_url=url, on_corrupt="refuse")
    w = make_worker(tmp_path, store_url=url)
    assert w.warm_version == good and w.index.current.version == good
    [warning] = w.start_warnings
    assert f"fell back to v{good}" in warning and f"snapshot sparc v{latest}: blob 'weights.safetensors'" in warning
    with open_store(url, read_only=True) as store:
        assert store.latest_version() == good
    w.close()


def test_warm_start_from_an_offline_snapshot_reads_the_train_topic_from_its_start(tmp_path):
    """`sparc train` stores a snapshot with watermark {"offline": name}: nothing is skipped after it."""
    url = f"file://{tmp_path}/store"
    w = make_worker(tmp_path, store_url=url)
    w.learner.observe_items([{"item_id": i} for i in range(1, 31)])
    state = w.learner.snapshot_state()
    assert state.item_ids is None  # row i is item i: the table of an offline model
    w.close()
    with open_store(url) as store:
        store.put(Snapshot(model="sparc", version=4, parent=None, created_at=1.7e9, watermark={"offline": "beauty"},
                           config=state.config, codebooks=state.codebooks, item_codes=state.item_codes,
                           weights=state.weights, health={"finite": True}))
    warm = make_worker(tmp_path, store_url=url)
    assert warm.warm_version == 4 and warm.learner.steps == 0 and warm.learner.num_items == 30
    assert warm.resume == {} and warm.resume_offset(Source(topic="train", partition=0, offset=0)) == 0
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
        async with w.agents.ingest.test_context() as agent:
            await agent.put(fb("a", 7, 3), key=b"7")
        return w.history.get("7")

    stored = run(w, scenario)
    value = {"items": [3], "recent": ["a"], "offsets": [0], "partition": 0}
    assert isinstance(stored, bytes) and faust_json.loads(stored) == value == w.history_value("7")
    assert decode_state(faust_json.dumps(value).encode()) == value and decode_state(None) is None
    assert decode_state(encode_state(value)) == value


def test_a_micro_batch_the_step_refuses_is_dead_lettered_event_by_event(tmp_path, stream, monkeypatch):
    """A non-finite loss or gradient (trainer.step refuses the batch): every event of that micro-batch goes to the
    DLQ with reason train_error and its bytes, the error is counted, and the next batch trains (found by the fault
    suite: before, the batch's events were dropped without a trace)."""
    w = make_worker(tmp_path)
    batches = train_messages(w, list(stream.iter_events()))
    learn = w.learner.learn
    calls = {"n": 0}

    def poisoned(events, histories):
        calls["n"] += 1
        if calls["n"] == 2:
            raise FloatingPointError("non-finite gradient at step 1 under a finite loss")
        return learn(events, histories)

    monkeypatch.setattr(w.learner, "learn", poisoned)

    async def scenario():
        return [await handle_train_message(w, raw, source) for raw, source in batches[:3]]

    results = run(w, scenario)
    assert results[0] is not None and results[1] is None and results[2] is not None
    refused = read_train_batch(batches[1][0]).events
    dead = w.outputs.dead
    assert [json.loads(raw)["event_id"] for raw, *_ in dead] == [e.event_id for e in refused]
    assert {invalid.reason for _, _, invalid, _ in dead} == {"train_error"}
    assert all("non-finite gradient" in invalid.detail for _, _, invalid, _ in dead)
    assert [source for *_, source in dead] == [batches[1][1]] * len(refused)
    text = w.metrics.render().decode()
    assert "sparc_train_errors_total 1.0" in text and w.learner.steps == 2


def test_a_publish_that_cannot_write_the_store_keeps_serving_the_previous_version_and_raises_the_alarm(
        tmp_path, stream, monkeypatch, caplog):
    """The store's disk full during a publish (ENOSPC): training goes on, the version served before is still
    served, sparc_publish_failing is 1 until a publish succeeds again, and the failures are counted; a run of
    failures logs one traceback, then a line per try."""
    w = make_worker(tmp_path, store_url=f"file://{tmp_path}/store")
    batches = train_messages(w, list(stream.iter_events()))
    real = w.publisher.publish

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    async def scenario():
        await handle_train_message(w, *batches[0])
        await publish(w)
        served = health_payload(w)["served_version"]
        monkeypatch.setattr(w.publisher, "publish", full)
        await handle_train_message(w, *batches[1])
        await publish(w)
        await handle_train_message(w, *batches[2])
        await publish(w)
        during = health_payload(w)["served_version"], w.metrics.render().decode(), await retrieve_payload(w, "1", {})
        monkeypatch.setattr(w.publisher, "publish", real)
        await publish(w)
        return served, during, health_payload(w)["served_version"], w.metrics.render().decode()

    served, (served_during, text_during, (status, _)), served_after, text_after = run(w, scenario)
    assert served is not None and served_during == served and status == 200
    assert "sparc_publish_failing 1.0" in text_during
    assert 'sparc_snapshots_total{outcome="failed"} 2.0' in text_during
    assert served_after > served and "sparc_publish_failing 0.0" in text_after
    failures = [r for r in caplog.records if "publishing the snapshot" in r.getMessage()]
    assert [r.exc_info is not None for r in failures] == [True, False]
    assert all(f"v{served} stays served" in r.getMessage() for r in failures)
