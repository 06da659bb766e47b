"""The operator's Ollama and OpenAI doors: clients of either API point at the operator unchanged.

Requests that name a model are routed like ``/inference`` (failover before the first
byte, cancellation when the client leaves at any moment) to a node's ``/ollama/...``
relay, which passes them to that node's Ollama; the answer comes back byte for byte,
status and errors included. Listings (``/api/tags``, ``/api/ps``, ``/v1/models``) merge
what every healthy node's Ollama lists. Errors the operator makes itself take the door's
shape: Ollama's ``{"error": "..."}`` or OpenAI's ``{"error": {"message", "type", ...}}``
(``odla.core.errors.shape_for``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Optional, Sequence

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from odla.core.errors import NoNodeError, ODLAError
from odla.serving.errors import shape_for
from odla.core.names import Prompt, Requested, json_object, model_key, requested_in
from odla.operator.nodes import NodeUnreachable
from odla.operator.registry import Node, Registry
from odla.serving.jobs import JOB_PATHS, Job
from odla.operator.audits import seeded
from odla.operator.relay import Router
from odla.operator.models import NODES_HEADER, REPLICAS_HEADER, Pull, Signer, fan_out, named_of, targets, wanted_of
from odla.proofs.reports import signed_request
from odla.operator.resume import Plan, Resumed
from odla.core.protocol import JOB_HEADER
from odla.serving.responses import LineStream, Opened, Tell

log = logging.getLogger("odla.operator")

ROUTED = tuple(sorted(JOB_PATHS - {"/inference"}))
ASKED = ("/api/show",)
"Requests that name a model but run nothing: to a node that has it, without a slot (not jobs)."
LISTINGS = {"/api/tags": "models", "/api/ps": "models", "/v1/models": "data"}
UNMANAGED = {"/api/push": "push", "/api/create": "create"}
"Ollama's model management that stays on each node's machine (answered 501)."


def doors_router(registry: Registry, auth: Sequence[Any], job_auth: Sequence[Any], admin_auth: Sequence[Any] = (),
                 default_replicas: int = 1) -> APIRouter:
    """The doors' routes; ``auth`` (the operator's client auth) guards all but ``/`` and
    ``/api/version``, which Ollama clients ask first, before any credentials; ``job_auth``
    also opens a job's record, for the routes that run a model; ``admin_auth`` guards the routes
    that change the nodes' models (``odla.operator.models``)."""
    api = APIRouter(tags=["Ollama and OpenAI doors"])
    ask = AskAll(registry)

    @api.api_route("/", methods=["GET", "HEAD"], response_class=PlainTextResponse, include_in_schema=False)
    async def root() -> str:
        return "Ollama is running"

    async def routed(request: Request) -> LineStream:
        """A request naming a model: to a node that has it, the answer back as Ollama gave it."""
        body = await request.body()
        data = _object(body)  # parsed once, for its model and limit and for how it would be resumed
        model, limit, prompt = _requested(data)
        router: Router = request.app.state.router
        plan = router.plan(request.url.path, data, request.headers)
        if plan is not None:  # seeded, streamed from its node: odla.operator.resume
            body = plan.body()
        elif router.audit_seed:  # so that an audit can match (odla.operator.audits)
            body = seeded(request.url.path, body)
        path, job = request.url.path, request.state.job
        job.model = model_key(model)  # one name per model in receipts and metrics, however it was spelled
        # queued silently: an Ollama or OpenAI client breaks on lines its API does not have
        return LineStream(opening=lambda tell: _open(router, model, path, body, job, limit, prompt, plan), shape=shape_for(path),
                          headers={JOB_HEADER: job.id}, job=job)

    for path in ROUTED:
        api.add_api_route(path, routed, methods=["POST"], response_class=LineStream, dependencies=job_auth)

    async def asked(request: Request) -> LineStream:
        """A question about a model (``/api/show``): any node that has it answers, no slot taken."""
        body = await request.body()
        model = _requested(_object(body)).model
        router: Router = request.app.state.router
        path = request.url.path

        async def opening(tell: Tell) -> Opened:
            try:
                return await router.ask(model, "POST", "/ollama" + path, body)
            except NoNodeError:
                raise ODLAError(f"model '{model}' not found", 404) from None

        return LineStream(opening=opening, shape=shape_for(path))

    for path in ASKED:
        api.add_api_route(path, asked, methods=["POST"], response_class=LineStream, dependencies=auth)

    async def listing(request: Request) -> JSONResponse:
        """Every healthy node's listing, one entry per model; on ``/api/tags`` with the nodes that have
        it and, when they list it under different digests (builds), each digest's nodes."""
        path = request.url.path
        key, merged = LISTINGS[path], {}
        where: dict[str, dict[str, list[str]]] = {}  # name -> digest -> node ids
        prices = request.app.state.prices if path != "/api/ps" else None  # a model's cost, beside what Ollama says
        for node_id, answer in await ask(request.app.state.router, path):
            entries = answer.get(key)
            if not isinstance(entries, list):  # one node's odd answer must not break everyone's listing
                continue
            for entry in entries:
                name = (entry.get("name") or entry.get("id") or entry.get("model")) if isinstance(entry, dict) else None
                if not isinstance(name, str):
                    continue
                if name not in merged:
                    price = prices.row(name) if prices else None
                    merged[name] = {**entry, "price": price} if price is not None else entry
                where.setdefault(name, {}).setdefault(str(entry.get("digest", "")), []).append(node_id)
        if path == "/api/tags":
            for name, entry in merged.items():
                merged[name] = entry = {**entry, "nodes": sorted(n for ids in where[name].values() for n in ids)}
                if len(where[name]) > 1:  # one name, several builds: jobs never mix them (odla.operator.resume)
                    entry["digests"] = {digest: sorted(ids) for digest, ids in where[name].items()}
        rows = list(merged.values())
        return JSONResponse({"object": "list", "data": rows} if key == "data" else {"models": rows})

    for path in LISTINGS:
        api.add_api_route(path, listing, methods=["GET"], dependencies=auth)

    async def unmanaged(request: Request) -> None:
        """Pushing and creating models stay on each node's machine: a clear 501, not a 404 that would
        look like the wrong address."""
        raise ODLAError(f"the operator does not {UNMANAGED[request.url.path]} models: run 'ollama "
                        f"{UNMANAGED[request.url.path]} ...' on a node's machine", 501)

    for path in UNMANAGED:
        api.add_api_route(path, unmanaged, methods=["POST"], dependencies=auth, include_in_schema=False)

    @api.post("/api/pull", response_class=LineStream, dependencies=admin_auth, summary="Pull a model onto nodes")
    async def pull(request: Request) -> Response:
        """Ollama's pull, onto ``X-ODLA-Replicas`` nodes (``default_replicas``; ``all``) or the ones
        ``X-ODLA-Nodes`` names: Ollama's progress lines, every node's bytes added up."""
        body = _object(await request.body())
        model = _requested(body).model
        router: Router = request.app.state.router
        wanted = wanted_of(request.headers.get(REPLICAS_HEADER), default_replicas)
        nodes, spare, count = targets(registry, model, wanted, named_of(request.headers.get(NODES_HEADER)))
        log.info("pulling %s onto %s", model, ", ".join(n.node_id for n in nodes))
        lines = Pull(router, model, bool(body.get("insecure")), nodes, spare, count, _signer(request)).lines()
        if body.get("stream") is not False:
            return LineStream(lines, headers={"x-odla-nodes": ",".join(n.node_id for n in nodes)})
        last = b""
        async for last in lines:
            pass
        answer = json.loads(last)
        if "error" in answer:
            raise ODLAError(answer["error"], 500)
        return JSONResponse(answer)

    @api.delete("/api/delete", dependencies=admin_auth, summary="Remove a model from nodes")
    async def delete(request: Request) -> PlainTextResponse:
        """Ollama's delete, on every node that has the model (or the ones ``X-ODLA-Nodes`` names)."""
        model = _requested(_object(await request.body())).model
        nodes = _having(registry, model, request)
        if not nodes:
            raise ODLAError(f"model '{model}' not found", 404)
        return _outcome(await fan_out(request.app.state.router, nodes, "DELETE", "/api/delete",
                                      json.dumps({"model": model}).encode(), _signer(request), removed=[model]),
                        "removed from")

    @api.post("/api/copy", dependencies=admin_auth, summary="Copy a model on nodes")
    async def copy(request: Request) -> PlainTextResponse:
        """Ollama's copy, on every node that has the source (or the ones ``X-ODLA-Nodes`` names)."""
        body = _object(await request.body())
        source, destination = body.get("source"), body.get("destination")
        if not isinstance(source, str) or not source or not isinstance(destination, str) or not destination:
            raise ODLAError("source and destination are required", 400)
        nodes = _having(registry, source, request)
        if not nodes:
            raise ODLAError(f"model {json.dumps(source)} not found", 404)
        return _outcome(await fan_out(request.app.state.router, nodes, "POST", "/api/copy",
                                      json.dumps({"source": source, "destination": destination}).encode(),
                                      _signer(request), added=[destination]), "copied on")

    @api.get("/api/version")
    async def version(request: Request) -> dict:
        """The lowest Ollama version among the healthy nodes: what every node can do."""
        answers = await ask(request.app.state.router, "/api/version")
        versions = [a["version"] for _, a in answers if isinstance(a.get("version"), str)]
        if not versions:
            raise ODLAError("no healthy node", 503)
        return {"version": min(versions, key=_version_key)}

    return api


