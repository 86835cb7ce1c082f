"""The worker's probes and health endpoint answer with their status (issue 13: /health answered 200 whatever its
status; there was no liveness/readiness pair), and the metrics an operator scrapes are there."""

from __future__ import annotations

from test_streams_agents import learn, make_worker, publish, run

from streams.batching import encode_train_batches
from streams.records import Source, TrainExample
from streams.views import health_response, liveness, readiness


def one_train_message(n: int = 48) -> bytes:
    examples = [
        TrainExample.model_validate({
            "event": {"event_id": f"e{i}", "user_id": str(i % 4), "item_id": 1 + i % 16, "timestamp": 1.7e9,
                      "event_type": "view"},
            "history": [1 + (i + 3) % 16],
            "source": {"topic": "t", "partition": 0, "offset": i},
        })
        for i in range(n)
    ]
    [message] = encode_train_batches(examples, 900_000)
    return message


def test_readyz_is_503_until_tables_are_recovered_and_a_snapshot_serves(tmp_path):
    w = make_worker(tmp_path, min_utilisation=0.0)
    seen = {}

    async def scenario():
        seen["start"] = readiness(w), health_response(w), liveness(w)
        learn(w, one_train_message(), Source(topic="train", partition=0, offset=0))
        publish(w)
        seen["served, tables recovering"] = readiness(w), health_response(w)
        w.app.tables.recovery.completed.set()  # what Faust does once the changelog is read (no broker here)
        seen["ready"] = readiness(w), health_response(w)
        w.app.on_rebalance_start()
        seen["rebalancing"] = readiness(w)

    run(w, scenario)
    (ready, body), (health, hbody), (live, _) = seen["start"]
    assert (ready, health, live) == (503, 503, 200) and hbody["status"] == "starting"
    assert body["ready"] is False and body["reasons"] == ["tables are recovering", "no snapshot is served yet"]
    (ready, body), (health, _) = seen["served, tables recovering"]
    assert ready == 503 and body["reasons"] == ["tables are recovering"] and body["serving"] is True
    assert health == 200  # /health speaks of serving only
    (ready, body), (health, hbody) = seen["ready"]
    assert ready == 200 and body == {"ready": True, "reasons": [], "tables_recovered": True, "serving": True,
                                     "served_version": 0}
    assert health == 200 and hbody["status"] == "ok"
    ready, body = seen["rebalancing"]
    assert ready == 503 and body["reasons"] == ["tables are recovering"]


def test_metrics_have_the_latency_histograms_build_info_process_and_gc(tmp_path):
    w = make_worker(tmp_path, min_utilisation=0.0)

    async def scenario():
        learn(w, one_train_message(), Source(topic="train", partition=0, offset=0))
        publish(w)

    run(w, scenario)
    w.metrics.retrieve_seconds.labels("200").observe(0.002)
    text = w.metrics.render().decode()
    assert "sparc_train_step_seconds_count 1.0" in text
    assert "sparc_publish_seconds_count 1.0" in text
    assert 'sparc_retrieve_seconds_bucket{le="0.0025",status="200"} 1.0' in text
    for name in ("process_resident_memory_bytes", "process_cpu_seconds_total", "python_gc_collections_total",
                 "python_info", "sparc_consumer_lag"):
        assert name in text, name
    build = next(line for line in text.splitlines() if line.startswith("sparc_build_info{"))
    assert 'faust="0.15.3"' in build and "version=" in build

