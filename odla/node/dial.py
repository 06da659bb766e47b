"""Dial-out nodes, the node's side (``link: dial``): one WebSocket to the operator, no port.

The node dials ``ws(s)://<operator>/nodes/link`` with its join token in ``Authorization``,
says ``hello``, and then serves the jobs that come down the link with its own app: each
``run`` frame becomes one in-process call of the node's ASGI app (``/run`` or ``/ollama/...``,
exactly what the operator would have asked over HTTP), and what the app answers goes back
up as ``chunk`` frames, at most ``WINDOW`` ahead of the operator's ``credit``. A ``cancel``,
or the link's loss, cancels the call, which closes its request to Ollama.

The link is redialled with exponential back-off and full jitter, capped at
``heartbeat_interval``: after an operator restart the nodes do not all come back in the same
second, and each is back within about one interval.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import json
import logging
import random
import signal
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import urlsplit, urlunsplit

import anyio
import anyio.abc
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from odla import __version__
from odla.core import protocol as p
from odla.serving.auth import JOIN_HEADER
from odla.core.config import Settings
from odla.serving.lifespan import freeze_gc
from odla.core.protocol import REFUSED, TAKEN, WINDOW
from odla.proofs.reports import signed

log = logging.getLogger("odla.node")
FIRST_DELAY_S = 0.5
REPORT_GAP_S = 0.2


class Refused(Exception):
    """The operator will not take this node as configured (wrong token, id taken): it says why."""


def link_url(operator_url: str) -> str:
    """``http(s)://host[:port][/base]`` -> ``ws(s)://host[:port][/base]/nodes/link``."""
    parts = urlsplit(operator_url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + p.LINK_PATH, "", ""))


def link_mark() -> Path:
    """A file a dial node touches at each status it sends while linked and healthy, and removes when
    not: its Docker health check (it has no port to ask)."""
    return Path(tempfile.gettempdir()) / "odla-node-linked"


def redial_delay(attempt: int, cap: float, rng: Callable[[float, float], float] = random.uniform) -> float:
    """Exponential back-off with full jitter: anywhere in [0, min(cap, 0.5 s x 2^attempt)]."""
    return rng(0.0, min(cap, FIRST_DELAY_S * 2 ** attempt))


class Credit:
    """How many more chunks of one job the node may send before the operator acknowledges them."""

    def __init__(self) -> None:
        self.left = WINDOW
        self.more = asyncio.Event()

    async def take(self) -> None:
        while self.left <= 0:
            self.more.clear()
            await self.more.wait()
        self.left -= 1

    def give(self, n: int) -> None:
        self.left += max(0, n)
        self.more.set()


