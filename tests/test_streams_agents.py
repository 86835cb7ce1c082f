"""The worker's agents and views without a broker: Faust's agent.test_context() with memory:// tables, and an
Outputs object that records what would have been sent.

Inside test_context each put waits until its event is processed, so the batching of the train agent is tested
as plain functions (test_streams_batching.py) and here through handle_train_batch; the batched agent itself
runs against the real broker in test_worker_kafka.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest

from codebook_store import Reassembler
from replay.synthetic import SyntheticConfig, generate
from streams.agents import handle_train_batch, publish
from streams.records import Invalid, Source, TrainExample
from streams.settings import WorkerSettings
from streams.views import health_payload, latest_payload, retrieve_payload
from streams.worker import StreamWorker


class RecordingOutputs:
    def __init__(self) -> None:
        self.dead: list[tuple[bytes, bytes | None, Invalid, Source]] = []
        self.examples: list[TrainExample] = []
        self.announced: list = []  # codebook_store.CodebookUpdate, verified
        self._reassembler = Reassembler()

    async def dead_letter(self, raw, key, invalid, source) -> None:
        self.dead.append((raw, key, invalid, source))

    async def train(self, example) -> None:
        self.examples.append(example)

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
        min_utilisation=0.1,
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
            await agent.put(fb("c", 7, 99_000_000), key=b"7")  # item id beyond max_item_id
            await agent.put(fb("d", 8, 4), key=b"8")
        return w.history.get("7"), w.history.get("8")

    seven, eight = run(w, scenario)
    assert [(d[0], d[1], d[2].reason) for d in out.dead] == [
        (b"{not json", b"7", "bad_json"),
        (fb("c", 7, 99_000_000), b"7", "out_of_range"),  # the original bytes, unchanged
    ]
    assert out.dead[0][3].topic == w.settings.feedback_topic and out.dead[1][3].offset == 4
    assert [(e.event.event_id, e.history) for e in out.examples] == [("a", []), ("b", [3]), ("d", [])]
    assert [e.source.offset for e in out.examples] == [1, 2, 5]
    assert seven == {"items": [3, 4], "recent": ["a", "b"]}
    assert eight == {"items": [4], "recent": ["d"]}
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
        return w.history.get("1")

    state = run(w, scenario)
    assert state == {"items": [5, 6, 7, 8, 1], "recent": ["e5", "e6", "e7", "e0"]}


def test_catalog_grows_the_item_table_and_rejects_bad_items(tmp_path):
    w = make_worker(tmp_path)

    async def scenario():
        async with w.agents.catalog.test_context() as agent:
            await agent.put(b'{"item_id": 5, "attributes": [2, 9], "timestamp": 1700000000}', key=b"5")
            await agent.put(b'{"item_id": "x", "timestamp": 1700000000}', key=b"x")
            await agent.put(b'{"item_id": 2, "attributes": [4], "timestamp": 1700000000}', key=b"2")

    run(w, scenario)
    assert w.learner.num_items == 5
    assert w.learner.model.items.attributes[5].tolist()[:2] == [2, 9]
    assert [d[2].reason for d in w.outputs.dead] == ["wrong_type"]
    assert w.outputs.dead[0][3].topic == w.settings.item_topic


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
        raws = [ex.model_dump_json().encode() for ex in out.examples]
        for start in range(0, len(raws), w.settings.batch_size):
            batch = raws[start : start + w.settings.batch_size]
            await handle_train_batch(w, [(raw, Source(topic="train", partition=0, offset=start + i))
                                         for i, raw in enumerate(batch)])
        return (
            await retrieve_payload(w, "1", {"k": "20"}),
            await retrieve_payload(w, "1", {"k": "20", "explore": "0.5"}),
            await retrieve_payload(w, "1", {"k": "0"}),
            await latest_payload(w),
            health_payload(w),
        )

    (status, body), (x_status, x_body), (bad, _), (l_status, latest), health = run(w, scenario)
    assert len(out.examples) == stream.num_events  # first events too: the learner skips them (no history)
    steps, batches = w.learner.steps, -(-stream.num_events // w.settings.batch_size)
    assert batches - 2 <= steps <= batches  # a batch of first events only takes no step
    assert [m.version for m in out.announced] == list(range(steps // 5))  # every 5 steps
    last = out.announced[-1]
    assert last.parent == last.version - 1 and last.remap_from == last.version - 1
    assert last.health["gate"] == {"passed": True, "reasons": []}
    watermark = last.watermark["kafka"]
    assert sorted(watermark) == [f"{w.settings.feedback_topic}:0", "train:0"]
    assert 0 < watermark["train:0"] <= len(out.examples) and watermark["train:0"] % w.settings.batch_size == 0
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


def test_a_snapshot_the_gate_rejects_is_not_served(tmp_path):
    w = make_worker(tmp_path, min_utilisation=1.0, codes=64)  # 64 codes over 12 items: never all used
    raws = [
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
        .model_dump_json()
        .encode()
        for i in range(24)
    ]

    async def scenario():
        await handle_train_batch(w, [(raw, Source(topic="train", partition=0, offset=i)) for i, raw in enumerate(raws)])
        await publish(w)
        return await retrieve_payload(w, "0", {}), health_payload(w)

    (status, body), health = run(w, scenario)
    assert status == 503 and "below the floor" in body["last_gate"][0]
    assert health["status"] == "starting" and w.outputs.announced == []
    assert 'sparc_snapshots_total{outcome="rejected"} 1.0' in w.metrics.render().decode()
