"""The operator's HTTP client to its nodes, on aiohttp: a keep-alive pool, a C parser, timeouts.

    nodes = NodeClient(settings)                      # owned by the operator's lifespan
    resp = await nodes.send(node, "POST", "/run", body)   # once the node's headers are in
    async for data in nodes.body(resp): ...           # the node's bytes as they arrive
    await nodes.aclose()

**Silent or slow?** A node answers ``/run`` only when Ollama has produced its first token,
which can take minutes while Ollama loads a model, and no time limit on that wait can tell
a slow Ollama from a dead node. So the wait has none; instead, a node that has not
answered within ``grace`` (1 s, or ``connect_timeout`` if shorter) is asked ``GET /health``,
with ``health_check_timeout``, and again each ``grace`` while the wait goes on. A node that
answers healthy is waited for as long as Ollama takes; one that does not answer (a stopped
process, a black-holed connection) or answers unhealthy (its Ollama does not answer) loses
the job, which goes to the next node: at most ``connect_timeout + health_check_timeout``
after it was sent. Concurrent waits on one node share one probe. And a node that has not begun
to answer within ``start_timeout`` (300 s, Ollama's own limit on loading a model) loses the job
however healthy it says it is: a node's word is not proof that it works.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Mapping, Optional

import aiohttp

from odla.serving.auth import join_headers, token_for
from odla.serving.upstream import done_with
from odla.core.config import Settings
from odla.core.errors import NodeUnreachable
from odla.operator.link import LinkResponse
from odla.core.protocol import JOB_HEADER, OPERATOR_HEADER, HealthResponse
from odla.operator.registry import Node

log = logging.getLogger("odla.operator")
ClientResponse = aiohttp.ClientResponse
FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)
MAX_ANSWER = 16 << 20
"The largest health answer or listing read from a node (a full one, 4,096 long model names, is under 10 MB)."


class NodeClient:
    """One aiohttp session for every request to every node."""

    def __init__(self, settings: Settings, operator_address: Optional[str] = None) -> None:
        self.operator_address = operator_address
        "This operator's key, on every job it sends: the node makes its receipt out to it."
        self.grace = min(1.0, settings.connect_timeout)
        self.start_timeout = settings.start_timeout
        self.too_late = f"did not begin to answer within {settings.start_timeout:g}s (start_timeout)"
        self.health_timeout = aiohttp.ClientTimeout(total=settings.health_check_timeout,
                                                    sock_connect=settings.connect_timeout)
        # limit=0: no hidden cap on connections; 1,000 open streams are 1,000 connections.
        # keepalive_timeout stays under the node's 75 s, so an idle connection is never
        # reused just as the node closes it (a POST is not retried: it could start a job twice).
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=15),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=settings.connect_timeout),
            auto_decompress=False,
            skip_auto_headers=("User-Agent",))
        self._probes: dict[str, asyncio.Future] = {}
        self.settings = settings

    async def aclose(self) -> None:
        await self.session.close()

    async def send(self, node: Node, method: str, path: str, body: bytes = b"", job_id: str = "",
                   signed: Optional[Mapping[str, str]] = None) -> ClientResponse:
        """Send a request and return the response once its headers are in; see "Silent or slow?".
        A node that dialled in gets it down its link (``odla.operator.link``), watched the same way (its
        health is its link's last status, which says whether its Ollama answers).

        The wait is not a task of its own (a task and a timed wait per request cost more than
        the rest of the operator's work on a short answer): a timer starts a watch only if
        the node is still silent after ``grace``, and the watch cancels the wait if the node
        fails its health check, or is still silent at ``start_timeout`` (checked each ``grace``).
        ``signed``: this operator's signature of the request (``odla.proofs.reports.signed_request``),
        for what a node takes only from its operator; a link is its operator's already.
        """
        watch = _Watch(self, node, asyncio.current_task())
        timer = asyncio.get_running_loop().call_later(self.grace, watch.start)
        try:
            if node.dialled:
                return await _on_link(node, method, path, body, job_id)
            return await self._request(node, method, path, body, job_id, signed)
        except asyncio.CancelledError:
            if not watch.abandoned:
                raise
            uncancel = getattr(asyncio.current_task(), "uncancel", None)  # Python 3.11+
            if uncancel is not None:
                uncancel()
            raise NodeUnreachable(watch.abandoned) from None
        finally:
            timer.cancel()
            watch.stop()

    def _headers(self, node: Node) -> dict[str, str]:
        """The node's credential: its own token (``node_tokens``), else the join token."""
        return join_headers(token_for(self.settings, node.node_id))

    async def _request(self, node: Node, method: str, path: str, body: bytes, job_id: str = "",
                       signed: Optional[Mapping[str, str]] = None) -> ClientResponse:
        headers = {**self._headers(node), **(signed or {})}
        if body:
            headers["Content-Type"] = "application/json"
        if job_id:
            headers[JOB_HEADER] = job_id  # for the node's log line, and its receipt
            if self.operator_address:
                headers[OPERATOR_HEADER] = self.operator_address
        try:
            return await self.session.request(method, f"{node.url}{path}", data=body or None, headers=headers)
        except FAILURES as exc:
            raise NodeUnreachable(describe(exc)) from exc

    @staticmethod
    def body(resp: ClientResponse) -> "Body":
        """The response body as it arrives; see ``Body``."""
        return resp if isinstance(resp, LinkResponse) else Body(resp)

    async def read(self, resp: ClientResponse, limit: int = 1 << 20) -> bytes:
        """A (small) body, for error messages: its first ``limit`` bytes, within
        ``health_check_timeout`` (a node that drips it holds no job); the response is released."""
        if isinstance(resp, LinkResponse):
            return await _link_read(resp, limit, self.health_timeout.total)
        try:
            return (await asyncio.wait_for(_read_upto(resp, limit), self.health_timeout.total))[0]
        except FAILURES as exc:
            raise NodeUnreachable(describe(exc)) from exc
        finally:
            done_with(resp)

    async def get_json(self, node: Node, path: str, limit: int = MAX_ANSWER) -> tuple[int, bytes]:
        """``GET path`` within ``health_check_timeout``: (status, the whole body). Raises
        ``NodeUnreachable``, or ``ValueError`` for a body over ``limit`` bytes (not read further)."""
        if node.dialled:
            resp = await _on_link(node, "GET", path, b"")
            data = await _link_read(resp, limit + 1, self.health_timeout.total)
            if len(data) > limit:
                raise ValueError(f"answer larger than {limit} bytes")
            return resp.status, data
        try:
            async with self.session.get(f"{node.url}{path}", timeout=self.health_timeout,
                                        headers=self._headers(node)) as resp:
                data, more = await _read_upto(resp, limit)
                if more:
                    raise ValueError(f"answer larger than {limit} bytes")
                return resp.status, data
        except FAILURES as exc:
            raise NodeUnreachable(describe(exc)) from exc

    async def health(self, node: Node) -> tuple[int, HealthResponse]:
        """The node's ``/health``; raises ``NodeUnreachable``, or ``ValueError`` for a body that is not one.
        A linked node's health is its link's: open, and what its last status said."""
        if node.dialled:
            if node.link is None or not node.link.alive:
                raise NodeUnreachable("its link is closed")
            return node.link.health()
        status, data = await self.get_json(node, "/health")
        return status, HealthResponse.model_validate_json(data)

    async def is_node(self, node: Node) -> bool:
        """Does a node answer at ``node.url`` under ``node.node_id`` (healthy or not)?"""
        try:
            _, answer = await self.health(node)
        except (NodeUnreachable, ValueError):
            return False
        return answer.node_id == node.node_id

    async def alive(self, node: Node) -> bool:
        """Does the node answer its health check, healthy? One probe at a time per node."""
        probe = self._probes.get(node.node_id)
        if probe is None:
            probe = self._probes[node.node_id] = asyncio.ensure_future(self._probe(node))
            probe.add_done_callback(lambda _: self._probes.pop(node.node_id, None))
        return await asyncio.shield(probe)

    async def _probe(self, node: Node) -> bool:
        try:
            status, answer = await self.health(node)
        except (NodeUnreachable, ValueError) as exc:
            log.warning("node %s is silent and failed a health check (%s)", node.node_id, exc)
            return False
        if status != 200 or answer.status != "healthy":
            log.warning("node %s is silent and unhealthy (%s)", node.node_id, answer.error)
            return False
        return True


async def _on_link(node: Node, method: str, path: str, body: bytes, job_id: str = "") -> LinkResponse:
    link = node.link
    if link is None:
        raise NodeUnreachable("its link is closed")
    return await link.send(method, path, body, job_id)


async def _link_read(resp: LinkResponse, limit: int, timeout: Optional[float]) -> bytes:
    try:
        return await asyncio.wait_for(resp.read(limit), timeout)
    except (NodeUnreachable, asyncio.TimeoutError) as exc:
        await resp.aclose()
        raise NodeUnreachable(describe(exc)) from exc


class Body:
    """A response body as it arrives, every byte already there in one piece.

    Raises ``NodeUnreachable`` when the connection breaks before the body is complete.
    ``aclose()`` before the end closes the connection, which tells the node to stop.
    (An iterator class over ``readany()``, not a generator over ``iter_any()``: one layer
    per piece instead of three, on the relay's path for every token.)
    """

    def __init__(self, resp: ClientResponse) -> None:
        self.resp = resp

    def __aiter__(self) -> "Body":
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self.resp.content.readany()
        except FAILURES as exc:
            done_with(self.resp)
            raise NodeUnreachable(describe(exc)) from exc
        if not data:
            done_with(self.resp)
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        done_with(self.resp)


async def _read_upto(resp: ClientResponse, limit: int) -> tuple[bytes, bool]:
    """The body's first ``limit`` bytes, read as they arrive (aiohttp's ``read(n)`` returns after
    the first piece), and whether there was more."""
    pieces, size = [], 0
    while size <= limit and (data := await resp.content.readany()):
        pieces.append(data)
        size += len(data)
    body = b"".join(pieces)
    return body[:limit], size > limit


class _Watch:
    """Asks a silent node for its health every ``grace``; cancels the wait when it fails."""

    def __init__(self, client: NodeClient, node: Node, waiter: Optional[asyncio.Task]) -> None:
        self.client, self.node, self.waiter = client, node, waiter
        self.abandoned = ""
        "Why the wait was given up ('' while it goes on)."
        self.task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self.task = asyncio.ensure_future(self.run())

    def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()

    async def run(self) -> None:
        """Started ``grace`` after the request was sent: a probe each ``grace`` until the node fails
        one, or ``start_timeout`` has passed since the request."""
        loop, client = asyncio.get_running_loop(), self.client
        too_late = loop.time() - client.grace + client.start_timeout
        while await client.alive(self.node):
            if loop.time() >= too_late:
                self.give_up(client.too_late)
                return
            await asyncio.sleep(max(0.0, min(client.grace, too_late - loop.time())))
        self.give_up("did not answer, and did not pass a health check")

    def give_up(self, reason: str) -> None:
        if self.waiter is not None and not self.abandoned:
            self.abandoned = reason
            self.waiter.cancel()


def describe(exc: BaseException) -> str:
    """A short reason for the logs and for callers, without internals."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"cannot connect: {exc.os_error.strerror or exc.os_error}"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "connection closed"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "connection lost mid-body"
    if isinstance(exc, aiohttp.ClientResponseError):
        return f"bad HTTP ({exc.message})"
    return str(exc) or type(exc).__name__
