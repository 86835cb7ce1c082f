"""The scale-out roles against a real broker, each role a process of its own (`sparc ingest`, `sparc learn`,
`sparc serve`):

- 2 ingest + 1 learn + 2 serve over 4 partitions; one ingest replica is killed (SIGKILL, not restarted) in the
  middle of the stream. Some users' events are produced with no key or another user's key. Then: every
  produced event id was learnt (the learner's processed log, the lineage below the latest snapshot's watermark),
  every user's history holds each of its events once (no split by a wrong key, no loss by the kill), and both
  serve replicas answer GET and POST /retrieve from the latest snapshot.
- Fencing: two learners of one model on one store; the one started later claims the model and publishes, the
  first stops, exit status 2 and one line that says why.
- Data parallel: two learner ranks (`--world-size 2`, gloo) read two train partitions each, train together and
  rank 0 publishes snapshots whose watermark holds all four partitions.
Every wait is bounded and fails naming what it waited for; no timing is asserted (benchmarks/roles_bench.py
measures failover and the serve replicas' convergence).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import uuid

import numpy as np
import pytest
from kafka import KafkaProducer
from worker_harness import (
    TINY_MODEL,
    WorkerProcess,
    delete_topics_of,
    free_port,
    get,
    get_json,
    learnt_event_ids,
    log_tail,
    read_processed_log,
    train_positions,
)

from benchmarks.roles_bench import partitions_of
from codebook_store import open_store

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

USERS, PER_USER, ITEMS = 60, 30, 200
WRONG_KEYS = {3: None, 4: b"5", 7: b"not-a-user"}  # user -> the key its events are produced with (else its id)


def feedback_events(seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    order = rng.permutation(np.repeat(np.arange(1, USERS + 1), PER_USER))
    return [{"event_id": f"k{n}", "user_id": int(u), "item_id": int(rng.integers(1, ITEMS + 1)),
             "timestamp": 1_700_000_000 + n, "event_type": "view"} for n, u in enumerate(order)]


class Producer(threading.Thread):
    """Sends the events in order, about `rate` a second (pacing only: nothing depends on it). With `hold_at`, it
    stops after that many events until `resume` is set (so that the test can act in the middle of the stream)."""

    def __init__(self, bootstrap: str, topic: str, events: list[dict], rate: float, hold_at: int | None = None):
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.events, self.rate = bootstrap, topic, events, rate
        self.sent, self.error, self.stop = 0, None, threading.Event()
        self.hold_at, self.resume = hold_at, threading.Event()

    def run(self) -> None:
        try:
            producer = KafkaProducer(bootstrap_servers=self.bootstrap)
            try:
                for start in range(0, len(self.events), 20):
                    for e in self.events[start : start + 20]:
                        key = WRONG_KEYS.get(e["user_id"], str(e["user_id"]).encode())
                        producer.send(self.topic, key=key, value=json.dumps(e).encode())
                    producer.flush()
                    self.sent = min(start + 20, len(self.events))
                    if self.hold_at is not None and self.sent >= self.hold_at:
                        self.hold_at = None
                        self.resume.wait(300)
                    if self.stop.wait(20 / self.rate):
                        return
            finally:
                producer.close()
        except BaseException as exc:  # reported by the test
            self.error = exc


# The health gate open: these tests are about the roles, and a tiny model on a few hundred events may hold back
# the one snapshot a test waits for (its own tests: test_streams_publisher.py)
OPEN_GATE = {"SPARC_MIN_UTILISATION": "0", "SPARC_MIN_DEEP_UTILISATION": "0", "SPARC_MIN_PERPLEXITY": "0",
             "SPARC_MAX_COLLISION_RATE": "1"}


def role_env(run: str, tmp_path, **more: str) -> dict[str, str]:
    topics = {name: f"roles-{name.lower()}-{run}" for name in ("FEEDBACK", "ITEM", "UPDATES", "DLQ")}
    return {**{f"SPARC_{name}_TOPIC": topic for name, topic in topics.items()}, **TINY_MODEL, **OPEN_GATE,
            "SPARC_APP_ID": f"roles-{run}", "SPARC_PARTITIONS": "4", "SPARC_MAX_LEN": "50",
            "SPARC_STORE_URL": f"file://{tmp_path}/store", "SPARC_BATCH_SIZE": "32", **more}


def test_two_ingest_one_learn_two_serve_lose_nothing_when_an_ingest_replica_is_killed(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    env = role_env(run, tmp_path, SPARC_SESSION_TIMEOUT="6", SPARC_SNAPSHOT_EVERY_SECONDS="2")
    app_id, processed = env["SPARC_APP_ID"], tmp_path / "processed.jsonl"
    broker = f"--broker={kafka_bootstrap}"
    ingest = [WorkerProcess(tmp_path, [broker, f"--data-dir={tmp_path}/ingest-{n}", f"--group-instance-id=i{n}"],
                            env, command="ingest", name=f"ingest-{n}") for n in range(2)]
    learn = WorkerProcess(tmp_path, [broker, f"--processed-log={processed}"], env, command="learn")
    serve = [WorkerProcess(tmp_path, [broker, f"--data-dir={tmp_path}/serve-{n}"], env, command="serve",
                           name=f"serve-{n}") for n in range(2)]
    everyone = [*ingest, learn, *serve]
    events = feedback_events()
    producer = Producer(kafka_bootstrap, env["SPARC_FEEDBACK_TOPIC"], events, rate=150, hold_at=len(events) // 3)
    codes = {}
    try:
        for p in everyone:  # all at once (each waits for its own web server below)
            p.start(wait=False)
        for p in everyone:
            p.wait_until_live()
        for p in ingest:  # both members of the group hold partitions before the stream starts
            p.wait_for("the ingest group to settle", lambda p=p: get_json(p.port, "/readyz")[0] == 200, 120)
        items = KafkaProducer(bootstrap_servers=kafka_bootstrap)
        for item in range(1, ITEMS + 1):
            items.send(env["SPARC_ITEM_TOPIC"], key=str(item).encode(),
                       value=json.dumps({"item_id": item, "timestamp": 1_700_000_000}).encode())
        items.close()
        producer.start()
        learn.wait_for("a third of the stream produced and learning under way", lambda: producer.sent >= len(
            events) // 3 and learn.metric("sparc_learnt_events_total") > 0, 180)
        producer.resume.set()  # the stream goes on, and ingest-0 dies in the middle of it
        learn.wait_for("the stream under way again", lambda: producer.sent >= len(events) // 3 + 60, 60)
        held = partitions_of(get(ingest[0].port, "/metrics")[1].decode(), env["SPARC_FEEDBACK_TOPIC"])
        assert held, "ingest-0 holds no feedback partition: killing it would test nothing"
        killed_at = producer.sent
        ingest[0].kill()  # its partitions go to ingest-1 after the session timeout; nothing restarts it
        assert killed_at < len(events), "the stream ended before the kill"
        producer.join(timeout=300)
        assert not producer.is_alive() and producer.error is None, f"the producer failed: {producer.error!r}"
        wanted = {e["event_id"] for e in events}

        def missing() -> set[str] | None:
            status, latest = get_json(learn.port, "/snapshots/latest")
            upto = train_positions(latest["watermark"]["kafka"], app_id) if status == 200 else {}
            return wanted - set(learnt_event_ids(read_processed_log(processed), upto)) if upto else None

        learn.wait_for("a latest snapshot that has learnt every event", lambda: missing() == set(), 300)
        latest = get_json(learn.port, "/snapshots/latest")[1]["version"]
        for replica in serve:
            replica.wait_for(f"v{latest} served", lambda r=replica: (get_json(r.port, "/readyz")[1] or {}).get(
                "served_version", -1) >= latest, 120)

        def histories_complete(replica: WorkerProcess) -> bool:
            lengths = [get_json(replica.port, f"/retrieve/{user}?k=5")[1]["history_length"]
                       for user in range(1, USERS + 1)]
            return lengths == [PER_USER] * USERS or lengths

        for replica in serve:  # every event once in its user's history, wrong keys and the kill notwithstanding
            lengths = replica.wait_for("every history complete", lambda r=replica: histories_complete(r) is True, 120)
            assert lengths is True
            status, body = get_json(replica.port, "/retrieve/3?k=10")
            assert status == 200 and len(body["items"]) == 10 and body["version"] >= latest
        answers = []
        for replica in serve:
            status, body = post(replica.port, "/retrieve?k=10", {"items": [5, 9, 12]})
            assert status == 200 and body["history_length"] == 3
            answers.append(body)
        if answers[0]["version"] == answers[1]["version"]:  # one snapshot, one answer
            assert answers[0]["items"] == answers[1]["items"]
        rekeyed = ingest[1].metric("sparc_rekeyed_events_total")
    finally:
        producer.stop.set()
        producer.resume.set()
        for p in everyone:
            if p.process is not None and p.process.poll() is None:
                codes[p.name] = p.terminate()
        delete_topics_of(kafka_bootstrap, run)
    assert all(code == 0 for code in codes.values()), {p.name: (codes.get(p.name), log_tail(p.log, 20))
                                                       for p in everyone if codes.get(p.name) not in (0, None)}
    assert rekeyed > 0  # the wrongly keyed users went through the repartition topic
    starts = [line for line in read_processed_log(processed) if "start" in line]
    assert len(starts) == 1  # the learner never restarted: the ingest failure never reached it
    print(f"killed ingest-0 (feedback partitions {held}) with {killed_at} of {len(events)} events produced; "
          f"latest v{latest}; "
          f"re-keyed by the survivor {rekeyed}")


def post(port: int, path: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def produce_train_messages(bootstrap: str, env: dict, n_messages: int, first: int = 0) -> list[str]:
    """Train-topic messages (as ingest sends them) straight to the train topic's 4 partitions, and the catalogue;
    returns the event ids."""
    from streams.batching import encode_train_batches
    from streams.records import TrainExample
    from streams.settings import WorkerSettings
    from streams.topics import ensure_topics

    settings = WorkerSettings(broker=bootstrap, app_id=env["SPARC_APP_ID"], partitions=4,
                              feedback_topic=env["SPARC_FEEDBACK_TOPIC"], item_topic=env["SPARC_ITEM_TOPIC"],
                              updates_topic=env["SPARC_UPDATES_TOPIC"], dlq_topic=env["SPARC_DLQ_TOPIC"])
    ensure_topics(settings)
    producer = KafkaProducer(bootstrap_servers=bootstrap)
    if first == 0:
        for item in range(1, ITEMS + 1):
            producer.send(settings.item_topic, key=str(item).encode(),
                          value=json.dumps({"item_id": item, "timestamp": 1_700_000_000}).encode())
    rng = np.random.default_rng(first)
    ids = []
    for m in range(first, first + n_messages):
        partition = m % 4
        examples = [TrainExample.model_validate({
            "event": {"event_id": f"t{m}-{i}", "user_id": f"p{partition}u{i % 5}",
                      "item_id": int(rng.integers(1, ITEMS + 1)), "timestamp": 1.7e9, "event_type": "view"},
            "history": [int(x) for x in rng.integers(1, ITEMS + 1, size=3)],
            "source": {"topic": settings.feedback_topic, "partition": partition, "offset": m * 16 + i}})
            for i in range(16)]
        ids += [e.event.event_id for e in examples]
        [raw] = encode_train_batches(examples, 900_000)
        producer.send(settings.train_topic, value=raw, partition=partition)
    producer.flush()
    producer.close()
    return ids


def test_a_second_learner_fences_the_first_which_stops_saying_why(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    env = role_env(run, tmp_path, SPARC_SNAPSHOT_EVERY_STEPS="1")
    store_url = env["SPARC_STORE_URL"]
    first = WorkerProcess(tmp_path, [f"--broker={kafka_bootstrap}"], env, command="learn", name="learn-a")
    second = WorkerProcess(tmp_path, [f"--broker={kafka_bootstrap}"], env, command="learn", name="learn-b")
    try:
        produce_train_messages(kafka_bootstrap, env, 8)
        first.start()
        first.wait_for("a snapshot of the first learner", lambda: get_json(first.port, "/snapshots/latest")[0] == 200,
                       120)
        second.start()
        produce_train_messages(kafka_bootstrap, env, 8, first=8)  # both learners read these
        code = first.wait_for_exit(120)
        second.wait_for("a snapshot of the second learner after the first stopped",
                        lambda: get_json(second.port, "/health")[1]["published_version"] is not None, 120)
        with open_store(store_url, read_only=True) as store:
            epoch, holder = store.writer()
            versions = store.versions()
        second_pid = second.process.pid
    finally:
        for p in (first, second):
            p.stop_quietly()
        delete_topics_of(kafka_bootstrap, run)
    last = first.log.read_text().strip().splitlines()[-1]
    assert code == 2, log_tail(first.log)
    assert last.startswith("sparc learn: error: fenced: ") and f"epoch {epoch} is learn rank 0" in last, last
    assert epoch == 2 and f"pid {second_pid}" in holder and versions == sorted(versions)


def test_two_data_parallel_learner_ranks_publish_snapshots_of_every_partition(kafka_bootstrap, tmp_path):
    run = uuid.uuid4().hex[:10]
    env = role_env(run, tmp_path, SPARC_SNAPSHOT_EVERY_SECONDS="1")
    ids = produce_train_messages(kafka_bootstrap, env, 24)
    url = f"tcp://127.0.0.1:{free_port()}"
    ranks = [WorkerProcess(tmp_path, [f"--broker={kafka_bootstrap}", "--world-size=2", f"--rank={r}",
                                      f"--dist-url={url}", f"--processed-log={tmp_path}/processed-{r}.jsonl"],
                           env, command="learn", name=f"rank-{r}") for r in range(2)]
    codes = []
    app_id = env["SPARC_APP_ID"]
    try:
        for r in ranks:
            r.start(wait=False)
        for r in ranks:
            r.wait_until_live()

        def covered() -> bool:
            status, latest = get_json(ranks[0].port, "/snapshots/latest")
            return status == 200 and train_positions(latest["watermark"]["kafka"], app_id) == {
                f"{app_id}-train-examples:{p}": 6 for p in range(4)} and latest
        latest = ranks[0].wait_for("a snapshot that has learnt all four partitions", covered, 180)
    finally:
        for r in ranks:  # every rank at once: the ranks stop together, and a SIGTERM that reached a rank already
            if r.process is not None and r.process.poll() is None:  # on its way out (interpreter shutdown, where
                r.process.send_signal(signal.SIGTERM)  # Python has reset the handlers) would kill it
        for r in ranks:  # no second SIGTERM: wait, and kill only a rank that does not stop
            try:
                codes.append(r.process.wait(timeout=90) if r.process is not None else "never started")
            except subprocess.TimeoutExpired:
                codes.append(f"killed after 90 s: {r.kill()}")
        delete_topics_of(kafka_bootstrap, run)
    assert codes == [0, 0], [log_tail(r.log) for r in ranks]
    logs = [read_processed_log(tmp_path / f"processed-{r}.jsonl") for r in range(2)]
    read = [{key for line in lines if "read" in line for key in line["read"]} for lines in logs]
    assert read == [{f"{app_id}-train-examples:{p}" for p in (0, 2)}, {f"{app_id}-train-examples:{p}" for p in (1, 3)}]
    upto = train_positions(latest["watermark"]["kafka"], app_id)
    assert sorted(learnt_event_ids(logs[0], upto) + learnt_event_ids(logs[1], upto)) == sorted(ids)
    assert latest["health"]["steps"] >= 6 and latest["health"]["gate"]["passed"]