def _object(body: bytes) -> dict:
    """The body as a JSON object (400 like Ollama when it is not one)."""
    try:
        return json_object(body)
    except ValueError as exc:
        raise ODLAError(str(exc), 400) from None


def _signer(request: Request) -> Signer:
    """Signs requests to nodes with this operator's key: a node manages its models only for its operator."""
    identity = request.app.state.countersigner.identity
    return lambda method, path, body: signed_request(identity, method, path, body)


def _having(registry: Registry, model: str, request: Request) -> list[Node]:
    """The healthy nodes that have ``model``, or those ``X-ODLA-Nodes`` names that have it."""
    key, named = model_key(model), set(named_of(request.headers.get(NODES_HEADER)))
    return [n for n in registry.nodes() if n.healthy and key in n.keys and (not named or n.node_id in named)]


def _outcome(answers: dict[str, tuple[int, str]], done: str) -> PlainTextResponse:
    """One answer for a request every node answered: Ollama's empty 200 when all did it."""
    failed = {node_id: a for node_id, a in answers.items() if a[0] != 200}
    if not failed:
        return PlainTextResponse("")
    if len(failed) == len(answers) and len({a for a in failed.values()}) == 1:
        status, message = next(iter(failed.values()))
        raise ODLAError(message, status)
    ok = [node_id for node_id in answers if node_id not in failed]
    reasons = "; ".join(f"{node_id}: {message}" for node_id, (_, message) in failed.items())
    raise ODLAError(f"{done} {', '.join(ok) or 'no node'}; not on {reasons}", 502)


