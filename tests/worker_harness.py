"""Helpers for the end-to-end worker tests against a real broker (test_worker_kafka.py, test_worker_restart.py,
test_worker_equivalence.py, ...): benchmarks.harness's pieces (the benchmarks drive the worker with the same
ones), plus `event`, a feedback message for a test to send. A bounded wait that runs out raises
harness.WaitTimeout (an AssertionError: the test fails naming what it waited for). No timing is asserted anywhere.
"""

from __future__ import annotations

import json

from benchmarks.harness import (  # noqa: F401  (re-exported for the tests)
    ROOT,
    TINY_MODEL,
    PacedProducer,
    Reader,
    WaitTimeout,
    WorkerProcess,
    announced,
    delete_topics_of,
    free_port,
    get,
    get_json,
    json_messages,
    learnt_event_ids,
    log_tail,
    metric,
    read_processed_log,
    train_positions,
    wait_for,
)


def event(**fields) -> bytes:
    base = {"event_id": "x", "user_id": 1, "item_id": 2, "timestamp": 1_700_000_000, "event_type": "view"}
    return json.dumps({k: v for k, v in {**base, **fields}.items() if v is not None}).encode()
