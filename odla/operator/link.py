"""Dial-out nodes, the operator's side: a node behind NAT opens one WebSocket to ``/nodes/link``.

The node listens on no port; everything the operator would send to it over HTTP goes down the
link instead, and its answers come back up, many jobs at once. Frames are JSON text, their type
in ``t`` (README, "Dial-out nodes"):

    node -> operator   hello, status (with a seq), chunk {id, data[, status, content_type]}, end {id}, error {id?, error}
    operator -> node   welcome, run {id, method, path, body}, cancel {id}, credit {id, n}

A job's first ``chunk`` carries the status and content type of the node's answer, as the
headers of an HTTP answer would; the relay reads a ``LinkResponse`` as it reads an aiohttp
response (``NodeClient`` picks the one or the other), so routing, failover, health, the doors,
slots, metrics and receipts treat a linked node like any other.

**Back-pressure.** The node sends at most ``WINDOW`` chunks of a job that the operator has not
acknowledged with a ``credit``; the operator grants credit as the relay hands chunks on to the
client. A client that stops reading holds back its own job only, and what waits at the
operator is at most ``WINDOW`` chunks per job.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
from typing import Any, Callable, Optional

import anyio
from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from odla.core import protocol as p
from odla.core.protocol import BAD_FRAME, REFUSED, REPLACED, SILENT, TAKEN, WINDOW
from odla.serving.auth import holds_node_credential, may_join, node_credential
from odla.core.config import Settings
from odla.core.errors import NodeUnreachable, ODLAError
from odla.core.logs import Throttle
from odla.core.names import listed
from odla.operator.registry import LINK_SCHEME, Node, Registry, capacity

log = logging.getLogger("odla.operator")

HELLO_TIMEOUT_S = 10.0
LIVE_LINK_HEARTBEATS = 1.5
"""A link heard from within this many heartbeats is live: a second node dialling in under its id is
refused (4409). One quiet for longer is taken for a link the node lost: the new one replaces it."""


class LinkLost(NodeUnreachable):
    """The link closed, or the node answered a job with an error frame."""


class LinkResponse:
    """One job's answer on a link, read like an aiohttp response: ``status``, ``headers``, and
    its body as an async iterator of bytes (``NodeClient.body`` returns it as it is)."""

    def __init__(self, link: "Link", job_id: str) -> None:
        self.link, self.id = link, job_id
        self.started: asyncio.Future = asyncio.get_running_loop().create_future()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.pieces: collections.deque[bytes] = collections.deque()
        self.arrived = asyncio.Event()
        self.ended = False
        self.error: Optional[str] = None
        self.unacked = 0

    # --- from the link's reader ---

    def chunk(self, frame: dict) -> None:
        if not self.started.done():
            self.status = int(frame.get("status") or 200)
            self.headers = {"content-type": str(frame.get("content_type") or "application/json")}
            self.started.set_result(self)
        data = frame.get("data")
        if data:
            if not isinstance(data, str):
                raise ValueError("a chunk's data is text")
            if len(self.pieces) >= WINDOW:  # beyond its credit: a node that ignores the window
                self.fail("node sent beyond its credit")
                self.link.cancel(self.id)
                return
            self.pieces.append(data.encode())
            self.arrived.set()

    def end(self) -> None:
        self.ended = True
        if not self.started.done():
            self.started.set_exception(LinkLost("node ended the job without an answer"))
        self.arrived.set()

    def fail(self, reason: str) -> None:
        if self.ended or self.error:
            return
        self.error = reason
        if not self.started.done():
            self.started.set_exception(LinkLost(reason))
        self.arrived.set()

    # --- for the relay ---

    def __aiter__(self) -> "LinkResponse":
        return self

    async def __anext__(self) -> bytes:
        while not self.pieces:
            if self.error is not None:
                raise LinkLost(self.error)
            if self.ended:
                self.link.forget(self.id)
                raise StopAsyncIteration
            self.arrived.clear()
            await self.arrived.wait()
        self.unacked += 1
        if self.unacked >= WINDOW // 2:  # credit in batches: one frame per half window
            self.link.post({"t": "credit", "id": self.id, "n": self.unacked})
            self.unacked = 0
        return self.pieces.popleft()

    async def read(self, limit: int) -> bytes:
        """The whole (small) body, for error messages and listings: its first ``limit`` bytes."""
        pieces, size = [], 0
        async for piece in self:
            pieces.append(piece)
            size += len(piece)
            if size > limit:
                break
        await self.aclose()
        return b"".join(pieces)[:limit]

    def close(self) -> None:
        """Cut the job: the node is told to stop, the relay sees the stream broken."""
        self.fail("connection closed")
        self.link.cancel(self.id)

    async def aclose(self) -> None:
        self.link.cancel(self.id)


class Link:
    """One node's WebSocket, as the operator holds it: jobs out, their answers in."""

    def __init__(self, ws: WebSocket, hello: p.LinkHello) -> None:
        self.ws = ws
        self.node_id = hello.node_id
        self.heartbeat = hello.heartbeat_interval
        self.report: p.NodeReport = hello
        self.error = hello.error
        self.seq = -1
        self.jobs: dict[str, LinkResponse] = {}
        self.closed: Optional[str] = None
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.heard = asyncio.get_running_loop().time()
        "When the node last sent a frame (it sends a status every heartbeat)."

    @property
    def alive(self) -> bool:
        return self.closed is None

    def health(self) -> tuple[int, p.HealthResponse]:
        healthy = self.report.healthy
        return (200 if healthy else 503), p.HealthResponse(
            status="healthy" if healthy else "unhealthy", node_id=self.node_id, models=self.report.models,
            error=self.error)

    async def send(self, method: str, path: str, body: bytes, job_id: str = "") -> LinkResponse:
        """Start a job on the node; returns once its answer has begun (the first chunk)."""
        if self.closed:
            raise LinkLost(self.closed)
        job_id = job_id or os.urandom(8).hex()
        if job_id in self.jobs:  # the same job again on this link (a listing asked twice): its own id
            job_id = f"{job_id}.{os.urandom(4).hex()}"
        resp = self.jobs[job_id] = LinkResponse(self, job_id)
        # a client's bytes as they came, even if not UTF-8 (the node encodes them back the same way)
        self.post({"t": "run", "id": job_id, "method": method, "path": path,
                   "body": body.decode("utf-8", "surrogateescape")})
        try:
            return await resp.started
        except BaseException:  # refused before an answer, the link lost, or the client left
            self.cancel(job_id)
            raise

    def post(self, frame: dict) -> None:
        """Queue a frame for the writer (one task writes, in order; no caller waits on the socket)."""
        if self.closed is None:
            self.outbox.put_nowait(json.dumps(frame))

    def cancel(self, job_id: str) -> None:
        """The relay is done with a job: if the node has not ended it, tell it to stop."""
        resp = self.jobs.pop(job_id, None)
        if resp is not None and not resp.ended:
            self.post({"t": "cancel", "id": job_id})

    def forget(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)

    def lost(self, reason: str) -> None:
        """The link is gone: every job on it fails (not started: the relay fails over; under way:
        its stream ends with an error line)."""
        if self.closed is None:
            self.closed = reason
        for resp in list(self.jobs.values()):
            resp.fail(f"link lost ({reason})")
        self.jobs.clear()
        self.outbox.put_nowait(None)

    async def writer(self) -> None:
        try:
            while (text := await self.outbox.get()) is not None:
                await self.ws.send_text(text)
        except (WebSocketDisconnect, RuntimeError, OSError):
            pass  # the reader sees the link go, and cleans up

    def take(self, frame: dict) -> Optional[p.LinkStatus]:
        """A frame from the node; a newer ``status`` is returned for the registry. ValueError
        (or TypeError) for a frame that is not one."""
        if not isinstance(frame, dict):
            raise ValueError("a frame is a JSON object")
        kind = frame.get("t")
        if kind == "chunk" or kind == "end":
            resp = self.jobs.get(str(frame.get("id")))
            if resp is not None:
                resp.chunk(frame) if kind == "chunk" else resp.end()
        elif kind == "error":
            resp = self.jobs.get(str(frame.get("id")))
            if resp is not None:
                resp.fail(str(frame.get("error") or "node error"))
            else:
                log.warning("node %s: %s", self.node_id, str(frame.get("error"))[:200])
        elif kind == "status":
            status = p.LinkStatus.model_validate(frame)
            if status.node_id != self.node_id:
                raise ValueError("a status for another node")
            if status.seq > self.seq:  # an older one that arrives late is dropped
                self.seq, self.report, self.error = status.seq, status, status.error
                return status
        else:
            raise ValueError(f"unknown frame type {kind!r}")
        return None


