"""The web endpoints of every role, as payload functions of a `Node` (what a process runs) and two adapters:
Faust views (`register_faust`: `sparc worker`, `sparc ingest`) and a plain aiohttp app (`aiohttp_app`: `sparc
learn`, `sparc serve`). Which routes a process has depends on its parts:

serving (worker, serve):
GET  /retrieve/{user_id}?k=50&explore=0.0  soft search for the user's current history (the worker's own table,
        or a serve replica's copy of it: streams.serving):
        {"user_id", "items": [...], "scores": [...], "codes", "code_weights", "history_length",
         "version": the snapshot that served it, "snapshot_created_at"}     503 until a snapshot is served
POST /retrieve?k=50&explore=0.0            the same for the recent items in the body, oldest first (no history
        lookup: the stateless contract of a retrieval service): {"items": [id, ...], "user_id": optional}
        Both take exploit=E&lift=L (exploration slots: the first E items are plain soft search's, the others by
        p(i | u) / q(i)^L; "explored" counts them). Without exploit= the settings' apply (exploration, exploit=15,
        lift=0.5 by default: a list of k <= 15 is plain); exploit=k asks for a plain list.
every process:
GET /snapshots/latest                      the store's latest manifest (config, health, watermark) + "served"
GET /health                                {"status": "starting" | "ok" | "degraded" | "fenced", ...}: 503 while
                                           starting
GET /livez                                 200 while the process works (503 once it has crashed or its learner
                                           was fenced): the liveness probe
GET /readyz                                200 once every part is ready (the tables recovered, a snapshot served,
                                           a history copy caught up), else 503 with the reasons: the readiness probe
GET /metrics                               Prometheus text format

The payload functions take the node and plain arguments, so tests call them without a web server. Retrieval runs
in a thread (the event loop keeps consuming).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Annotated, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, ValidationError

from streams.index import MAX_POPULAR as MAX_K
from streams.metrics import CONTENT_TYPE, WorkerMetrics
from trainer.config import EXPLORATION, ExplorationConfig
from trainer.vocab import MAX_ID_CHARS, canonical_id

MAX_BODY_BYTES = 65_536  # POST /retrieve
MAX_BODY_ITEMS = 1_000


class Node(Protocol):
    """What the views read of a process (StreamWorker, streams.roles.LearnNode / ServeNode)."""

    metrics: WorkerMetrics
    learning: Any  # streams.learning.Learning | None
    serving: Any  # streams.serving.Serving | None

    settings: Any  # streams.settings.WorkerSettings

    def user_history(self, user_id: str) -> list:
        """The user's items (external ids, oldest first) for GET /retrieve."""

    def latest_manifest(self) -> dict | None:
        """The store's latest manifest as JSON (blocking: called in a thread)."""

    def problems(self) -> list[str]:
        """Why the process is not ready (empty: ready)."""

    def failure(self) -> str | None:
        """Why the process no longer works (a crash, a fenced learner); None while it does."""


class BadRequest(ValueError):
    pass


class RetrieveBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    items: Annotated[list[StrictInt | Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS)]],
                     Field(max_length=MAX_BODY_ITEMS)]
    user_id: StrictStr | StrictInt | None = None


def _parse(query: Mapping[str, str], slots: ExplorationConfig | None) -> tuple[int, float, int | None, float]:
    """k, explore (sampled codes), exploit and lift (exploration slots: the first `exploit` by probability, the
    rest by p(i | u) / q(i)^lift). Without exploit= the settings' `slots` apply (exploration, exploit, lift:
    plain lists when off or k <= their exploit); exploit=k asks for a plain list."""
    default = slots or EXPLORATION
    try:
        k = int(query.get("k", "50"))
        explore = float(query.get("explore", "0.0"))
        exploit = int(query["exploit"]) if "exploit" in query else (slots.slots(k) if slots else None)
        lift = float(query.get("lift", default.lift))
    except ValueError:
        raise BadRequest("k and exploit must be integers, explore and lift numbers") from None
    if not 1 <= k <= MAX_K:
        raise BadRequest(f"k must be in [1, {MAX_K}]")
    if not (math.isfinite(explore) and 0.0 <= explore <= 1.0):
        raise BadRequest("explore must be in [0, 1]")
    if not (math.isfinite(lift) and lift >= 0.0):
        raise BadRequest("lift must be >= 0")
    return k, explore, exploit, lift


