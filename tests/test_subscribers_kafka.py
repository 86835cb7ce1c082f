"""Subscribers of a real worker's codebook-updates on a real broker (issue 14).

`sparc worker` publishes at least 12 versions, signed with an Ed25519 key, weights included, a whole item table
every 5th, while the synthetic stream brings new items in three phases into a catalogue of MAX_ITEMS that evicts
its least recently seen item for each new one (rows are handed to other items: the vocabulary travels as deltas,
contract 3.1). Then:
- subscribers that join at every announced version (the Python API, in threads) and at earliest and latest
  (`sparc subscribe` in subprocesses where torch cannot be imported) all end with the publisher's latest state:
  the sha256 of every tensor, the vocabulary included; every version the earliest one mirrors is the worker's
  stored snapshot, byte for byte;
- a Java program (tests/java, kafka-clients from Maven) reassembles an update from the broker, verifies its
  checksums and signature, the format-2 manifest and the vocabulary, and prints the manifest: the contract
  (docs/codebook-updates.md) suffices without Python. It refuses the same update under another key.
No timing is asserted; every wait is bounded and names what it waited for.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from test_codebook_signing import write_ed25519
from test_subscribe_cli import schema
from worker_harness import ROOT, TINY_MODEL, Reader, WorkerProcess, delete_topics_of, log_tail

from codebook_store import Follower, Reassembler, load_verifier, open_store, subscribe
from codebook_store.format import load_arrays, parse_manifest
from sparc_stream.cli.main import main as sparc

pytestmark = [pytest.mark.kafka, pytest.mark.timeout(900)]

VERSIONS = 12
PHASES = (640, 1280, 1920)  # feedback events produced so far after each phase; new items arrive in each
MAX_ITEMS = 264  # the phases bring 258, 270 and 288 items: the first grows the table, the others fill it and evict
JAVA_BUILD = ROOT / "tests" / "java" / "build.sh"


def state(url: str, version: int | None = None) -> dict[str, str]:
    """{tensor name: sha256 of its bytes} of a stored version (latest by default), read without torch."""
    with open_store(url, read_only=True) as store:
        version = store.latest_version() if version is None else version
        manifest, blobs = store.read_raw(version)
    parsed = parse_manifest(manifest)
    out = {"version": str(version)}
    for blob in parsed.blobs:
        for name, array in load_arrays(parsed, blob, blobs[blob]).items():
            out[name] = hashlib.sha256(array.tobytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def published(kafka_bootstrap, tmp_path_factory):
    """A worker's signed stream of at least VERSIONS updates; yields (topic, store URL, public key, updates)."""
    tmp = tmp_path_factory.mktemp("published")
    run = uuid.uuid4().hex[:10]
    topics = {name: f"subs-{name.lower()}-{run}" for name in ("FEEDBACK", "ITEM", "UPDATES", "DLQ")}
    private, public = write_ed25519(tmp, "updates")
    env = {**{f"SPARC_{name}_TOPIC": topic for name, topic in topics.items()}, **TINY_MODEL,
           "SPARC_ANNOUNCE_WEIGHTS": "true", "SPARC_FULL_CODES_EVERY": "5", "SPARC_MAX_ITEMS": str(MAX_ITEMS),
           "SPARC_ON_CATALOGUE_FULL": "evict"}
    store = f"file://{tmp}/store"
    flags = (f"--broker {kafka_bootstrap} --store {store} --data-dir {tmp}/faust --batch-size 32 "
             f"--app-id subs-{run} --partitions 1 --snapshot-every-steps 4 --snapshot-every-seconds 600 "
             f"--signing-key {private}")
    w = WorkerProcess(tmp, flags.split(), env)
    updates = Reader(kafka_bootstrap, topics["UPDATES"])
    verifier = load_verifier([public])
    announced: list = []

    def poll(records=None) -> int:
        r = Reassembler(verifier=verifier)  # every update signed by the worker's key
        announced[:] = [u for rec in records or updates.poll() if (u := r.accept(rec.key, rec.value, rec.headers))]
        return len(announced)

    seen: list[tuple] = []

    def settled() -> bool:
        """Nothing learnt, stored or announced for three probes, and the stored latest announced: a SIGTERM now
        cuts no snapshot between the store and the topic (the worker stores a snapshot before announcing it)."""
        with open_store(store, read_only=True) as s:
            seen.append((w.metric("sparc_learnt_events_total"), s.latest_version(), poll()))
        return len(set(seen[-3:])) == 1 and len(seen) >= 3 and announced[-1].version == seen[-1][1]

    try:
        w.start()
        for phase, limit in enumerate(PHASES, 1):
            produce = (f"produce --synthetic --users 150 --events {PHASES[-1]} --items 240 --rate 0 --quiet "
                       f"--limit {limit} --broker {kafka_bootstrap} --topic {topics['FEEDBACK']} "
                       f"--item-topic {topics['ITEM']} --partitions 1").split()
            assert sparc(produce) == 0
            wanted = VERSIONS * phase // len(PHASES)
            w.wait_for(f"{wanted} signed codebook updates", lambda wanted=wanted: poll() >= wanted, 240)
        w.wait_for("the worker to learn every event and announce its latest snapshot", settled, 180)
        code = w.terminate(90)
        assert code == 0, f"worker exit status {code}; log tail:\n{log_tail(w.log, 30)}"
        poll(updates.drain())  # the worker may have announced more since the last wait: read them all
        yield topics["UPDATES"], store, public, list(announced)
    finally:
        updates.close()
        w.stop_quietly()
        delete_topics_of(kafka_bootstrap, run)


