"""Malformed and adversarial input: crashes, the share dead-lettered with its reason and original bytes, and the
worker's training steps per second before and after (issue 15's bound: within 20%), with its RSS.

A Deployment of its own with the worker's defaults (the catalogue: the synthetic stream's 3,000 items). Phases,
each produced as a backlog the worker drains:
  control    --phase-events (12,800) events of the synthetic stream (200 micro-batches), as new users ("a-<user>")
  before     the same events as other new users ("b-<user>"): the same workload, so control -> before is the
             noise of the measurement (and the model's own drift), the baseline beside the change
  hostile    --malformed (10,000) malformed events, KINDS round robin (37 kinds, every one of the worker's
             validation reasons), shuffled with 100 adversarial-but-valid ones (ADVERSARIAL: ids at the top of
             their range, string ids of the longest length, unicode, "07", far-future timestamps within the day the
             worker allows, weights 0 and 1e6, an ignored 15 KB field); then --heavy-user-events (100,000) events
             of ONE user
  after      the same events once more as new users ("c-<user>"): the same workload as before; before -> after is
             what the hostile input changed (a user's step cost grows with its history, so fresh users keep the
             phases alike)
Steps/s of a phase, three ways: training steps over its steady part (between the samples at 10% and 90% of its
offsets trained); the learner thread's, 1 / the mean of sparc_train_step_seconds over the phase; and steps per
CPU-second of the learner thread (the figure other jobs on the machine disturb least). Every
dead letter is matched to what was sent by its bytes; its `reason` header must be there. Crashes: worker exits
and /livez answers other than 200 (polled all along). RSS (VmRSS) of the worker is sampled every second.
The heavy user's history (/retrieve's history_length) must stay at max_len.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter
from collections.abc import Callable

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.harness import (
    Deployment,
    Message,
    Reader,
    WorkerProcess,
    catalogue_messages,
    feedback_events,
    get_json,
    json_messages,
    poll_until,
    send_all,
    synthetic,
)
from benchmarks.worker_bench import feedback_offsets, proc_cpu

KEYS = ("steps_per_s_steady", "learner_steps_per_s", "steps_per_learner_cpu_s")  # the phases' three steps/s
ADVERSARIAL = 100
HEAVY_USER = "heavy-user"
MALFORMED_PREFIX = "bad-"  # the harness ids of malformed messages
INT64_MAX = 2**63 - 1


def _event(n: int, **changes) -> dict:
    base = {"event_id": f"bad-{n}", "user_id": 1 + n % 2000, "item_id": 1 + n % 3000, "timestamp": 1_700_000_000,
            "event_type": "view"}
    return {k: v for k, v in {**base, **changes}.items() if v is not ...}


def _json(n: int, **changes) -> bytes:
    return json.dumps(_event(n, **changes)).encode()


# kind -> (reason the worker must give, the n-th message of that kind); every message differs from every other
KINDS: dict[str, tuple[str, Callable[[int, float], bytes]]] = {
    "empty": ("bad_json", lambda n, now: b""),
    "garbage": ("bad_json", lambda n, now: b"not json %d" % n),
    "truncated": ("bad_json", lambda n, now: _json(n)[:-7]),
    "trailing_comma": ("bad_json", lambda n, now: _json(n)[:-1] + b",}"),
    "nested_3000_deep": ("bad_json", lambda n, now: _json(n)[:-1] + b', "x": ' + b"[" * 3000 + b"]" * 3000 + b"}"),
    "number_5000_digits": ("bad_json", lambda n, now: _json(n).replace(b'"user_id": ', b'"user_id": ' + b"9" * 5000)),
    "not_utf8": ("not_utf8", lambda n, now: b"\xff\xfe" + _json(n)),
    "array": ("not_an_object", lambda n, now: json.dumps([n, "view"]).encode()),
    "string": ("not_an_object", lambda n, now: json.dumps(f"event {n}").encode()),
    "number": ("not_an_object", lambda n, now: str(n).encode()),
    "null": ("not_an_object", lambda n, now: b"null" + b" " * (n % 64)),
    "oversized": ("oversized", lambda n, now: _json(n, pad="x" * 17_000)),
    "no_event_id": ("missing_field", lambda n, now: _json(n, event_id=..., tag=n)),
    "no_user_id": ("missing_field", lambda n, now: _json(n, user_id=...)),
    "no_item_id": ("missing_field", lambda n, now: _json(n, item_id=...)),
    "no_timestamp": ("missing_field", lambda n, now: _json(n, timestamp=...)),
    "no_event_type": ("missing_field", lambda n, now: _json(n, event_type=...)),
    "item_id_float": ("wrong_type", lambda n, now: _json(n, item_id=n + 0.5)),
    "item_id_bool": ("wrong_type", lambda n, now: _json(n, item_id=True)),
    "item_id_object": ("wrong_type", lambda n, now: _json(n, item_id={"id": n})),
    "user_id_list": ("wrong_type", lambda n, now: _json(n, user_id=[n])),
    "event_id_number": ("wrong_type", lambda n, now: _json(n, event_id=n)),
    "timestamp_text": ("wrong_type", lambda n, now: _json(n, timestamp=f"2024-01-{1 + n % 28:02d}")),
    "weight_text": ("wrong_type", lambda n, now: _json(n, weight="heavy")),
    "item_id_zero": ("out_of_range", lambda n, now: _json(n, item_id=0)),
    "item_id_negative": ("out_of_range", lambda n, now: _json(n, item_id=-1 - n)),
    "item_id_2_63": ("out_of_range", lambda n, now: _json(n, item_id=INT64_MAX + 1 + n)),
    "item_id_257_chars": ("out_of_range", lambda n, now: _json(n, item_id=f"{n}-" + "x" * 256)),
    "user_id_10_300": ("out_of_range", lambda n, now: _json(n, user_id=10**300 + n)),
    "user_id_129_chars": ("out_of_range", lambda n, now: _json(n, user_id=f"{n}-" + "u" * 128)),
    "event_type_33_chars": ("out_of_range", lambda n, now: _json(n, event_type="v" * 33)),
    "weight_negative": ("out_of_range", lambda n, now: _json(n, weight=-1.0 - n)),
    "weight_infinite": ("out_of_range", lambda n, now: _json(n, weight=float("inf"))),
    "timestamp_1970": ("bad_timestamp", lambda n, now: _json(n, timestamp=n)),
    "timestamp_milliseconds": ("bad_timestamp", lambda n, now: _json(n, timestamp=int(now) * 1000)),
    "timestamp_next_year": ("bad_timestamp", lambda n, now: _json(n, timestamp=int(now) + 365 * 86_400)),
    "timestamp_nan": ("bad_timestamp", lambda n, now: _json(n, timestamp=float("nan"))),
}


def malformed(count: int, now: float) -> list[tuple[str, bytes]]:
    """`count` malformed messages, (kind, bytes), the kinds round robin."""
    names = list(KINDS)
    return [(names[i % len(names)], KINDS[names[i % len(names)]][1](i, now)) for i in range(count)]


def adversarial(count: int, now: float) -> list[dict]:
    """`count` valid events at the edges of what the worker accepts (module doc)."""
    edges: list[Callable[[int], dict]] = [
        lambda n: {"user_id": INT64_MAX - n, "item_id": INT64_MAX - n},
        lambda n: {"user_id": 10**18 + n, "item_id": 2**62 + n},
        lambda n: {"user_id": f"{n:04d}" + "ü" * 124, "item_id": f"sku-{n:04d}-" + "x" * 247},
        lambda n: {"user_id": f"user-{n}-\u4e2d\u6587-\U0001f600", "item_id": f"\u5546\u54c1-{n}"},
        lambda n: {"item_id": "07"},
        lambda n: {"timestamp": now + 86_000},  # the worker accepts up to a day ahead of its clock
        lambda n: {"timestamp": now + 80_000.123456},
        lambda n: {"weight": 0},
        lambda n: {"weight": 1e6, "event_type": "v" * 32},
        lambda n: {"ignored": "p" * 15_000},  # under the 16 KiB limit, an unknown field is ignored
    ]
    return [_event(n, event_id=f"edge-{n}", **edges[n % len(edges)](n)) for n in range(count)]


def fresh_users(stream, prefix: str):
    """The stream's feedback with user and event ids prefixed: the same workload as new users (histories start
    empty), so that two phases given the same stream and different prefixes cost the same but for the model's
    and the worker's state."""
    for e in feedback_events(stream, prefix):
        yield {**e, "user_id": f"{prefix}{e['user_id']}"}


