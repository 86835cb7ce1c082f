"""NaN injected into the learner (a poisoned batch): published versions with non-finite tensors (must be 0), and
how training recovers.

The worker runs as benchmarks.faults.poisoned_worker (the real `sparc worker` with a hook that only that module
installs; its docstring says how a batch is poisoned). A Deployment of its own with the worker's defaults, a
snapshot every 2 s, feedback at --rate events/s. Once the worker has published a first version, one poisoned
event is sent per kind, in turn:
  nan_gradient  the batch's loss is finite, every gradient NaN (the harder case: a check of the loss alone
                passes it, and the optimiser would write NaN into every weight)
  nan_loss      the batch's loss is NaN
For each: the seconds until the worker refuses the batch (sparc_train_errors_total grows), then until it trains
again (sparc_train_steps_total grows) and serves a version captured after the poison (sparc_snapshot_version
grows). The poisoned batches' events are dead-lettered (reason train_error); every other acknowledged event must be
learnt by the latest version (events_lost, harness.Deployment.audit). At the end every version
announced on codebook-updates is read back from the store and every tensor checked: published_non_finite must
be 0. Stored versions the health gate refused (never served) are checked too, and counted apart.
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.faults.context import WORKER_SETTINGS, Context
from benchmarks.faults.poisoned_worker import NAN_GRADIENT, NAN_LOSS
from benchmarks.harness import (
    Deployment,
    PacedProducer,
    Reader,
    announced,
    catalogue_messages,
    feedback_events,
    json_messages,
    poll_until,
    send_all,
    synthetic,
)

KINDS = {"nan_gradient": NAN_GRADIENT, "nan_loss": NAN_LOSS}


def non_finite(snapshot) -> list[str]:
    """The names of a snapshot's tensors that hold a NaN or an infinity."""
    tensors = {"codebooks": snapshot.codebooks, **{f"weights.{k}": v for k, v in snapshot.weights.items()}}
    return [name for name, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def run(ctx: Context) -> dict:
    from codebook_store import open_store

    o = ctx.options
    stream = synthetic(o.seed, int(o.rate * 600))
    d = Deployment(ctx.bootstrap, ctx.workdir, "faults-nan", settings=WORKER_SETTINGS)
    d.create_topics()
    send_all(ctx.bootstrap, d.topics["item"], catalogue_messages(stream))
    producer = PacedProducer(ctx.bootstrap, d.topics["feedback"], json_messages(feedback_events(stream)), o.rate)
    updates = Reader(ctx.bootstrap, d.topics["updates"])
    w = d.worker(module="benchmarks.faults.poisoned_worker")
    alive = lambda: w.process.poll() is None  # noqa: E731
    injections: dict[str, dict] = {}
    try:
        w.start()
        producer.start()
        first = poll_until(lambda: w.metric("sparc_snapshot_version") >= 0, ctx.bound(240), alive)
        if first is None:
            raise RuntimeError(f"no first version within the bound; worker log: {w.log}")
        time.sleep(ctx.bound(10))
        for n, (kind, prefix) in enumerate(KINDS.items()):
            user = next(e for e in feedback_events(stream)).get("user_id")  # a user with a history by now
            errors, steps, version = (w.metric(m) for m in ("sparc_train_errors_total", "sparc_train_steps_total",
                                                             "sparc_snapshot_version"))
            at = time.time()
            send_all(ctx.bootstrap, d.topics["feedback"], json_messages([{
                "event_id": f"{prefix}{n}", "user_id": user, "item_id": 1, "timestamp": int(at),
                "event_type": "view"}]))
            refused = poll_until(lambda e=errors: w.metric("sparc_train_errors_total") > e, ctx.bound(60), alive)
            base = w.metric("sparc_train_steps_total") if refused else steps
            training = poll_until(lambda b=base: w.metric("sparc_train_steps_total") > b, ctx.bound(90), alive)
            serving = poll_until(lambda v=version, b=base: w.metric("sparc_snapshot_version") > v and
                                 w.metric("sparc_train_steps_total") > b, ctx.bound(90), alive)
            injections[kind] = {
                "refused_after_s": None if refused is None else round(refused - at, 2),
                "training_again_after_s": None if training is None else round(training - at, 2),
                "new_version_served_after_s": None if serving is None else round(serving - at, 2),
                "steps_before": steps, "steps_after": w.metric("sparc_train_steps_total"),
                "train_errors": w.metric("sparc_train_errors_total") - errors,
                "recovered": training is not None and serving is not None,
            }
            ctx.say(f"{kind}: {injections[kind]}")
            ctx.record(injections=injections)
        producer.finish()
        time.sleep(ctx.bound(3))  # the last micro-batch in and out
        reasons, refused = _dead_letters(ctx, d)
        wanted = {ident for ident, *_ in producer.acked} - refused
        d.wait_learnt(wanted, w.port, ctx.bound(ctx.left() - 90), alive)
        audit = d.audit(wanted, w.port)
        versions = sorted({m.version for m in announced(updates.drain(ctx.bound(60)))})
        exit_status = w.terminate()
        checked: dict[str, list[int]] = {"published": [], "refused": []}
        with open_store(d.store_url, read_only=True) as store:
            for v in store.versions():
                bad = non_finite(store.get(v))
                if bad:
                    checked["published" if v in versions else "refused"].append(v)
        ctx.record(
            versions_announced=len(versions), published_non_finite=len(checked["published"]),
            stored_refused_non_finite=len(checked["refused"]), non_finite_versions=checked,
            worker_alive_to_the_end=exit_status == 0, final_exit=exit_status,
            events_lost=audit["lost"], events=audit["events"] + len(refused), dead_lettered_train_error=len(refused),
            dlq_reasons=reasons,
        )
    finally:
        producer.finish(30)
        updates.close()
        w.stop_quietly()
        d.delete_topics()
    return ctx.figures


def _dead_letters(ctx: Context, d: Deployment) -> tuple[dict[str, int], set[str]]:
    """The dead letters' reasons (counts) and the event ids dead-lettered with reason train_error (the events of
    a refused micro-batch: not learnt, not lost)."""
    reader = Reader(ctx.bootstrap, d.topics["dlq"])
    try:
        records = reader.drain(ctx.bound(30))
    finally:
        reader.close()
    reasons: dict[str, int] = {}
    refused: set[str] = set()
    for rec in records:
        reason = dict(rec.headers or []).get("reason", b"?").decode()
        reasons[reason] = reasons.get(reason, 0) + 1
        if reason == "train_error":
            refused.add(json.loads(rec.value)["event_id"])
    return reasons, refused
