"""A soak at a steady rate: the worker's RSS at the start and the end, and the p99 freshness per window (5 min).

A Deployment of its own with the worker's defaults (a snapshot every 2 s), feedback at --soak-rate events/s for
--soak-minutes. RSS (VmRSS) of the worker every 10 s. At the end, every update on codebook-updates is read with the
Kafka time of its completing record; an event's freshness is the time from its production (what Kafka acknowledged)
to the announcement of the first version that has learnt it (benchmarks.worker_bench.freshness). Per window of
WINDOW_S (shorter soaks: a quarter of the soak), over the events produced in it: p50, p99 and the events no version
covered. "sustained": the rate the producer met and the events the worker had trained on by the end.
"""

from __future__ import annotations

import time

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.harness import (
    Deployment,
    PacedProducer,
    catalogue_messages,
    feedback_events,
    json_messages,
    poll_until,
    send_all,
    synthetic,
)
from benchmarks.worker_bench import Produced, freshness, read_updates

WINDOW_S = 300.0


def run(ctx: Context) -> dict:
    o = ctx.options
    seconds = o.soak_minutes * 60
    window = WINDOW_S if seconds >= 2 * WINDOW_S else seconds / 4
    stream = synthetic(o.seed, int(o.soak_rate * seconds) + 1000)
    d = Deployment(ctx.bootstrap, ctx.workdir, "faults-soak", settings=WORKER_SETTINGS)
    d.create_topics()
    send_all(ctx.bootstrap, d.topics["item"], catalogue_messages(stream))
    producer = PacedProducer(ctx.bootstrap, d.topics["feedback"], json_messages(feedback_events(stream)),
                             o.soak_rate)
    w = d.worker()
    alive = lambda: w.process.poll() is None  # noqa: E731
    rss: list[dict] = []
    ctx.record(rate=o.soak_rate, minutes=o.soak_minutes, window_s=window)
    try:
        w.start()
        poll_until(lambda: w.metric("sparc_item_events_total") >= 1, ctx.bound(60), alive)
        producer.start()
        started = time.time()
        while time.time() < started + seconds and alive() and ctx.left() > 90:
            rss.append({"t": round(time.time() - started), "rss_mb": w.rss_mb()})
            ctx.record(rss_series=rss)
            time.sleep(min(10.0, max(0.0, started + seconds - time.time())))
        ended = time.time()
        rss.append({"t": round(ended - started), "rss_mb": w.rss_mb()})
        producer.finish()
        trained = w.metric("sparc_train_examples_total")
        time.sleep(ctx.bound(10))  # the last versions announced
        announced = read_updates(ctx.bootstrap, d.topics["updates"], d.topics["feedback"])
        acked = producer.acked
        windows = []
        for n in range(int((ended - started) // window) or 1):
            lo, hi = started + n * window, started + (n + 1) * window
            part = Produced.from_records((p, off, at) for _, p, off, at in acked if lo <= at < hi)
            if not part.total:
                continue
            f = freshness(announced, part)
            windows.append({"window": n, "from_s": round(lo - started), "to_s": round(hi - started),
                            "events": part.total, "p50_s": f["per_event_s"]["p50"], "p99_s": f["per_event_s"]["p99"],
                            "not_covered": f["events_not_covered"]})
        ctx.record(
            rss_start_mb=rss[0]["rss_mb"] if rss else None, rss_end_mb=rss[-1]["rss_mb"] if rss else None,
            rss_peak_mb=max((r["rss_mb"] or 0 for r in rss), default=None), rss_series=rss, windows=windows,
            events_produced=len(acked), achieved_rate=round(len(acked) / (ended - started), 1),
            examples_trained=trained, versions_announced=len(announced),
            p99_freshness_s=[w_["p99_s"] for w_ in windows], seconds=round(ended - started),
            worker_alive=alive(), final_exit=w.terminate(),
        )
    finally:
        producer.finish(30)
        w.stop_quietly()
        d.delete_topics()
    return ctx.figures