def heavy_user(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"event_id": f"heavy-{n}", "user_id": HEAVY_USER, "item_id": rng.randint(1, 3000),
             "timestamp": 1_700_000_000 + n, "event_type": "view"} for n in range(count)]


class Watch(threading.Thread):
    """Samples the worker every second: alive, /livez, RSS."""

    def __init__(self, w: WorkerProcess):
        super().__init__(daemon=True)
        self.w, self.stop = w, threading.Event()
        self.samples: list[dict] = []

    def run(self) -> None:
        t0 = time.time()
        while not self.stop.wait(1.0):
            alive = self.w.process.poll() is None
            self.samples.append({"t": round(time.time() - t0, 1), "alive": alive, "livez": self.w.alive(),
                                 "rss_mb": self.w.rss_mb()})

    def crashes(self) -> dict:
        return {"exited": sum(1 for s in self.samples if not s["alive"]) > 0,
                "livez_not_200": sum(1 for s in self.samples if s["alive"] and not s["livez"])}


def trained_offsets(w: WorkerProcess, topic: str) -> dict[int, int]:
    status, health = get_json(w.port, "/health")
    return feedback_offsets(health.get("watermark", {}), topic) if status in (200, 503) else {}


def drain(ctx: Context, d: Deployment, w: WorkerProcess, name: str, messages: list[Message]) -> dict:
    """Produce `messages` as a backlog and sample the worker until it has trained past every valid one: the phase's
    steps/s (steady between 10% and 90% of its offsets trained, and the learner's own from the step histogram)."""
    topic = d.topics["feedback"]
    base = trained_offsets(w, topic)
    before = {m: w.metric(m) for m in ("sparc_train_steps_total", "sparc_train_step_seconds_sum",
                                       "sparc_train_step_seconds_count")}
    cpu_before = proc_cpu(w.process.pid).get("busiest_other_thread")  # the learner thread (worker_bench.proc_cpu)
    producer = send_all(ctx.bootstrap, topic, iter(messages))
    end: dict[int, int] = {}  # partition -> past the last VALID message (the watermark covers learnt ones only)
    for ident, partition, offset, _ in producer.acked:
        if not ident.startswith(MALFORMED_PREFIX):
            end[partition] = max(end.get(partition, 0), offset + 1)
    total = sum(end[p] - base.get(p, 0) for p in end)
    timeline: list[tuple[float, int, float]] = []  # (t, events of the phase trained, steps)
    started = time.time()

    def done() -> bool:
        now = trained_offsets(w, topic)
        trained = sum(min(now.get(p, 0), end[p]) - base.get(p, 0) for p in end)
        timeline.append((time.time() - started, trained, w.metric("sparc_train_steps_total")))
        return trained >= total

    finished = poll_until(done, ctx.bound(900), lambda: w.process.poll() is None, every=0.5)
    after = {m: w.metric(m) for m in before}
    cpu_after = proc_cpu(w.process.pid).get("busiest_other_thread")
    count = after["sparc_train_step_seconds_count"] - before["sparc_train_step_seconds_count"]
    mean_step = (after["sparc_train_step_seconds_sum"] - before["sparc_train_step_seconds_sum"]) / count \
        if count else None
    lo = next((r for r in timeline if r[1] >= 0.1 * total), None)
    hi = next((r for r in timeline if r[1] >= 0.9 * total), None)
    steady = (hi[2] - lo[2]) / (hi[0] - lo[0]) if lo and hi and hi[0] > lo[0] else None
    steps = after["sparc_train_steps_total"] - before["sparc_train_steps_total"]
    cpu = cpu_after - cpu_before if cpu_after is not None and cpu_before is not None else None
    out = {"messages": len(messages), "offsets": total, "drained": finished is not None,
           "seconds": round(time.time() - started, 1), "steps": steps, "steps_per_s_steady": steady,
           "steps_per_learner_cpu_s": steps / cpu if cpu else None,
           "learner_steps_per_s": 1 / mean_step if mean_step else None, "mean_step_ms": 1000 * mean_step
           if mean_step else None, "rss_mb": w.rss_mb()}
    ctx.say(f"{name}: {len(messages)} messages drained in {out['seconds']} s, {out['steps']:.0f} steps, "
            f"steady {steady or 0:.1f} steps/s, learner {out['learner_steps_per_s'] or 0:.1f} steps/s "
            f"({out['steps_per_learner_cpu_s'] or 0:.1f} per CPU-s), "
            f"RSS {out['rss_mb'] or 0:.0f} MB")
    return out


