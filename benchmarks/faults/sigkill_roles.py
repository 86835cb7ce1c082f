"""SIGKILL of each scale-out role under load (issue 15: "and of each role, once roles exist"): the learner, an
ingest replica and a serve replica, each killed --kills times at random moments and restarted at once (as a
supervisor would), in that order, on one deployment.

The deployment (harness.Deployment.role, loopback, the worker's defaults with a snapshot every 2 s, as the
worker's sigkill scenario): 4 partitions, 2 `sparc ingest` replicas (static membership: --group-instance-id
ingest-0/1, so a replica restarted under its id takes its partitions back), 1 `sparc learn` (writing the processed
log), 2 `sparc serve` replicas, a file:// store. The catalogue is produced, then feedback at --rate events/s from
a thread for the whole scenario. Each role's kills are benchmarks.faults.sigkill.kill_loop's (one in four while the
process starts, the others once it works, moments from the seeded generator); the process killed is the learner,
ingest-0, serve-0. The kills start once the learner has a latest snapshot; --roles picks the roles killed.

After the last phase the producer stops and the suite waits until the latest snapshot has learnt every event Kafka
acknowledged (Deployment.wait_learnt, while the learner learns on: a learner behind on a loaded machine is waited
for, within the scenario's bound). A role's events (its window) are those sent from the start of its phase to its
end; its figures:
  learn   lost, learnt_twice       the window's events the latest snapshot has not learnt / has learnt more than
                                   once (the learner's processed log: Deployment.audit); lost_examples names them
                                   with their feedback partition and offset
          repeated_versions        versions announced on codebook-updates during the phase that were announced
                                   before; versions_out_of_order, announced_not_stored as in the worker's scenario
          seconds_to_training      per kill: SIGKILL -> the first training step of a later learner process
  ingest  the same figures; seconds_to_forwarding per kill: SIGKILL -> a later ingest-0 has forwarded an event
          to the train topic (its sparc_events_total; the learner then trains on it at its own pace, which a
          backlog on a loaded machine would make this figure measure instead). takeover: the other replica's
          feedback partitions, sampled every 0.5 s during the phase (more than its own 2 means it took the dead
          one's over: a rebalance)
  serve   seconds_to_serving per kill: SIGKILL -> GET /retrieve/{user} on a later serve-0 answers 200 with a
          snapshot version; other_replica: a client polling GET /retrieve/{user} on serve-1 the whole phase
          (requests, answers that were not 200, their statuses)
  every role: crashes (exits of the killed process nobody asked for), others_exited (another role's process gone)
The whole stream is audited the same way (overall). Each role's pass rule (RULES) is recorded beside its figures
as `passed`.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.faults.sigkill import Target, kill_loop, trains
from benchmarks.harness import (
    Deployment,
    PacedProducer,
    Reader,
    WorkerProcess,
    announced,
    catalogue_messages,
    feedback_events,
    get,
    get_json,
    json_messages,
    log_tail,
    send_all,
    synthetic,
)
from benchmarks.roles_bench import partitions_of

PARTITIONS = 4
USER = "1"  # the user whose recommendations the serve probes ask for

def learnt_all(f: dict) -> bool:
    return f["lost"] == 0 and f["repeated_versions"] == f["versions_out_of_order"] == f["announced_not_stored"] == 0


# A role's pass rule: (what it says, the check over its figures)
RULES: dict[str, tuple[str, Callable[[dict], bool]]] = {
    "learn": ("lost == 0, repeated_versions == versions_out_of_order == announced_not_stored == 0, training again "
              "after every kill, no crash",
              lambda f: learnt_all(f) and f["seconds_to_training"]["never"] == 0 and not f["crashes"]),
    "ingest": ("lost == 0, repeated_versions == versions_out_of_order == announced_not_stored == 0, forwarding "
               "again after every kill, no crash",
               lambda f: learnt_all(f) and f["seconds_to_forwarding"]["never"] == 0 and not f["crashes"]),
    "serve": ("answering 200 with a snapshot version again after every kill, 0 errors on the other replica, no "
              "crash", lambda f: f["seconds_to_serving"]["never"] == 0 and f["other_replica"]["errors"] == 0
              and f["other_replica"]["requests"] > 0 and not f["crashes"]),
}


class Sampler(threading.Thread):
    """Calls `probe` every `every` s until `stop`; keeps (unix time, what it returned)."""

    def __init__(self, probe: Callable[[], Any], every: float):
        super().__init__(daemon=True)
        self.probe, self.every = probe, every
        self.samples: list[tuple[float, Any]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.samples.append((time.time(), self.probe()))
            self.stop.wait(self.every)

    def finish(self) -> list[tuple[float, Any]]:
        self.stop.set()
        self.join(timeout=30)
        return self.samples


def retrieve_version(port: int) -> tuple[int, int | None]:
    """GET /retrieve/USER on a serve replica: (status, the snapshot version it answered with)."""
    status, body = get(port, f"/retrieve/{USER}?k=10", timeout=5.0)
    version = json.loads(body).get("version") if status == 200 else None
    return status, version


def forwards(w: WorkerProcess) -> bool:
    return w.metric("sparc_events_total") >= 1


def serves(w: WorkerProcess) -> bool:
    status, version = retrieve_version(w.port)
    return status == 200 and version is not None


def summary(per_kill: list[dict], key: str) -> dict:
    timed = [r[key] for r in per_kill if r.get(key) is not None]
    return {"max": max(timed, default=None), "median": sorted(timed)[len(timed) // 2] if timed else None,
            "never": len(per_kill) - len(timed)}


def version_figures(versions: list[int], start: int, stored: set[int]) -> dict:
    """Of the versions announced from index `start` on: announced before (repeated), below the one before
    (out of order), not in the store."""
    mine = versions[start:]
    return {"versions_announced": len(mine),
            "repeated_versions": sum(1 for i in range(start, len(versions)) if versions[i] in versions[:i]),
            "versions_out_of_order": sum(1 for i in range(max(start, 1), len(versions))
                                         if versions[i] <= versions[i - 1]),
            "announced_not_stored": len(set(mine) - stored)}


def check(role: str, figures: dict) -> dict:
    rule, passes = RULES[role]
    return {**figures, "rule": rule, "passed": bool(passes(figures))}


class RolesRun:
    """The deployment, its load and the readers the phases share."""

    def __init__(self, ctx: Context):
        o = ctx.options
        self.ctx = ctx
        seconds = 3 * o.kills * 40 + 300  # a generous bound of the scenario's length: the stream must not run out
        stream = synthetic(o.seed, int(o.rate * seconds))
        self.d = d = Deployment(ctx.bootstrap, ctx.workdir, "faults-roles", store="file", settings=WORKER_SETTINGS,
                                partitions=PARTITIONS)
        d.create_topics()
        send_all(ctx.bootstrap, d.topics["item"], catalogue_messages(stream))
        self.ingest = [d.role("ingest", f"ingest-{n}", SPARC_GROUP_INSTANCE_ID=f"ingest-{n}") for n in range(2)]
        self.learn = d.role("learn")
        self.serve = [d.role("serve", f"serve-{n}") for n in range(2)]
        self.everyone = [*self.ingest, self.learn, *self.serve]
        self.producer = PacedProducer(ctx.bootstrap, d.topics["feedback"], json_messages(feedback_events(stream)),
                                      o.rate)
        self.updates = Reader(ctx.bootstrap, d.topics["updates"])
        self.versions_seen = 0  # announced versions counted by earlier phases

    def start(self) -> None:
        """Start every process, then the load; return once the learner has a latest snapshot (the health gate
        holds a young model's back: a learner killed before any passed would only ever start cold)."""
        for p in self.everyone:
            p.start(wait=False)
        for p in self.everyone:
            p.wait_until_live(self.ctx.bound(300))
        for p in self.ingest:  # both members hold partitions before the load starts
            p.wait_for("the ingest group to settle", lambda p=p: get_json(p.port, "/readyz")[0] == 200,
                       self.ctx.bound(180))
        self.producer.start()
        self.learn.wait_for("the learner's first latest snapshot",
                            lambda: get_json(self.learn.port, "/snapshots/latest")[0] == 200, self.ctx.bound(900))

    def acked(self, since: float = 0.0, until: float = float("inf")) -> list[tuple[str, int, int, float]]:
        return [a for a in list(self.producer.acked) if since <= a[3] < until]

    def others_exited(self, target: WorkerProcess) -> dict[str, int]:
        return {p.name: p.process.returncode for p in self.everyone
                if p is not target and p.process is not None and p.process.poll() is not None}

    def versions(self) -> list[int]:
        """Every version announced on codebook-updates so far, in order."""
        return [m.version for m in announced(self.updates.drain(self.ctx.bound(120)))]

    def phase(self, role: str, rng: random.Random) -> dict:
        """Kill the role's process --kills times; what needs the learner to have caught up (the audit) waits for
        `audit`, after the last phase."""
        ctx, o = self.ctx, self.ctx.options
        record = lambda **f: ctx.record(**{role: {**ctx.figures.get(role, {}), **f}})  # noqa: E731
        if role == "learn":
            target = Target(self.learn, trains)
        elif role == "ingest":
            target = Target(self.ingest[0], forwards, phase="forwarding", again="seconds_to_forwarding",
                            progress="sparc_events_total")
        else:
            target = Target(self.serve[0], serves, phase="serving", again="seconds_to_serving",
                            progress="sparc_retrieve_seconds_count")
        other = {"ingest": self.ingest[1], "serve": self.serve[1]}.get(role)
        watch = None
        if role == "ingest":
            watch = Sampler(lambda: partitions_of(other.metrics_text(), self.d.topics["feedback"]), 0.5)
        elif role == "serve":
            watch = Sampler(lambda: retrieve_version(other.port), 0.2)
        started, announced_before = time.time(), len(self.versions())
        if watch is not None:
            watch.start()
        try:
            out = kill_loop(ctx, target, o.kills, rng, record)
        finally:
            samples = watch.finish() if watch is not None else []
        out[target.again] = summary(out["kills"], target.again)
        out["others_exited"] = self.others_exited(target.process)
        out["window"] = {"from": round(started, 3), "to": round(time.time(), 3),
                         "versions": [announced_before, len(self.versions())]}
        if role == "ingest":
            held = [len(s) for _, s in samples]
            out["takeover"] = {"samples": len(held), "other_replica_partitions_max": max(held, default=None),
                               "samples_holding_more_than_its_share": sum(1 for n in held if n > PARTITIONS // 2)}
        if role == "serve":
            statuses = Counter(s for _, (s, _) in samples)
            out["other_replica"] = {"requests": len(samples), "errors": sum(n for s, n in statuses.items() if s != 200),
                                    "statuses": {str(s): n for s, n in statuses.items()},
                                    "versions": sorted({v for _, (_, v) in samples if v is not None})[-1:]}
            out = check(role, out)
        record(**out)
        return ctx.figures[role]

    def audit(self) -> dict:
        """Stop the load, wait until the latest snapshot has learnt every acknowledged event (while the learner
        learns on), then audit the whole stream and each phase's window (its events, its versions)."""
        ctx, d = self.ctx, self.d
        self.producer.finish()
        acked = self.acked()
        wanted = {a[0] for a in acked}
        ctx.say(f"producer stopped: {len(wanted)} events acknowledged, {self.producer.failed} failed; waiting for "
                "a latest snapshot that has learnt them all")
        started = time.time()
        caught = d.wait_learnt(wanted, self.learn.port, ctx.bound(ctx.left() - 60),
                               lambda: self.learn.process.poll() is None)
        versions = self.versions()
        from codebook_store import open_store

        with open_store(d.store_url, read_only=True) as store:
            stored = set(store.versions())
        missing = d.missing(wanted, self.learn.port) or set()
        for role in ("learn", "ingest"):
            f = ctx.figures.get(role)
            if not f or "window" not in f:
                continue
            w = f["window"]
            window = [a for a in acked if w["from"] <= a[3] < w["to"]]
            first, last = w["versions"]
            f.update(d.audit([a[0] for a in window], self.learn.port),
                     lost_examples=[{"event_id": i, "partition": p, "offset": o}
                                    for i, p, o, _ in window if i in missing][:50],
                     **version_figures(versions[:last], first, stored))
            ctx.record(**{role: check(role, f)})
        return {"events_acknowledged": len(wanted), "producer_failed": self.producer.failed,
                **d.audit(wanted, self.learn.port), **version_figures(versions, 0, stored),
                "lost_examples": [{"event_id": i, "partition": p, "offset": o}
                                  for i, p, o, _ in acked if i in missing][:50],
                "caught_up_after_s": None if caught is None else round(caught - started, 1)}

    def close(self) -> dict:
        self.producer.finish(30)
        self.updates.close()
        exits = {}
        for p in self.everyone:
            if p.process is not None and p.process.poll() is None:
                exits[p.name] = p.terminate(60)
        self.d.delete_topics()
        return exits


def run(ctx: Context) -> dict:
    o = ctx.options
    rng = random.Random(o.seed)
    r = RolesRun(ctx)
    ctx.record(rate=o.rate, kills_planned=o.kills, seed=o.seed, partitions=PARTITIONS,
               replicas={"ingest": 2, "learn": 1, "serve": 2}, rules={k: v[0] for k, v in RULES.items()})
    try:
        t0 = time.time()
        r.start()
        ctx.record(started_after_s=round(time.time() - t0, 1))  # the first latest snapshot included
        for role in o.roles.split(","):
            ctx.say(f"== {role}: {o.kills} kills")
            r.phase(role, rng)
        ctx.record(overall=r.audit())
    finally:
        exits = r.close()
        ctx.record(final_exit=exits, log_tails={p.name: log_tail(p.log, 8) for p in r.everyone
                                                if exits.get(p.name) not in (0, None)})
    return ctx.figures