def parse_body(raw: bytes) -> RetrieveBody:
    """POST /retrieve's body; BadRequest names what is wrong in one line."""
    if len(raw) > MAX_BODY_BYTES:
        raise BadRequest(f"the body has {len(raw)} bytes, the limit is {MAX_BODY_BYTES}")
    try:
        return RetrieveBody.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(p) for p in first["loc"] if not isinstance(p, str) or p in ("items", "user_id"))
        raise BadRequest(f"bad body: {where + ': ' if where else ''}{first['msg']} (expected "
                         '{"items": [item id, ...], "user_id": optional})') from None


async def _answer(node: Node, user_id: str | None, history: list, k: int, explore: float,
                  exploit: int | None = None, lift: float = 1.0) -> tuple[int, dict]:
    index = node.serving.index.current  # one read: this request is served by this index, whatever swaps meanwhile
    if index is None:
        gate = node.learning.last_gate if node.learning is not None else []
        return 503, {"error": "no snapshot is served yet", "last_gate": gate}
    if exploit is not None and not min(index.top_codes, k) <= exploit <= k:
        return 400, {"error": f"exploit must be in [{min(index.top_codes, k)}, k]: a slot per code searched"}
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


async def retrieve_payload(node: Node, user_id: str, query: Mapping[str, str]) -> tuple[int, dict]:
    try:
        k, explore, exploit, lift = _parse(query, node.settings.exploration_config())
    except BadRequest as exc:
        return 400, {"error": str(exc)}
    if node.serving.index.current is None:
        return await _answer(node, user_id, [], k, explore)
    return await _answer(node, user_id, node.user_history(user_id), k, explore, exploit, lift)


async def retrieve_post_payload(node: Node, body: bytes, query: Mapping[str, str]) -> tuple[int, dict]:
    """POST /retrieve: the recent items come in the body (their last max_len are used)."""
    try:
        k, explore, exploit, lift = _parse(query, node.settings.exploration_config())
        parsed = parse_body(body)
    except BadRequest as exc:
        return 400, {"error": str(exc)}
    history = [canonical_id(i) if isinstance(i, str) else i for i in parsed.items][-node.settings.max_len:]
    user = None if parsed.user_id is None else str(parsed.user_id)
    return await _answer(node, user, history, k, explore, exploit, lift)


async def latest_payload(node: Node) -> tuple[int, dict]:
    manifest = await asyncio.get_running_loop().run_in_executor(None, node.latest_manifest)
    served = node.serving.index.current if node.serving is not None else None
    gate = node.learning.last_gate if node.learning is not None else []
    if manifest is None:
        return 404, {"error": f"no snapshot of {node.settings.model_name!r} is latest yet", "last_gate": gate}
    keep = ("model", "version", "parent", "created_at", "watermark", "config", "health")
    return 200, {**{k: manifest[k] for k in keep}, "served": None if served is None else served.version}


def health_payload(node: Node) -> dict:
    body: dict = {}
    if node.learning is not None:
        body.update(node.learning.health_fields())
    if node.serving is not None:
        body.update(node.serving.health_fields())
    starting = node.serving.index.current is None if node.serving is not None else bool(node.problems())
    if node.learning is not None and node.learning.fenced:
        status = "fenced"
    elif starting:
        status = "starting"
    else:
        status = "degraded" if body.get("last_gate") else "ok"
    return {"status": status, **body}


def health_response(node: Node) -> tuple[int, dict]:
    body = health_payload(node)
    return (503 if body["status"] == "starting" else 200), body