def dead_letters(records, sent: list[tuple[str, bytes]]) -> dict:
    """Match dead letters to the malformed messages sent by their bytes: per kind the count sent, dead-lettered
    with the original bytes, with a reason header, and the reasons given."""
    kind_of = {raw: kind for kind, raw in sent}
    per: dict[str, dict] = {kind: {"sent": 0, "dead_lettered": 0, "with_reason": 0, "reasons": Counter()}
                            for kind in KINDS}
    for kind, _ in sent:
        per[kind]["sent"] += 1
    wanted = Counter(raw for _, raw in sent)
    unmatched = 0
    for rec in records:
        if wanted[rec.value] <= 0:
            unmatched += 1
            continue
        wanted[rec.value] -= 1
        row = per[kind_of[rec.value]]
        row["dead_lettered"] += 1
        reason = dict(rec.headers or []).get("reason")
        if reason:
            row["with_reason"] += 1
            row["reasons"][reason.decode()] += 1
    for kind, row in per.items():
        row["reasons"] = dict(row["reasons"])
        row["expected_reason"] = KINDS[kind][0]
    sent_n = len(sent)
    return {"kinds": len({k for k, _ in sent}), "sent": sent_n,
            "dead_lettered": sum(r["dead_lettered"] for r in per.values()),
            "with_reason_and_bytes": sum(r["with_reason"] for r in per.values()),
            "share_dead_lettered": sum(r["with_reason"] for r in per.values()) / sent_n if sent_n else None,
            "reason_as_expected": sum(r["reasons"].get(r["expected_reason"], 0) for r in per.values()),
            "other_dead_letters": unmatched, "per_kind": per}