def link_router(registry: Registry, settings: Settings, on_change: Callable[..., None],
                is_live: Callable[[Node], Any]) -> APIRouter:
    """``/nodes/link``. ``on_change(grown=...)`` hears of capacity that came or went (the scheduler's wake);
    ``is_live(node)`` says whether a node registered over HTTP under the same id still answers."""
    api = APIRouter()
    refusals = Throttle()

    @api.websocket(p.LINK_PATH)
    async def link(ws: WebSocket) -> None:
        peer = f"{ws.client.host}:{ws.client.port}" if ws.client else "?"
        if not holds_node_credential(settings, node_credential(ws.headers)):  # before anything is accepted
            if refusals(ws.client.host if ws.client else "?") is not None:
                log.warning("refused a link from %s: missing or wrong join token", peer)
            await _close(ws, REFUSED, "missing or wrong join token")  # not accepted: an HTTP 403
            return
        await ws.accept()
        try:
            first = await asyncio.wait_for(ws.receive_text(), HELLO_TIMEOUT_S)
            hello = p.LinkHello.model_validate_json(first)
        except (asyncio.TimeoutError, ValidationError, ValueError, KeyError, WebSocketDisconnect) as exc:
            reason = "the first frame must be a hello" if not isinstance(exc, asyncio.TimeoutError) else "no hello"
            await _close(ws, BAD_FRAME, reason)
            return
        if not may_join(settings, hello.node_id, node_credential(ws.headers)):
            if refusals(ws.client.host if ws.client else "?") is not None:  # per address: ids are the caller's to vary
                log.warning("refused the link of node %s from %s: missing or wrong join token", hello.node_id, peer)
            await _close(ws, REFUSED, f"missing or wrong join token for node {hello.node_id}")
            return
        try:
            address = ws.app.state.addresses.admit(hello.node_id, first.encode(), hello)
        except ODLAError as exc:  # one policy with /register: 401 and 409 become the link's refusals
            if refusals(ws.client.host if ws.client else "?") is not None:
                log.warning("refused the link of node %s from %s: %s", hello.node_id, peer, exc.message)
            await _close(ws, TAKEN if exc.status_code == 409 else REFUSED, exc.message)
            return
        known = registry.get(hello.node_id)
        if known is None and len(registry) >= settings.max_nodes:
            await _close(ws, 4503, f"the network is full: {settings.max_nodes} nodes (max_nodes)")
            return
        if known is not None and known.link is None and await is_live(known):
            await _close(ws, TAKEN, f"node id {hello.node_id!r} is taken by a live node at {known.url}")
            return
        loop = asyncio.get_running_loop()
        if known is not None and known.link is not None:
            if loop.time() - known.link.heard <= LIVE_LINK_HEARTBEATS * known.link.heartbeat:
                # its link speaks: a second node with the same id, refused as on HTTP (never a replace loop)
                await _close(ws, TAKEN, f"node id {hello.node_id!r} is taken by a live link from "
                                        f"{known.url.removeprefix(LINK_SCHEME)}: give this node another NODE_ID")
                return
            old = known.link  # a reconnect: the old link went quiet, the new one replaces it
            old.lost("replaced by a new link")
            asyncio.ensure_future(_close(old.ws, REPLACED, "replaced by a new link"))
        this = Link(ws, hello)
        signer = ws.app.state.countersigner
        node = _report(registry, this, hello, peer)
        node.address = address
        ws.app.state.auditor.restore(node)
        signer.take(node, hello.receipts)
        log.info("node %s linked from %s with %s", node.node_id, peer, listed(node.models))
        on_change(grown=True)
        this.post({"t": "welcome", "node_id": node.node_id, "heartbeat_interval": hello.heartbeat_interval,
                   "operator": signer.identity.address})
        reason, code = "closed", 1000

        async def read() -> None:
            nonlocal reason, code
            try:
                while True:  # no timer per frame: ``watch`` looks for silence
                    # ASGI's receive, not receive_text: once a send to a node that closed has failed,
                    # Starlette refuses receive_text, and the frames the node sent before its close
                    # (its jobs' last lines) would never be read
                    message = await ws.receive()
                    if message["type"] == "websocket.disconnect":
                        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
                    status = this.take(json.loads(message.get("text") or message.get("bytes") or b""))
                    this.heard = loop.time()
                    if status is not None:
                        before = capacity(node)
                        _report(registry, this, status, peer)
                        signer.take(node, status.receipts)
                        on_change(grown=bool(capacity(node) - before))
            except WebSocketDisconnect as exc:
                reason, code = f"closed by the node ({exc.code})", exc.code
            except (ValueError, TypeError, AttributeError, ValidationError) as exc:
                reason, code = f"bad frame: {str(exc)[:200]}", BAD_FRAME

        async def watch(scope: anyio.CancelScope) -> None:
            nonlocal reason, code
            while loop.time() - this.heard <= 3 * this.heartbeat:
                await anyio.sleep(this.heartbeat)
            reason, code = f"silent for {3 * this.heartbeat:g}s", SILENT
            scope.cancel()

        try:  # the link's halves in one task group: whichever ends the link ends them all
            async with anyio.create_task_group() as group:
                group.start_soon(this.writer)
                group.start_soon(watch, group.cancel_scope)
                await read()
                group.cancel_scope.cancel()
        finally:
            this.lost(reason)
            if node.link is this:
                node.link = None
                if code == 1000:  # the node left on purpose, as a deregistration
                    registry.remove(node.node_id)
                else:
                    registry.mark_failed(node.node_id)
            if code == 1000:
                log.info("node %s left the network (closed its link)", node.node_id)
            elif code != REPLACED:
                log.warning("link of node %s lost: %s", node.node_id, reason)
            on_change()
        if code in (SILENT, BAD_FRAME):
            await _close(ws, code, reason)

    return api


def _report(registry: Registry, link: Link, report: p.NodeReport, peer: str) -> Node:
    node = registry.take_report(report, f"{LINK_SCHEME}{peer}")
    node.link = link
    return node


async def _close(ws: WebSocket, code: int, reason: str) -> None:
    try:
        await ws.close(code, reason[:120])
    except (RuntimeError, OSError, WebSocketDisconnect):
        pass  # already closed