def liveness(node: Node) -> tuple[int, dict]:
    """Alive unless the process has crashed or its learner was fenced (a restart is what helps then)."""
    failure = node.failure()
    if failure is not None:
        return 503, {"alive": False, "reason": failure}
    return 200, {"alive": True}


def readiness(node: Node) -> tuple[int, dict]:
    """Ready when the node names no problem (Node.problems); the body says what each part has."""
    reasons = node.problems()
    body: dict = {"ready": not reasons, "reasons": reasons}
    if hasattr(node, "tables_recovered"):
        body["tables_recovered"] = node.tables_recovered()
    if node.serving is not None:
        served = node.serving.index.current
        body.update(serving=served is not None, served_version=None if served is None else served.version)
    return (503 if reasons else 200), body


Handler = Callable[[Any], Awaitable[tuple[int, Any]]]  # request -> (status, JSON body | bytes)


def routes(node: Node) -> list[tuple[str, str, str, Handler]]:
    """(method, path, name, handler) of every endpoint `node` has; a handler takes an aiohttp request."""

    async def retrieve(request):
        started = time.perf_counter()
        status, body = await retrieve_payload(node, request.match_info["user_id"], request.query)
        node.metrics.retrieve_seconds.labels(str(status)).observe(time.perf_counter() - started)
        return status, body

    async def retrieve_post(request):
        started = time.perf_counter()
        status, body = await retrieve_post_payload(node, await request.content.read(MAX_BODY_BYTES + 1),
                                                   request.query)
        node.metrics.retrieve_seconds.labels(str(status)).observe(time.perf_counter() - started)
        return status, body

    async def latest(request):
        return await latest_payload(node)

    async def health(request):
        return health_response(node)

    async def livez(request):
        return liveness(node)

    async def readyz(request):
        return readiness(node)

    async def metrics(request):
        return 200, node.metrics.render()

    out = []
    if node.serving is not None:
        out += [("GET", "/retrieve/{user_id}", "retrieve", retrieve), ("POST", "/retrieve", "retrieve-post",
                                                                        retrieve_post)]
    if node.serving is not None or node.learning is not None:
        out.append(("GET", "/snapshots/latest", "snapshots-latest", latest))
    out += [("GET", "/health", "health", health), ("GET", "/livez", "livez", livez),
            ("GET", "/readyz", "readyz", readyz), ("GET", "/metrics", "metrics", metrics)]
    return out


def _response(status: int, body: Any):
    from aiohttp import web

    if isinstance(body, bytes):  # the metrics: Prometheus text, with its charset
        return web.Response(body=body, status=status, headers={"Content-Type": CONTENT_TYPE})
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def register_faust(app, node: Node) -> None:
    """The node's routes as views of a Faust app (one view per path, a method per HTTP verb)."""
    from faust import web as faust_web

    by_path: dict[str, dict[str, tuple[str, Handler]]] = {}
    for method, path, name, handler in routes(node):
        by_path.setdefault(path, {})[method] = (name, handler)
    for path, methods in by_path.items():
        name = next(iter(methods.values()))[0]
        attrs = {}
        for method, (_, handler) in methods.items():
            async def view(self, request, _handler=handler, **kwargs):
                status, body = await _handler(request)
                if isinstance(body, bytes):
                    return self.bytes(body, status=status, headers={"Content-Type": CONTENT_TYPE})
                return self.json(body, status=status)

            attrs[method.lower()] = view
        app.page(path, name=name)(type(f"{name.title().replace('-', '')}View", (faust_web.View,), attrs))


def aiohttp_app(node: Node):
    """The node's routes as an aiohttp application (the roles without Faust)."""
    from aiohttp import web

    application = web.Application(client_max_size=MAX_BODY_BYTES + 1)
    for method, path, _, handler in routes(node):
        async def view(request, _handler=handler):
            return _response(*await _handler(request))

        application.router.add_route(method, path, view)
    return application