def run(ctx: Context) -> dict:
    o = ctx.options
    now = time.time()
    d = Deployment(ctx.bootstrap, ctx.workdir, "faults-malformed", settings=WORKER_SETTINGS)
    d.create_topics()
    stream = synthetic(o.seed, o.phase_events, users=min(2000, o.phase_events // 5))
    send_all(ctx.bootstrap, d.topics["item"], catalogue_messages(stream))
    bad = malformed(o.malformed, now)
    edges = adversarial(ADVERSARIAL, now)
    hostile: list[Message] = [(f"{MALFORMED_PREFIX}{i}", None, raw) for i, (_, raw) in enumerate(bad)]
    hostile += list(json_messages(edges))
    random.Random(o.seed).shuffle(hostile)
    hostile += list(json_messages(heavy_user(o.heavy_user_events, o.seed)))
    w = d.worker()
    watch = Watch(w)
    dlq = Reader(ctx.bootstrap, d.topics["dlq"])
    ctx.record(malformed=len(bad), kinds=len(KINDS), adversarial=len(edges), heavy_user_events=o.heavy_user_events)
    try:
        w.start()
        watch.start()
        poll_until(lambda: w.metric("sparc_item_events_total") >= 3000, ctx.bound(120), lambda: True)
        ctx.record(rss_start_mb=w.rss_mb())
        phases: dict[str, dict] = {}
        for name, prefix in (("control", "a-"), ("before", "b-"), ("hostile", None), ("after", "c-")):
            messages = hostile if prefix is None else list(json_messages(fresh_users(stream, prefix)))
            phases[name] = drain(ctx, d, w, name, messages)
            ctx.record(phases=phases)
        poll_until(lambda: len(dlq.poll()) >= len(bad), ctx.bound(120), lambda: True)
        letters = dead_letters(dlq.drain(ctx.bound(60)), bad)
        edge_bytes = {raw for _, _, raw in json_messages(edges)}
        learnt = set(d.learnt(d.latest_train_position(w.port)))
        status, heavy = get_json(w.port, f"/retrieve/{HEAVY_USER}?k=10")
        def change(key: str, a: str = "before", c: str = "after") -> float | None:
            x, y = phases[a].get(key), phases[c].get(key)
            return y / x - 1 if x and y else None

        changes = {key: change(key) for key in KEYS}
        watch.stop.set()
        watch.join()
        rss = [s["rss_mb"] for s in watch.samples if s["rss_mb"]]
        ctx.record(
            dead_letters=letters,
            adversarial_dead_lettered=sum(1 for r in dlq.records if r.value in edge_bytes),
            adversarial_learnt=sum(1 for e in edges if e["event_id"] in learnt),
            heavy_user_history_length=heavy.get("history_length") if status == 200 else None,
            steps_per_s_change=change("steps_per_s_steady"), learner_steps_per_s_change=change("learner_steps_per_s"),
            control_steps_per_s_change=change("steps_per_s_steady", "control", "before"),
            control_learner_steps_per_s_change=change("learner_steps_per_s", "control", "before"),
            cpu_steps_change=change("steps_per_learner_cpu_s"),
            control_cpu_steps_change=change("steps_per_learner_cpu_s", "control", "before"),
            within_20_percent={key: x is not None and abs(x) <= 0.2 for key, x in changes.items()},
            rss_end_mb=w.rss_mb(), rss_peak_mb=max(rss, default=None), **watch.crashes(),
            rss_series=[{"t": s["t"], "rss_mb": s["rss_mb"]} for s in watch.samples[::5]],
        )
        ctx.record(final_exit=w.terminate())
    finally:
        watch.stop.set()
        dlq.close()
        w.stop_quietly()
        d.delete_topics()
    return ctx.figures
