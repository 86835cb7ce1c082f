"""SIGKILL of the worker at random moments under load: events lost, events learnt twice, repeated versions, seconds
until training again.

A Deployment of its own (topics, consumer group, store, tables) with the worker's defaults and a snapshot every
2 s; the catalogue is produced, then feedback at --rate events/s from a thread for the whole scenario. The worker is
SIGKILLed --kills times and started again at once each time (a warm start from the store; the history table from
RocksDB and its changelog). The moments are drawn from a seeded generator: one kill in four (in a shuffled order)
while the worker starts (U(0.5, 8) s after its launch: loading, recovering the table, joining the group), the
others while it trains (U(0.5, 12) s after its first training step; --kill-window-seconds scales both, 12 by
default, 3 under --quick). After the last kill the worker runs on, the
producer stops, and the latest snapshot must come to hold every event Kafka acknowledged (Deployment.wait_learnt:
waited for while the worker learns on, within the scenario's bound). Figures:
  lost, learnt_twice    acknowledged events the latest snapshot has not learnt / has learnt more than once
                        (its lineage in the processed log: harness.Deployment.audit; at least once is the contract)
  repeated_versions     versions announced on codebook-updates more than once; versions_out_of_order: announced
                        below one announced before; announced_not_stored: announced but not in the store
  seconds_to_training   per kill: from the SIGKILL to the first training step of a later process
  crashes               exits nobody asked for (the worker died by itself)

`kill_loop` kills whatever `Target` it is given (a process, its "working again" probe and what that probe is
called); benchmarks/faults/sigkill_roles.py gives it each role of a scale-out deployment in turn.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.harness import (
    Deployment,
    PacedProducer,
    Reader,
    WorkerProcess,
    announced,
    catalogue_messages,
    feedback_events,
    json_messages,
    log_tail,
    poll_until,
    send_all,
    synthetic,
)

START_SHARE = 0.25  # of the kills land while the process starts (exactly, in a seeded order)


@dataclass
class Target:
    """A process to kill and restart, and the probe that says it works again (for the worker: a training step).
    `phase` names the kills drawn once it works ("training"), `again` the per-kill figure of the seconds from
    the SIGKILL to the probe holding for a later process; `progress`, a metric of the process noted at each kill."""

    process: WorkerProcess
    working: Callable[[WorkerProcess], bool]
    phase: str = "training"
    again: str = "seconds_to_training"
    progress: str = "sparc_train_steps_total"  # the metric each kill record notes the killed process's value of


def trains(w: WorkerProcess) -> bool:
    return w.metric("sparc_train_steps_total") >= 1


def kill_phases(kills: int, working: str, rng: random.Random, started_before: bool) -> list[str]:
    """Each kill's phase, in a seeded order: START_SHARE of them "starting", the others `working`. A process
    started before the loop is past its start, so its first kill is one drawn once it works."""
    starting = round(kills * START_SHARE)
    phases = ["starting"] * starting + [working] * (kills - starting)
    rng.shuffle(phases)
    if started_before and phases and phases[0] == "starting" and working in phases:
        i = phases.index(working)
        phases[0], phases[i] = phases[i], phases[0]
    return phases


def kill_loop(ctx: Context, target: Target, kills: int, rng: random.Random,
              record_so_far: Callable[..., None] | None = None) -> dict:
    """Kill `target` `kills` times at drawn moments (module doc: "training" is target.phase), restarting it at
    once; then wait until it works again. Returns the per-kill records and the crashes seen (recorded as they
    come by `record_so_far`, default ctx.record)."""
    record_so_far = record_so_far or ctx.record
    window = ctx.options.kill_window_s
    w = target.process
    running = lambda: w.process is not None and w.process.poll() is None  # noqa: E731
    records: list[dict] = []
    waiting: list[dict] = []  # kills whose "working again" is still to come
    crashes: list[dict] = []
    phases = kill_phases(kills, target.phase, rng, running())
    if not running():
        w.launch()
    launched = w.launched_at
    last_trained = 0.0

    def resolve(at: float | None) -> None:
        nonlocal last_trained
        last_trained = max(last_trained, at or 0.0)
        for r in waiting:
            r[target.again] = None if at is None else round(at - r["at"], 2)
        waiting.clear()

    for n in range(1, kills + 1):
        if ctx.left() < 120:
            ctx.say(f"stopping after {n - 1} kills: the scenario's time is nearly up")
            break
        phase = phases[n - 1]
        if phase == target.phase:
            first = poll_until(lambda: target.working(w), ctx.bound(240), running)
            if first is None and not running():
                crashes.append({"exit": w.process.returncode, "at": time.time(), "log_tail": log_tail(w.log, 30)})
                if len(crashes) >= 3 and all(c["at"] > last_trained for c in crashes[-3:]):
                    raise RuntimeError(f"{w.name} keeps exiting ({w.process.returncode}): {log_tail(w.log, 5)}")
                ctx.say(f"{w.name} exited by itself ({w.process.returncode}); starting it again")
                launched = time.time()
                w.launch()
                continue
            if first is not None:
                resolve(first)
            delay = rng.uniform(0.5, window)
            moment = (first or time.time()) + delay
        else:
            delay = rng.uniform(0.5, window * 2 / 3)
            moment = launched + delay
            first = poll_until(lambda: target.working(w), max(0.0, moment - time.time()), running)
            if first is not None:  # it trained already
                resolve(first)
        time.sleep(max(0.0, moment - time.time()))
        progress = w.metric(target.progress) if running() else None
        at = time.time()
        if running():
            w.kill()
        else:
            crashes.append({"exit": w.process.returncode, "at": at, "log_tail": log_tail(w.log, 30)})
        record = {"kill": n, "phase": phase, "after_s": round(delay, 2), "at": at, "progress_of_process": progress,
                  "uptime_s": round(at - launched, 2)}
        records.append(record)
        waiting.append(record)
        launched = time.time()
        w.launch()
        ctx.say(f"kill {n}/{kills} of {w.name}: {phase}, {delay:.1f} s in (process up {record['uptime_s']:.1f} s, "
                f"{target.progress} {progress if progress is not None else '-'})")
        record_so_far(kills=records, crashes=crashes)
    resolve(poll_until(lambda: target.working(w), ctx.bound(240), running))
    for r in records:
        r["at"] = round(r["at"], 3)
    return {"kills": records, "crashes": crashes, "progress_metric": target.progress}


def run(ctx: Context) -> dict:
    o = ctx.options
    rng = random.Random(o.seed)
    seconds = o.kills * 25 + 120
    stream = synthetic(o.seed, int(o.rate * seconds))
    d = Deployment(ctx.bootstrap, ctx.workdir, "faults-sigkill", settings=WORKER_SETTINGS)
    d.create_topics()
    send_all(ctx.bootstrap, d.topics["item"], catalogue_messages(stream))
    producer = PacedProducer(ctx.bootstrap, d.topics["feedback"], json_messages(feedback_events(stream)), o.rate)
    updates = Reader(ctx.bootstrap, d.topics["updates"])
    target = Target(d.worker(), trains)
    w = target.process
    ctx.record(rate=o.rate, kills_planned=o.kills, seed=o.seed)
    try:
        producer.start()
        ctx.record(**kill_loop(ctx, target, o.kills, rng))
        time.sleep(min(10.0, ctx.bound(10)))  # a little more load after the last restart
        producer.finish()
        wanted = {ident for ident, *_ in producer.acked}
        ctx.say(f"producer stopped: {len(wanted)} events acknowledged, {producer.failed} failed; waiting for a "
                "latest snapshot that has learnt them all (while it learns on)")
        started = time.time()
        caught_up = d.wait_learnt(wanted, w.port, ctx.bound(ctx.left() - 120), lambda: w.process.poll() is None)
        audit = d.audit(wanted, w.port)
        messages = announced(updates.drain(ctx.bound(120)))
        versions = [m.version for m in messages]
        from codebook_store import open_store

        exit_status = w.terminate()
        with open_store(d.store_url, read_only=True) as store:
            stored = set(store.versions())
        per_kill = [r["seconds_to_training"] for r in ctx.figures["kills"]]
        timed = [s for s in per_kill if s is not None]
        ctx.record(
            events_acknowledged=len(wanted), producer_failed=producer.failed, **audit,
            caught_up_after_s=None if caught_up is None else round(caught_up - started, 1),
            versions_announced=len(versions), repeated_versions=sum(n - 1 for n in Counter(versions).values()),
            versions_out_of_order=sum(1 for a, b in zip(versions, versions[1:], strict=False) if b <= a),
            announced_not_stored=len(set(versions) - stored),
            seconds_to_training={"max": max(timed, default=None), "median": sorted(timed)[len(timed) // 2]
                                 if timed else None, "never": len(per_kill) - len(timed)},
            final_exit=exit_status,
        )
    finally:
        producer.finish(30)
        updates.close()
        w.stop_quietly()
        d.delete_topics()
    return ctx.figures
