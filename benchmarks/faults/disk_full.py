"""The store's disk full during a publish: the previous latest still served, the alarm metric set; and what happens
once space is back.

For each store kind (rocksdb://, the worker's default, and file://): a Deployment of its own whose codebook store
alone lives on a tmpfs mounted for the run (STORE_DISK_MB; the worker's tables and logs stay on the ordinary
disk), the worker's defaults with a snapshot every 2 s, feedback at --rate events/s. Once the worker serves a
second version, a filler file takes every free byte of the tmpfs (4 MiB writes, then 4 KiB ones, until ENOSPC), so
the next publish runs out of space part-way. Then, per store:
  failed_after_s            from the disk full to the first failed publish (sparc_snapshots_total{outcome=failed})
  alarm_set                 sparc_publish_failing == 1 while full (sampled every 0.5 s for FULL_S seconds)
  served_before / served_while_full   the version served before, and every version served while full (must be the
                            same one: the previous latest still served); latest_in_store_while_full likewise
  retrieve_while_full       /retrieve answers 200 all along; training_while_full: steps went on
  recovered_after_s         from freeing the space to a new version served with the alarm back at 0
  warm_start                the worker stopped and started again on that store: the version it starts from, and
                            `sparc snapshots verify` on the store (versions that verify / all)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.harness import (
    ROOT,
    Deployment,
    PacedProducer,
    WorkerProcess,
    catalogue_messages,
    feedback_events,
    get,
    get_json,
    json_messages,
    poll_until,
    send_all,
    synthetic,
)

STORE_DISK_MB = 256
FULL_S = 12.0  # how long the disk stays full
STORES = ("rocksdb", "file")


@contextlib.contextmanager
def tmpfs(path: Path, megabytes: int):
    """A tmpfs of `megabytes` mounted at `path` for the block (needs root, as the suite's docstring says)."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(path)], check=True,
                   capture_output=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


def fill(path: Path) -> int:
    """Write a filler file in `path` until the filesystem has no byte left; returns the bytes written."""
    written = 0
    with open(path / "filler", "wb", buffering=0) as fh:
        for chunk in (4 << 20, 4 << 10, 512):
            block = b"\0" * chunk
            while True:
                try:
                    written += fh.write(block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
    return written


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def verify(store_url: str) -> dict:
    """`sparc snapshots verify --json` on the store: versions that verify, of all, and the latest."""
    done = subprocess.run([sys.executable, "-m", "sparc_stream.cli.main", "snapshots", "verify", "--store", store_url,
                           "--json"], cwd=ROOT, capture_output=True, text=True, check=False)
    try:
        out = json.loads(done.stdout)
    except ValueError:
        return {"exit": done.returncode, "error": (done.stderr or done.stdout)[-500:]}
    versions = out.get("versions", [])
    return {"exit": done.returncode, "versions": len(versions), "verify": sum(1 for v in versions if v["ok"]),
            "latest": out.get("latest"), "problems": [v for v in versions if not v["ok"]][:5]}


def one_store(ctx: Context, kind: str, stream) -> dict:
    o = ctx.options
    where = ctx.workdir / kind
    disk = where / "disk"
    out: dict = {"store": kind, "disk_mb": STORE_DISK_MB, "full_s": FULL_S}
    with tmpfs(disk, STORE_DISK_MB):
        d = Deployment(ctx.bootstrap, where, f"faults-disk-{kind}", store=f"{kind}://{disk / 'store'}",
                       settings=WORKER_SETTINGS)
        d.create_topics()
        send_all(ctx.bootstrap, d.topics["item"], catalogue_messages(stream))
        producer = PacedProducer(ctx.bootstrap, d.topics["feedback"], json_messages(feedback_events(stream)), o.rate)
        user = str(next(feedback_events(stream))["user_id"])
        w: WorkerProcess = d.worker()
        alive = lambda: w.process.poll() is None  # noqa: E731
        try:
            w.start()
            producer.start()
            if poll_until(lambda: w.metric("sparc_snapshot_version") >= 1, ctx.bound(240), alive) is None:
                raise RuntimeError(f"no second version served within the bound; worker log: {w.log}")
            served = int(w.metric("sparc_snapshot_version"))
            failed, steps = w.metric('sparc_snapshots_total{outcome="failed"}'), w.metric("sparc_train_steps_total")
            out.update(served_before=served, store_mb_before=round(
                (STORE_DISK_MB * 2**20 - free_bytes(disk)) / 2**20, 1))
            at = time.time()
            out["filler_bytes"] = fill(disk)
            out["free_bytes_after_fill"] = free_bytes(disk)
            ctx.say(f"{kind}: the store's disk is full (v{served} served)")
            hit = poll_until(lambda: w.metric('sparc_snapshots_total{outcome="failed"}') > failed, ctx.bound(60),
                             alive)
            out["failed_after_s"] = None if hit is None else round(hit - at, 2)
            samples = []
            while time.time() < at + FULL_S + (out["failed_after_s"] or 0) and alive():
                text = w.metrics_text()
                _, latest = get_json(w.port, "/snapshots/latest")
                samples.append({"served": _int(_metric(text, "sparc_snapshot_version")),
                                "alarm": _metric(text, "sparc_publish_failing"),
                                "latest": (latest or {}).get("version"),
                                "retrieve": get(w.port, f"/retrieve/{user}?k=10")[0]})
                time.sleep(0.5)
            out.update(
                served_while_full=sorted({s["served"] for s in samples}),
                latest_in_store_while_full=sorted({s["latest"] for s in samples if s["latest"] is not None}),
                alarm_set=bool(samples) and any(s["alarm"] == 1 for s in samples),
                alarm_samples=f"{sum(s['alarm'] == 1 for s in samples)} of {len(samples)}",
                retrieve_while_full=sorted({s["retrieve"] for s in samples}),
                failed_publishes_while_full=w.metric('sparc_snapshots_total{outcome="failed"}') - failed,
                training_while_full=w.metric("sparc_train_steps_total") > steps,
                previous_latest_still_served=bool(samples) and {s["served"] for s in samples} == {served},
            )
            ctx.record(**{kind: out})
            (disk / "filler").unlink()
            freed = time.time()
            ctx.say(f"{kind}: space is back")
            back = poll_until(lambda: w.metric("sparc_publish_failing") == 0
                              and w.metric("sparc_snapshot_version") > served, ctx.bound(120), alive)
            out["recovered_after_s"] = None if back is None else round(back - freed, 2)
            out["served_after"] = int(w.metric("sparc_snapshot_version"))
            out["worker_alive"] = alive()
            producer.finish()
            out["exit"] = w.terminate()
            out["verify"] = verify(d.store_url)
            w.start()
            warm = poll_until(lambda: w.metric("sparc_snapshot_version") >= 0, ctx.bound(120), alive)
            out["warm_start"] = {"started": alive(), "version": _int(w.metric("sparc_warm_start_version")),
                                 "serving_after_s": None if warm is None else round(warm - freed, 1)}
            ctx.record(**{kind: out})
        finally:
            producer.finish(30)
            w.stop_quietly()
            with contextlib.suppress(Exception):
                d.delete_topics()
    return out


def _metric(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def _int(x: float | None) -> int | None:
    return None if x is None else int(x)


def run(ctx: Context) -> dict:
    stream = synthetic(ctx.options.seed, int(ctx.options.rate * 300))
    for kind in STORES:
        if ctx.left() < 120:
            ctx.record(**{kind: {"skipped": "the scenario's time is nearly up"}})
            continue
        one_store(ctx, kind, stream)
    ctx.record(previous_latest_still_served=all(ctx.figures.get(k, {}).get("previous_latest_still_served")
                                                for k in STORES),
               alarm_set=all(ctx.figures.get(k, {}).get("alarm_set") for k in STORES))
    return ctx.figures
