"""The worker's web endpoints (Faust views on its aiohttp server):

GET /retrieve/{user_id}?k=50&explore=0.0   soft search for the user's current history:
        {"user_id", "items": [...], "scores": [...], "codes", "code_weights", "history_length",
         "version": the snapshot that served it, "snapshot_created_at"}     503 until a snapshot is served
GET /snapshots/latest                      the store's latest manifest (config, health, watermark) + "served"
GET /health                                {"status": "starting" | "ok" | "degraded", ...}: 503 while starting
GET /livez                                 200 while the app runs (503 once it has crashed): the liveness probe
GET /readyz                                200 once the tables are recovered AND a snapshot is served, else 503
                                           (the reasons in the body): the readiness probe
GET /metrics                               Prometheus text format

The payload functions take the worker and plain arguments, so tests call them without a web server.
Retrieval runs in a thread (the event loop keeps consuming); the history is read from this worker's table
(one worker holds every partition; with several, requests would be routed by key: faust's table_route).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

from streams.history import history_of
from streams.index import MAX_POPULAR as MAX_K
from streams.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from streams.worker import StreamWorker



class BadRequest(ValueError):
    pass


def _parse(query: Mapping[str, str]) -> tuple[int, float, int | None, float]:
    """k, explore (sampled codes), exploit and lift (exploration slots: the first `exploit` by probability, the
    rest by p(i | u) / q(i)^lift; no exploit: none)."""
    try:
        k = int(query.get("k", "50"))
        explore = float(query.get("explore", "0.0"))
        exploit = int(query["exploit"]) if "exploit" in query else None
        lift = float(query.get("lift", "1.0"))
    except ValueError:
        raise BadRequest("k and exploit must be integers, explore and lift numbers") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be in [1, {MAX_K}]")
    if not (math.isfinite(explore) and 0.0 <= explore <= 1.0):
        raise BadRequest("explore must be in [0, 1]")
    if not (math.isfinite(lift) and lift >= 0.0):
        raise BadRequest("lift must be >= 0")
    return k, explore, exploit, lift


async def retrieve_payload(w: StreamWorker, user_id: str, query: Mapping[str, str]) -> tuple[int, dict]:
    try:
        k, explore, exploit, lift = _parse(query)
    except BadRequest as exc:
        return 400, {"error": str(exc)}
    index = w.index.current  # one read: this request is served by this index, whatever swaps meanwhile
    if index is None:
        return 503, {"error": "no snapshot is served yet", "last_gate": w.last_gate}
    if exploit is not None and not min(index.top_codes, k) <= exploit <= k:
        return 400, {"error": f"exploit must be in [{min(index.top_codes, k)}, k]: a slot per code searched"}
    history = history_of(w.history_value(user_id))
    rng = np.random.default_rng() if explore > 0 else None
    result = await asyncio.get_running_loop().run_in_executor(
        None, index.retrieve, history, k, explore, rng, exploit, lift
    )
    return 200, {
        "user_id": user_id,
        "items": index.ids_of(result.items),
        "scores": [float(x) for x in result.scores],
        "codes": result.codes.tolist(),
        "code_weights": [float(x) for x in result.weights],
        "explored": result.explored,  # the last `explored` items fill exploration slots
        "history_length": len(history),
        "version": index.version,
        "snapshot_created_at": index.created_at,
    }


async def latest_payload(w: StreamWorker) -> tuple[int, dict]:
    manifest = await w.in_publisher(w.publisher.latest)
    served = w.index.current
    if manifest is None:
        return 404, {
            "error": f"no snapshot of {w.settings.model_name!r} is latest yet",
            "last_gate": w.last_gate,
        }
    keep = ("model", "version", "parent", "created_at", "watermark", "config", "health")
    return 200, {**{k: manifest[k] for k in keep}, "served": None if served is None else served.version}


def health_payload(w: StreamWorker) -> dict:
    served = w.index.current
    status = "starting" if served is None else ("degraded" if w.last_gate else "ok")
    return {
        "status": status,
        "steps": w.learner.steps,
        "items": w.learner.num_items,
        "served_version": None if served is None else served.version,
        "snapshot_age_seconds": None if served is None else w.clock() - served.created_at,
        "last_gate": w.last_gate,
        "watermark": dict(w.watermark),
    }


def health_response(w: StreamWorker) -> tuple[int, dict]:
    body = health_payload(w)
    return (503 if body["status"] == "starting" else 200), body


def liveness(w: StreamWorker) -> tuple[int, dict]:
    """Alive unless the Faust app has crashed (a restart is what helps then)."""
    if w.app.crashed:
        return 503, {"alive": False, "reason": repr(w.app.crash_reason)}
    return 200, {"alive": True}


def readiness(w: StreamWorker) -> tuple[int, dict]:
    """Ready to serve: the history table is recovered (no rebalance under way) and a snapshot is served."""
    recovered, served = w.tables_recovered(), w.index.current
    reasons = ([] if recovered else ["tables are recovering"]) + ([] if served else ["no snapshot is served yet"])
    return (503 if reasons else 200), {
        "ready": not reasons,
        "reasons": reasons,
        "tables_recovered": recovered,
        "serving": served is not None,
        "served_version": None if served is None else served.version,
    }


def register(w: StreamWorker) -> None:
    app = w.app

    @app.page("/retrieve/{user_id}", name="retrieve")
    async def retrieve(self, request, user_id: str):
        started = time.perf_counter()
        status, body = await retrieve_payload(w, user_id, request.query)
        w.metrics.retrieve_seconds.labels(str(status)).observe(time.perf_counter() - started)
        return self.json(body, status=status)

    @app.page("/snapshots/latest", name="snapshots-latest")
    async def snapshots_latest(self, request):
        status, body = await latest_payload(w)
        return self.json(body, status=status)

    @app.page("/health", name="health")
    async def health(self, request):
        status, body = health_response(w)
        return self.json(body, status=status)

    @app.page("/livez", name="livez")
    async def livez(self, request):
        status, body = liveness(w)
        return self.json(body, status=status)

    @app.page("/readyz", name="readyz")
    async def readyz(self, request):
        status, body = readiness(w)
        return self.json(body, status=status)

    @app.page("/metrics", name="metrics")
    async def metrics(self, request):
        return self.bytes(w.metrics.render(), headers={"Content-Type": CONTENT_TYPE})  # carries a charset