def test_the_stream_has_new_items_remaps_and_full_tables(published):
    _, store, _, updates = published
    versions = [u.version for u in updates]
    assert len(versions) >= VERSIONS and versions == sorted(set(versions))
    assert all(u.signed_by is not None and u.weights is not None for u in updates)
    remaps = [u for u in updates if u.remap is not None]
    assert len(remaps) == len(updates) - 1  # every update after the first is a remap from the one before
    assert any(u.remap.added_items.size for u in remaps), "no version added items"
    assert any(0 in u.remap.changed_items for u in remaps), "the padding row never changed"  # what broke v2
    assert [u.version for u in updates if u.item_codes is not None] == versions[::5]  # v0 and every 5th whole
    assert all(u.vocabulary_sent == "whole" for u in updates[::5])  # with the whole table
    deltas = [u for u in updates if u.vocabulary_sent == "delta"]  # whole where most rows churned (fewer bytes)
    assert deltas and all(u.vocabulary_sent in ("whole", "delta") for u in updates)
    follower = Follower(start=0)
    resolved = [follower.offer(u) for u in updates]  # each rebuilt from the one before, checked by sha256
    assert all(u.item_ids is not None and u.num_items <= MAX_ITEMS for u in resolved)
    evicted = [u for u in resolved[1:] if u.item_remap.reused_rows.size]
    assert any(u.ids_delta is not None for u in evicted), "no eviction travelled as a delta"
    for before, u in zip(resolved, resolved[1:], strict=False):
        by_id = u.item_remap  # a row whose id changed: its old id removed, its new one added (or moved rows)
        assert len(by_id.added) - len(by_id.removed) == u.num_items - before.num_items
        assert not set(by_id.removed) & set(u.item_ids) and not set(by_id.added) & set(before.item_ids)
        if u.ids_delta is not None:  # the delta names the rows whose id changed and the rows added
            assert u.ids_delta.rows.size == by_id.reused_rows.size + u.remap.added_items.size
    header, manifest = schema("update-header.schema.json"), schema("snapshot-manifest.schema.json")
    for u in updates:  # the contract's JSON Schemas hold for a real worker's updates
        header.validate(u.header)
        manifest.validate(json.loads(u.manifest_raw))
    with open_store(store, read_only=True) as s:
        assert s.latest_version() == versions[-1]