async def _open(router: Router, model: str, path: str, body: bytes, job: Job, limit: Optional[int],
                prompt: Prompt, plan: Optional[Plan] = None) -> Opened:
    try:
        claim, resp = await router.open(model, "POST", "/ollama" + path, body, job, tokens=limit, prompt=prompt)
    except NoNodeError:
        raise ODLAError(f"model '{model}' not found", 404) from None
    media = resp.headers.get("content-type", "application/json")
    headers = {"x-odla-node": claim.node.node_id}
    if plan is not None and resp.status == 200:  # an answer that another node can finish
        answer = Resumed(router, plan, job)
        return Opened(answer.body(claim, resp), 200, media if plan.stream else answer.shape.media_type, headers)
    return Opened(router.relay(claim, resp, protocol=False, job=job), resp.status, media, headers)


class AskAll:
    """Asks every healthy node's Ollama the same question (a listing, the version), at most
    ``AT_ONCE`` nodes at a time; callers asking the same path while the answers are being
    gathered share them, so a burst of cheap client requests is not a burst of node requests
    times the number of nodes."""

    AT_ONCE = 64

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self.pending: dict[str, asyncio.Future] = {}

    async def __call__(self, router: Router, path: str) -> list[tuple[str, dict]]:
        future = self.pending.get(path)
        if future is None:
            future = self.pending[path] = asyncio.ensure_future(self._gather(router, path))
            future.add_done_callback(lambda _: self.pending.pop(path, None))
        return await asyncio.shield(future)

    async def _gather(self, router: Router, path: str) -> list[tuple[str, dict]]:
        """(node id, its answer) for every healthy node that gave one."""
        room = asyncio.Semaphore(self.AT_ONCE)

        async def one(node: Node) -> Optional[dict]:
            async with room:
                return await _ask(router, node, path)

        nodes = [n for n in self.registry.nodes() if n.healthy]
        answers = await asyncio.gather(*(one(n) for n in nodes))
        return [(n.node_id, a) for n, a in zip(nodes, answers) if isinstance(a, dict)]


async def _ask(router: Router, node: Node, path: str) -> Optional[dict]:
    try:
        status, data = await router.nodes.get_json(node, "/ollama" + path)
        return json.loads(data) if status == 200 else None
    except (NodeUnreachable, ValueError) as exc:
        log.info("node %s did not answer %s (%s)", node.node_id, path, exc)
        return None


def _requested(data: dict) -> Requested:
    """The model a request names (400 like Ollama when none), and the most tokens it asks for."""
    try:
        return requested_in(data)
    except ValueError as exc:
        raise ODLAError(str(exc), 400) from None


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("-")[0].split("."))