class Dialer:
    """Keeps the node's link up and serves the jobs on it with ``app`` (the node's own)."""

    def __init__(self, app: Any, node: Any, settings: Settings, operator: Optional[str] = None) -> None:
        self.app, self.node, self.settings = app, node, settings
        self.operator = operator or settings.operator_url
        self.url = link_url(self.operator)
        self.heartbeat = settings.heartbeat_interval
        self.jobs: dict[str, anyio.CancelScope] = {}
        "The jobs running on the link, each in its own scope (a ``cancel`` frame cancels it)."
        self.no_jobs = asyncio.Event()
        self.no_jobs.set()
        self.credits: dict[str, Credit] = {}
        self.group: Optional[anyio.abc.TaskGroup] = None
        "The link's task group while it is up: its status loop and its jobs."
        self.seq = 0
        self.refused: Optional[str] = None
        self.ws: Optional[ClientConnection] = None
        self.operator_address: Optional[str] = None
        "The operator's key (its welcome says it): on its jobs, and whom their receipts go to."
        self.closing = False
        self.linked = False
        self.stopped = asyncio.Event()
        "Set when the operator refused the node: the process ends, saying why (``refused``)."

    async def run(self) -> None:
        """Dial, serve, and dial again, for as long as the node runs."""
        attempt = 0
        headers = {"Authorization": f"Bearer {self.settings.join_token}"} if self.settings.join_token else {}
        while True:
            reason, self.linked = "closed", False
            try:
                async with connect(self.url, additional_headers=headers, open_timeout=self.settings.connect_timeout,
                                   ping_interval=self.heartbeat, ping_timeout=2 * self.heartbeat,
                                   max_size=self.settings.max_body_bytes + 65536, user_agent_header=None) as ws:
                    await self.serve(ws)
            except Refused as exc:
                self.refused = str(exc)
                log.error("the operator at %s refused this node: %s", self.operator, exc)
                self.stopped.set()
                return
            except ConnectionClosed as exc:
                reason = _closed(exc)
            except InvalidStatus as exc:
                if exc.response.status_code == 403:  # refused before the link was accepted: no valid credential
                    self.refused = "missing or wrong join token (the link was refused with HTTP 403)"
                    log.error("the operator at %s refused this node: %s", self.operator, self.refused)
                    self.stopped.set()
                    return
                reason = str(exc)
            except (OSError, asyncio.TimeoutError, InvalidHandshake, InvalidURI) as exc:
                reason = str(exc) or type(exc).__name__
            except Exception as exc:  # noqa: BLE001 - the link must outlive any one failure
                log.exception("the link failed unexpectedly")
                reason = repr(exc)
            if self.closing:
                return
            if self.linked:  # a link that was up starts the back-off over
                attempt = 0
            delay = redial_delay(attempt, self.heartbeat)
            attempt += 1
            log.warning("link to operator at %s lost or refused (%s); redialling in %.2fs",
                        self.operator, reason, delay)
            log.debug("redial delay %.9f s (attempt %d)", delay, attempt)
            await asyncio.sleep(delay)

    async def close(self) -> None:
        """Leave on purpose (shutdown): the jobs on the link end first, each with its last line (the
        node closed its Ollama clients: ``Node.leave``), then a normal close, which the operator takes
        as a deregistration."""
        self.closing = True
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.no_jobs.wait(), 1.0)
        if self.ws is not None:
            with contextlib.suppress(ConnectionClosed, OSError):
                await asyncio.wait_for(self.ws.close(1000, "node shutting down"), 2)

    async def serve(self, ws: ClientConnection) -> None:
        self.ws = ws
        await self.node.refresh()
        hello = self.report(p.LinkHello, t="hello", version=__version__, heartbeat_interval=self.heartbeat,
                            address=self.node.identity.address, signed_at=time.time())
        await ws.send(signed(hello.encode(), self.node.identity).decode())
        try:
            welcome = json.loads(await asyncio.wait_for(ws.recv(), self.settings.connect_timeout
                                                        + self.settings.health_check_timeout))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd else None
            if code in (REFUSED, TAKEN):
                raise Refused(f"{exc.rcvd.reason} (close code {code})") from None
            raise
        if welcome.get("t") != "welcome":
            raise ConnectionClosed(None, None)
        self.operator_address = welcome.get("operator") if isinstance(welcome.get("operator"), str) else None
        if self.operator_address:
            self.node.receipts.known.add(self.operator_address)
        log.info("linked to operator at %s as %s", self.operator, self.node.state.node_id)
        self.node.state.registered_with.add(self.operator)
        self.linked = True
        closed: Optional[ConnectionClosed] = None
        try:  # the link's halves (its frames in, its statuses out) and its jobs: one task group, which ends them all
            async with anyio.create_task_group() as self.group:
                self.group.start_soon(self.statuses, ws)
                try:
                    async for text in ws:
                        try:
                            self.take(ws, json.loads(text))
                        except (ValueError, TypeError, AttributeError) as exc:  # one bad frame is not the link's end
                            log.warning("bad frame from the operator (%s): %.80r", exc, text)
                except ConnectionClosed as exc:
                    closed = exc
                if self.jobs:  # each stops, and its request to Ollama with it
                    log.warning("cancelled %d job(s) with the link", len(self.jobs))
                self.group.cancel_scope.cancel()
        finally:
            self.group = None
            self.node.state.registered_with.discard(self.operator)
            mark(False)
        if closed is not None:
            raise closed

    def report(self, frame: type, **fields: Any) -> str:
        node, cap = self.node, self.node.capacity
        return frame(node_id=node.state.node_id, models=node.state.models, healthy=node.state.healthy,
                     slots=cap.slots, loaded=cap.loaded, tokens_per_s=cap.tokens_per_s, slots_learned=cap.learned,
                     error=node.state.ollama_error, digests=node.state.digests, disk_free=node.state.disk_free,
                     max_models=cap.max_loaded,
                     **fields).model_dump_json(exclude_none=True)

    async def statuses(self, ws: ClientConnection) -> None:
        """A ``status`` every ``heartbeat_interval``, and soon after a job ends (the node's report)."""
        with contextlib.suppress(ConnectionClosed):  # the reader sees the link go
            await self._statuses(ws)

    async def _statuses(self, ws: ClientConnection) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.node.report_soon.wait(), self.heartbeat)
                await asyncio.sleep(REPORT_GAP_S)  # jobs that end together make one status
            self.node.report_soon.clear()
            await self.node.refresh()
            self.seq += 1
            receipts = self.node.receipts.take(self.operator_address)
            try:
                await ws.send(self.report(p.LinkStatus, t="status", seq=self.seq, receipts=receipts))
            except BaseException:
                self.node.receipts.put_back(self.operator_address, receipts)
                raise
            mark(self.node.state.healthy)

    def take(self, ws: ClientConnection, frame: dict) -> None:
        kind, job_id = frame.get("t"), str(frame.get("id", ""))
        assert self.group is not None
        if kind == "run":
            if job_id in self.jobs:  # the running job is left alone
                self.group.start_soon(_say, ws, {"t": "error", "error": f"duplicate job id {job_id}"})
                return
            self.credits[job_id] = Credit()
            scope = self.jobs[job_id] = anyio.CancelScope()
            self.no_jobs.clear()
            self.group.start_soon(self._job, scope, ws, job_id, frame)
        elif kind == "cancel":
            if (scope := self.jobs.get(job_id)) is not None:
                scope.cancel()
        elif kind == "credit":
            if (credit := self.credits.get(job_id)) is not None:
                credit.give(int(frame.get("n", 0)))
        elif kind != "welcome":
            log.warning("unknown frame from the operator: %r", str(kind)[:40])

    async def _job(self, scope: anyio.CancelScope, ws: ClientConnection, job_id: str, frame: dict) -> None:
        try:
            with scope, contextlib.suppress(ConnectionClosed):  # (the link's end is the reader's to see)
                await self.job(ws, job_id, frame)
        finally:
            self.jobs.pop(job_id, None)
            self.credits.pop(job_id, None)
            if not self.jobs:
                self.no_jobs.set()

    async def job(self, ws: ClientConnection, job_id: str, frame: dict) -> None:
        """One ``run``: the node's app called in-process as the operator would call it over HTTP."""
        method = str(frame.get("method", "POST"))
        path, _, query = str(frame.get("path", "/run")).partition("?")
        body = str(frame.get("body", "")).encode("utf-8", "surrogateescape")
        headers = [(b"host", b"localhost"), (b"content-type", b"application/json"),
                   (b"content-length", str(len(body)).encode()), (p.JOB_HEADER.lower().encode(), job_id.encode())]
        if self.settings.join_token:
            headers.append((JOIN_HEADER.encode(), self.settings.join_token.encode()))
        if self.operator_address:
            headers.append((p.OPERATOR_HEADER.encode(), self.operator_address.encode()))
        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": query.encode(),
                 "root_path": "", "headers": headers, "client": ("link", 0), "server": ("localhost", 0)}
        asked = False
        credit = self.credits[job_id]
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        started = ended = False

        async def receive() -> dict:
            nonlocal asked
            if not asked:
                asked = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Future()  # a client leaving arrives as a cancel, which cancels this call
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
                kind = next((v.decode("latin-1") for k, v in message.get("headers", ()) if k == b"content-type"),
                            "application/json")
                await ws.send(json.dumps({"t": "chunk", "id": job_id, "status": message["status"],
                                          "content_type": kind, "data": ""}))
            elif message["type"] == "http.response.body":
                more = message.get("more_body", False)
                text = decoder.decode(message.get("body", b""), final=not more)
                if text:
                    await credit.take()
                    await ws.send(json.dumps({"t": "chunk", "id": job_id, "data": text}))
                if not more:
                    ended = True
                    await ws.send(json.dumps({"t": "end", "id": job_id}))

        try:
            await self.app(scope, receive, send)
        except (ConnectionClosed, asyncio.CancelledError):
            raise
        except Exception as exc:  # noqa: BLE001 - one job's failure is that job's error frame
            log.exception("job %s failed on the link", job_id)
            if not ended:
                with contextlib.suppress(ConnectionClosed):
                    await ws.send(json.dumps({"t": "error", "id": job_id, "error": f"node error: {exc}"[:500]}))
        else:
            if not ended:
                await ws.send(json.dumps({"t": "error", "id": job_id, "error": "the node's answer did not end"}))