def test_every_subscriber_ends_with_the_publishers_state(kafka_bootstrap, published, tmp_path):
    topic, store, public, updates = published
    versions = [u.version for u in updates]
    expected = state(store)
    verifier = load_verifier([public])

    def follow(start: int):
        url = f"file://{tmp_path}/from-{start}"
        sub = subscribe(kafka_bootstrap, topic, start=start, store_url=url, timeout=3, verifier=verifier)
        return [(u.version, u.item_codes is not None, u.complete) for u in sub], sub.stats, url

    def cli(start: str) -> subprocess.Popen:
        argv = ["subscribe", "--broker", kafka_bootstrap, "--topic", topic, "--from", start, "--jsonl",
                "--to-store", f"file://{tmp_path}/cli-{start}", "--verify-key", str(public), "--idle-timeout", "3"]
        code = (f"import sys; sys.modules['torch'] = None; from sparc_stream.cli.main import main; "
                f"sys.exit(main({argv!r}))")
        return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    processes = {start: cli(start) for start in ("earliest", "latest")}  # torch cannot be imported in them
    with ThreadPoolExecutor(len(versions)) as pool:  # each mostly waits on the broker
        followed = dict(zip(versions, pool.map(follow, versions), strict=True))
    for start, (yielded, stats, url) in followed.items():
        assert yielded == [(v, True, True) for v in versions if v >= start], f"from v{start}: {stats}"
        assert (stats.rejected, stats.refused, stats.unresolved) == (0, 0, 0), f"from v{start}: {stats}"
        assert state(url) == expected, f"the subscriber from v{start} differs from the publisher"

    for start, process in processes.items():
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, f"sparc subscribe --from {start}:\n{err}"
        rows = [json.loads(line) for line in out.splitlines()]
        assert [r["version"] for r in rows] == (versions if start == "earliest" else versions[-1:]), err
        assert all(r["signed_by"] and r["complete"] and r["stored"] for r in rows)
        final = {name: sha for name, sha in expected.items() if name != "version"}
        assert rows[-1]["tensor_sha256"] == final and state(f"file://{tmp_path}/cli-{start}") == expected
        assert all(r["vocabulary"]["known"] for r in rows) and rows[-1]["vocabulary"]["sha256"] == final["item_ids"]
        assert "0 rejected, 0 refused" in err

    with open_store(store, read_only=True) as worker, open_store(f"file://{tmp_path}/cli-earliest") as mirror:
        assert mirror.versions() == versions
        for version in versions:  # the very bytes the worker stored
            assert mirror.read_raw(version) == worker.read_raw(version)


def java(*args: str) -> subprocess.CompletedProcess:
    built = subprocess.run(["bash", str(JAVA_BUILD)], capture_output=True, text=True, timeout=600, check=False)
    if built.returncode != 0:  # never a skip: CI must have Java 17 and Maven (as for the broker)
        pytest.fail(f"tests/java/build.sh failed:\n{built.stderr[-3000:]}", pytrace=False)
    home = built.stdout.strip().splitlines()[-1]
    command = ["java", "-cp", f"{home}/classes:{home}/libs/*", "sparc.UpdateReader", *args]
    return subprocess.run(command, capture_output=True, timeout=180, check=False)


def test_a_java_reader_verifies_an_update_and_prints_its_manifest(kafka_bootstrap, published, tmp_path):
    topic, store, public, updates = published
    last = updates[-1]  # a remap with weights: every kind of part
    done = java(kafka_bootstrap, topic, "sparc", "latest", str(public))
    report = done.stderr.decode()
    assert done.returncode == 0, report
    with open_store(store, read_only=True) as s:
        manifest, _ = s.read_raw(last.version)
    assert done.stdout == manifest  # the verified manifest, byte for byte as the worker stored it
    assert f"verified sparc v{last.version}: manifest format 2" in report
    assert f"ed25519 key {last.signed_by}" in report
    assert "remap.safetensors" in report and "weights.safetensors" in report
    final = state(store)["item_ids"]  # the sha256 of the stored vocabulary's JSON
    assert f"vocabulary of sparc v{last.version}: " in report and f"sha256 {final}, the blob matches" in report
    delta = [u for u in updates if u.vocabulary_sent == "delta"][-1]
    if delta is not last:  # the Java reader rebuilds a vocabulary from its base on the topic and a delta
        report = java(kafka_bootstrap, topic, "sparc", str(delta.version), str(public)).stderr.decode()
    rows = delta.ids_delta.rows.size
    assert f"sparc v{delta.version}: rebuilt from v{delta.remap_from} and a delta of {rows} rows" in report

    _, stranger = write_ed25519(tmp_path, "stranger")
    refused = java(kafka_bootstrap, topic, "sparc", str(last.version), str(stranger))
    assert refused.returncode == 1 and b"no valid signature" in refused.stderr
