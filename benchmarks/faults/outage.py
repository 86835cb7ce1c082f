"""The broker stopped for --outage-seconds (20) mid-stream: lost events, seconds to resume, log lines written.

benchmarks.outage_bench.outage_run on the suite's private broker (its docstring says what is done and counted):
the worker's defaults with a snapshot every 2 s, feedback at --rate events/s, the broker stopped (its data kept)
20 s after the worker's first training step and started again --outage-seconds later; then 60 s of watching
(--quick: shorter).
"""

from __future__ import annotations

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.outage_bench import outage_run


def run(ctx: Context) -> dict:
    o = ctx.options
    figures = outage_run(
        ctx.bootstrap, lambda: ctx.broker.stop(keep_data=True), ctx.broker.start, ctx.workdir,
        rate=o.rate, warmup=min(20.0, o.outage_watch_s), outage=o.outage_s, after=o.outage_watch_s,
        settings=WORKER_SETTINGS,
        catch_up_s=ctx.bound(300), say=ctx.say)
    ctx.record(**figures)
    return ctx.figures
