"""The serve role without a broker: POST /retrieve (the recent items in the body) answers as GET does for the same
history; bad bodies are one line; a replica follows the store's latest snapshot; the history copy reads Faust's
changelog records (json key, our value, tombstones); the roles' HTTP endpoints through aiohttp. Two replicas on
the real broker: test_roles_kafka.py."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from dataclasses import replace

import pytest
from test_learning import settings as learn_settings
from test_streams_agents import RecordingOutputs, make_worker, run
from test_streams_probes import one_train_message
from worker_harness import free_port

from codebook_store import CorruptSnapshotError, open_store
from streams.history import encode_state
from streams.learning import Learning
from streams.metrics import WorkerMetrics
from streams.records import Source
from streams.serving import ChangelogHistory, Serving, StoreFollower
from streams.views import aiohttp_app, retrieve_payload, retrieve_post_payload, routes


def test_post_retrieve_answers_for_the_items_in_the_body_as_get_does_for_a_users_history(tmp_path):
    from test_streams_agents import learn, publish

    w = make_worker(tmp_path, min_utilisation=0.0)

    async def scenario():
        learn(w, one_train_message(), Source(topic="train", partition=0, offset=0))
        publish(w)
        w.user_history = lambda user: [3, 5, 9]  # what the table would hold for this user
        got = await retrieve_payload(w, "7", {"k": "10"})
        posted = await retrieve_post_payload(w, json.dumps({"items": [3, 5, 9], "user_id": 7}).encode(),
                                             {"k": "10"})
        unknown_only = await retrieve_post_payload(w, b'{"items": ["never-seen"]}', {"k": "5"})
        bad = [await retrieve_post_payload(w, body, {}) for body in (
            b"not json", b'{"items": 3}', b'{"items": [0.5]}', b'{"items": [1], "extra": 1}',
            json.dumps({"items": list(range(1, 1002))}).encode(), b'{"items": [""]}')]
        return got, posted, unknown_only, bad

    (g_status, got), (p_status, posted), (u_status, unknown), bad = run(w, scenario)
    assert g_status == p_status == 200
    assert posted["items"] == got["items"] and posted["scores"] == got["scores"] and posted["user_id"] == "7"
    assert posted["version"] == got["version"] == 0 and posted["history_length"] == 3
    assert u_status == 200 and unknown["history_length"] == 1 and len(unknown["items"]) == 5  # popular items
    assert [status for status, _ in bad] == [400] * 6
    assert all(body["error"].startswith("bad body") and "\n" not in body["error"] for _, body in bad)
    assert "items" in bad[1][1]["error"] and "1000" in bad[4][1]["error"]


def test_a_replica_follows_the_stores_latest_snapshot(tmp_path):
    from test_learning import records_of

    from replay.synthetic import SyntheticConfig, generate

    s = learn_settings(tmp_path)
    stream = generate(SyntheticConfig(n_users=20, n_events=300, n_initial_items=40, seed=3))
    items, train = records_of(s, stream)
    learning = Learning(s, RecordingOutputs().learn)
    learning.observe_items(items)
    serving = Serving(s, learning.metrics)
    follower = StoreFollower(s, serving)
    assert follower.check() is None and serving.index.current is None  # nothing latest yet
    learning.learn_step(learning.parse(train[:2]))
    assert learning.publish(learning.capture()).accepted
    assert follower.check() == 0 and serving.index.current.version == 0 and follower.check() is None
    learning.learn_step(learning.parse(train[2:4]))
    learning.publish(learning.capture())
    assert follower.check() == 1
    direct = Serving(s, learning.metrics)
    direct.serve_state(learning.learner.snapshot_state(), 1, 0.0)  # what the worker serves in-process
    a, b = (x.index.current.retrieve([1, 2, 3], 10) for x in (serving, direct))
    assert a.items.tolist() == b.items.tolist()  # the replica serves the snapshot the learner stored

    with open_store(s.store_url) as store:  # a latest that fails verification: the replica keeps what it serves
        store.put(replace(store.get(1), version=2, parent=1))
    path = tmp_path / "store" / "sparc" / "2" / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(CorruptSnapshotError, match="v2"):
        follower.check()
    assert serving.index.current.version == 1
    learning.close()
    follower.store.close()


def test_the_history_copy_reads_fausts_changelog_records(tmp_path):
    copy = ChangelogHistory(learn_settings(tmp_path), tmp_path / "history")
    state = {"items": [3, "sku-9", 4], "recent": ["a", "b", "c"], "offsets": [1, 2, 3], "partition": 1}
    copy.apply(json.dumps("u1").encode(), encode_state(state))  # key: Faust's json codec; value: ours
    copy.apply(json.dumps("u2").encode(), encode_state({"items": [7], "recent": ["d"]}))
    copy.apply(json.dumps("u2").encode(), None)  # a tombstone
    copy.apply(None, b"{}")  # no key: not a table record
    assert copy.items("u1") == [3, "sku-9", 4] and copy.items("u2") == [] and copy.items("nobody") == []
    copy.db.close()
    again = ChangelogHistory(learn_settings(tmp_path), tmp_path / "history")  # a fresh copy at every start
    assert again.items("u1") == []
    again.db.close()


def test_the_roles_http_endpoints_through_aiohttp(tmp_path):
    """A serve replica's routes (no learner: no snapshot yet, so /retrieve is 503) and a learn-only node's."""

    class ServeLike:
        learning = None

        def __init__(self):
            self.settings = learn_settings(tmp_path)
            self.serving = Serving(self.settings, WorkerMetrics(3))
            self.metrics = self.serving.metrics

        def user_history(self, user_id):
            return []

        def latest_manifest(self):
            return None

        def problems(self):
            return ["no snapshot is served yet"]

        def failure(self):
            return None

    node = ServeLike()
    assert {(m, p) for m, p, *_ in routes(node)} == {
        ("GET", "/retrieve/{user_id}"), ("POST", "/retrieve"), ("GET", "/snapshots/latest"), ("GET", "/health"),
        ("GET", "/livez"), ("GET", "/readyz"), ("GET", "/metrics")}
    port = free_port()

    def call(method, path, body=None):
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body, method=method)
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    async def serve():
        from aiohttp import web

        runner = web.AppRunner(aiohttp_app(node))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        loop = asyncio.get_running_loop()
        try:
            return [await loop.run_in_executor(None, call, *args) for args in (
                ("GET", "/retrieve/5"), ("POST", "/retrieve", b'{"items": [1]}'), ("POST", "/retrieve", b"{"),
                ("GET", "/readyz"), ("GET", "/livez"), ("GET", "/health"), ("GET", "/metrics"))]
        finally:
            await runner.cleanup()

    got = asyncio.run(serve())
    assert [status for status, _ in got] == [503, 503, 400, 503, 200, 503, 200]
    assert json.loads(got[3][1])["reasons"] == ["no snapshot is served yet"]
    assert b"sparc_retrieve_seconds_count" in got[6][1]


def test_a_node_that_gets_sigterm_again_while_it_closes_still_closes_and_exits_0(tmp_path):
    """streams.roles.run_node: after its event loop has ended, a second SIGTERM (a data-parallel rank waiting in
    its closing barrier, told to stop again) must not kill the process half-way through close()."""
    import subprocess
    import sys

    from worker_harness import ROOT

    code = """
import os, signal, sys, time
from types import SimpleNamespace
from streams.roles import run_node

class Node:
    serving = learning = metrics = None
    def work(self):
        return {"done": lambda stop: None}  # ends at once: the node stops
    def started(self):
        pass
    def failure(self):
        return None
    def close(self):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("closed", flush=True)

sys.exit(run_node(Node(), SimpleNamespace(web_host="127.0.0.1", web_port=0)))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "closed", (done.returncode, done.stderr[-2000:])