async def _say(ws: ClientConnection, frame: dict) -> None:
    with contextlib.suppress(ConnectionClosed):
        await ws.send(json.dumps(frame))


def mark(linked: bool) -> None:
    with contextlib.suppress(OSError):
        link_mark().touch() if linked else link_mark().unlink(missing_ok=True)


def _closed(exc: ConnectionClosed) -> str:
    close = exc.rcvd or exc.sent
    return f"close code {close.code}{': ' + close.reason if close.reason else ''}" if close else "connection lost"


def run_dialled(app: Any) -> Optional[str]:
    """Run the node's app with no server at all: its lifespan (which keeps the link) until
    SIGTERM or SIGINT, or until an operator refuses the node; then why it was refused, if it was."""
    async def main() -> Optional[str]:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with app.router.lifespan_context(app):
            dialers: list[Dialer] = app.state.dialers
            freeze_gc()
            async with anyio.create_task_group() as group:  # until a signal, or a refusal

                async def until(event: asyncio.Event) -> None:
                    await event.wait()
                    group.cancel_scope.cancel()

                for event in (stop, *(d.stopped for d in dialers)):
                    group.start_soon(until, event)
            if stop.is_set():  # Ctrl-C, SIGTERM: the running jobs end now, saying why
                await app.state.node.leave()
            return next((f"{d.operator}: {d.refused}" for d in dialers if d.refused), None)
    return asyncio.run(main())
