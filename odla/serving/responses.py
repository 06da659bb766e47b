"""``LineStream``: the streaming response of every hop (operator and node, every door).

A Starlette ``StreamingResponse`` with three things the relay needs:

- **open, then answer, while listening.** Given ``opening`` (a coroutine function that
  opens the upstream and returns an ``Opened``), the response waits for it before it
  sends anything, so a refusal upstream is still a real status code, and it listens for
  the client leaving the whole time: a client that leaves while Ollama queues the job,
  loads the model or reads the prompt cancels the opening, which closes the upstream
  connection, and so the work at Ollama.
- **batches.** A body that yields a piece per read (the node's answers from Ollama) is read
  by a producer (the task that opened it, going on without a wait) that runs until it
  would wait, while the sender takes everything gathered so far: a burst of tokens costs
  one write, not one per token. What waits for a slow client is bounded
  (``_Buffer.LIMIT``), so a slow client slows its upstream down (TCP back-pressure)
  instead of filling memory. A body that already gathers whatever has
  arrived (``Opened.gathered``: the operator's relay of a node's socket) is batched by
  its source, so one task pumps it, a write per arrival, and waits on each write.
- **always ends properly.** One place maps failures, with a "response already started"
  guard: before the first byte an error is a status with a body in the endpoint's shape;
  after it, a stream (JSON lines or server-sent events) ends with one error line, and a
  single JSON document is cut off (the client sees a broken body, never a clean 200 with
  half a document). The body iterator is always closed.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from dataclasses import dataclass, field
from typing import Any, AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Optional

import anyio
import anyio.abc
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from odla.core.errors import ODLAError
from odla.serving.errors import ODLA, Shape
from odla.serving.jobs import Job
from odla.core.protocol import NDJSON, ErrorLine

log = logging.getLogger("odla")
Tell = Callable[[bytes], None]
"What an opening calls to send a line before its upstream answers."

# The OpenAPI entry of a streaming endpoint: what it answers, and the statuses it can refuse with.
STREAM_RESPONSES: dict = {
    200: {"description": "JSON lines: tokens, then one final line", "content": {NDJSON: {"schema": {"type": "string"}}}},
    **{code: {"model": ErrorLine, "description": text} for code, text in (
        (400, "not JSON"), (401, "missing or wrong credentials"), (404, "no such model"), (413, "too large"),
        (422, "invalid fields"), (502, "upstream failed"), (503, "no upstream could take the job"))},
}


class StreamBroken(Exception):
    """Raised by a body iterator when its upstream broke off; the message is for the caller."""


class Owned:
    """A body that owns what its job holds (a slot, a node's response, Ollama's stream).

    ``aclose()`` frees all of it whether or not iteration began, as httpx's
    ``Response.aclose()`` does: an async generator closed before its first step runs no
    ``finally``, so a client that leaves just as its upstream answers would otherwise leave
    the slot held for good. Iterating it iterates the generator itself (no layer per piece).
    """

    __slots__ = ("body", "closers", "closed")

    def __init__(self, body: AsyncGenerator[bytes, None], *closers: Callable[[], Any]) -> None:
        self.body = body
        self.closers = closers
        "Each called once at ``aclose()``, after the body's own ``finally``; awaited when it returns an awaitable."
        self.closed = False

    def __aiter__(self) -> AsyncGenerator[bytes, None]:
        return self.body

    async def aclose(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            await self.body.aclose()
        finally:
            for close in self.closers:
                try:
                    result = close()
                    if inspect.isawaitable(result):
                        await result
                except Exception:  # noqa: BLE001 - one failing release must not keep the others
                    log.warning("releasing a stream's resource failed", exc_info=True)


@dataclass
class Opened:
    """What an opened upstream answers with."""

    body: AsyncIterator[bytes]
    status_code: int = 200
    media_type: str = NDJSON
    headers: Mapping[str, str] = field(default_factory=dict)
    gathered: bool = False
    "Each piece of ``body`` is everything that had arrived: no batching needed."

    @property
    def is_stream(self) -> bool:
        """Lines (JSON lines or server-sent events), which can end with an error line."""
        return "ndjson" in self.media_type or "event-stream" in self.media_type


class LineStream(StreamingResponse):
    """Streams ``opening()``'s body (or ``content``), batched; errors in ``shape``."""

    media_type = NDJSON  # what the OpenAPI schema shows

    def __init__(self, content: Optional[AsyncIterator[bytes]] = None, *,
                 opening: Optional[Callable[[Tell], Awaitable[Opened]]] = None, shape: Shape = ODLA,
                 status_code: int = 200, headers: Optional[Mapping[str, str]] = None,
                 media_type: str = NDJSON, job: Optional[Job] = None) -> None:
        super().__init__(content if content is not None else _nothing(), status_code, headers, media_type)
        self.base_headers = dict(headers or {})  # kept when the opened upstream adds its own
        self.job = job or Job(door="")  # how it ends is recorded here, and counted when it has a door
        self.opening = opening
        self.shape = shape
        self.is_stream = Opened(self.body_iterator, media_type=media_type).is_stream
        self.tail = b"\n"  # the last bytes sent: an error line must start on a line of its own
        self.started = False
        self.gathered = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The response's halves (listening for the client, opening the upstream, reading its
        # body, sending) run in one task group: whichever ends the response ends them all, and
        # none outlives it. What the job holds is released after the group, shielded, so a
        # client that left cannot cut the release short.
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._listen, receive, group.cancel_scope)
                buf = _Buffer()
                if self.opening is None:
                    group.start_soon(self._produce, buf)
                if self.opening is None or await self._open(group, scope, send, buf):
                    await self._stream(send, buf)
                group.cancel_scope.cancel()  # answered: stop listening
        finally:
            with anyio.CancelScope(shield=True):
                await _close(self.body_iterator)  # closes the upstream stream, and so stops Ollama
            self.job.end("client_cancel")  # a no-op when an earlier step said how it ended

    async def _listen(self, receive: Receive, scope: anyio.CancelScope) -> None:
        """The client left: the whole response ends (its upstream is closed after it)."""
        while (await receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async def _open(self, group: anyio.abc.TaskGroup, scope: Scope, send: Send, buf: "_Buffer") -> bool:
        """Wait for the upstream while listening for the client; False when there is nothing to stream.

        The opening may ``tell`` lines before its upstream answers (a queued job's place);
        the first one starts the response, so an error after it is a last line, not a status.
        A body that is not gathered is then read into ``buf`` by the same task, with no wait in
        between: whatever reads the upstream is waiting on it whenever the loop reads sockets,
        so what arrived before a break is read before the break is (aiohttp hands out nothing
        it had buffered once it has seen the connection break).
        """
        assert self.opening is not None
        opening = self.opening
        told: list[bytes] = []
        ready = asyncio.Event()
        outcome: list[Any] = []  # the Opened, or what the opening raised

        def tell(line: bytes) -> None:
            told.append(line)
            ready.set()

        async def open_upstream() -> None:
            try:
                opened = await opening(tell)
                self.body_iterator = opened.body  # from now on closed whatever happens next
                outcome.append(opened)
            except Exception as exc:  # noqa: BLE001 - every failure is answered
                outcome.append(exc)
                return
            finally:
                ready.set()
            if not opened.gathered:
                await self._produce(buf)

        group.start_soon(open_upstream)
        while not outcome:
            await ready.wait()
            ready.clear()
            if told:
                await self._start(send)
                await self._send(send, b"".join(told))
                told.clear()
        if isinstance(outcome[0], Exception):
            exc = outcome[0]
            if not isinstance(exc, ODLAError):
                log.error("unexpected error opening %s %s", scope.get("method"), scope.get("path"), exc_info=exc)
                exc = ODLAError("internal error", 500)
            self.job.refused(exc)
            await self._error(exc, scope, send)
            return False
        opened = outcome[0]
        self.gathered = opened.gathered
        if self.started:  # what the upstream answers goes on after the lines told so far
            return True
        self.status_code = opened.status_code
        self.media_type, self.is_stream = opened.media_type, opened.is_stream
        self.init_headers({**self.base_headers, **opened.headers})
        return True

    async def _error(self, exc: ODLAError, scope: Scope, send: Send) -> None:
        if not self.started:
            response = self.shape.error(exc)
            response.headers.update(self.base_headers)
            await response(scope, _never, send)
            return
        await self._send(send, self._separator() + self.shape.line(exc.message))
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send: Send, buf: "_Buffer") -> None:
        if self.gathered:  # one task: a write per arrival, and the wait on each write is the back-pressure
            try:
                async for data in self.body_iterator:
                    if data:
                        await self._start(send)
                        await self._send(send, data)
            except Exception as exc:  # noqa: BLE001 - _finish reports it
                await self._finish(exc, send)
                return
            await self._finish(None, send)
            return
        while True:
            await buf.ready.wait()
            buf.ready.clear()
            data = buf.take()
            last = buf.done and not buf.pieces
            if last and buf.failure is None:  # the last data and the end in one write
                await self._start(send)
                await send({"type": "http.response.body", "body": data, "more_body": False})
                self._ended()
                return
            if data:
                await self._start(send)
                await self._send(send, data)
            if last:  # what came during the last send has gone too
                break
        await self._finish(buf.failure, send)

    def _ended(self, error: Optional[str] = None) -> None:
        """The body is done: ok, unless it broke or its last line said the node failed."""
        self.job.end("node_error" if error or self.job.error else "ok", error)

    async def _finish(self, exc: Optional[BaseException], send: Send) -> None:
        """End the response after the body (``exc``: what broke it): cleanly, with an error line, or cut off."""
        if exc is not None:
            broken = isinstance(exc, StreamBroken)
            if broken:
                log.warning("stream broken: %s", exc)
            else:
                log.error("unexpected error in a stream", exc_info=exc)
            message = str(exc) if broken else "internal error"
            self._ended(message)
            if not self.started and not self.is_stream:
                await self._error(ODLAError(message, 502 if broken else 500), {"type": "http"}, send)
                return
            if not self.is_stream:
                return  # cut off: the server closes the connection mid-body, the client sees it broken
            await self._start(send)
            await self._send(send, self._separator() + self.shape.line(message))
        self._ended()
        await self._start(send)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _separator(self) -> bytes:
        end = b"\n\n" if "event-stream" in self.media_type else b"\n"
        missing = len(end) - (len(self.tail) - len(self.tail.rstrip(b"\n")))
        return b"\n" * max(0, missing)

    async def _start(self, send: Send) -> None:
        """Send the status line and headers, once."""
        if not self.started:
            self.started = True
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})

    async def _send(self, send: Send, data: bytes) -> None:
        self.tail = data[-2:]
        await send({"type": "http.response.body", "body": data, "more_body": True})

    async def _produce(self, buf: "_Buffer") -> None:
        try:
            async for data in self.body_iterator:
                await buf.put(data)
        except Exception as exc:  # noqa: BLE001 - the sender reports it, after what came before it
            buf.failure = exc
        except BaseException:  # cancelled with the response: the body did not end, it was cut
            buf.ready.set()
            raise
        buf.done = True
        buf.ready.set()


class _Buffer:
    """What the body produced and the client has not been sent yet, bounded."""

    LIMIT = 64 << 10  # tens of KiB beyond the socket buffers: back-pressure reaches the node, not memory

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()
        self.done = False
        "The body has ended (``failure``: with what it raised)."
        self.failure: Optional[Exception] = None

    async def put(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)
        self.ready.set()
        if self.size > self.LIMIT:
            self.room.clear()
            await self.room.wait()

    def take(self) -> bytes:
        data = b"".join(self.pieces) if len(self.pieces) != 1 else self.pieces[0]
        self.pieces.clear()
        self.size = 0
        self.room.set()
        return data


async def _close(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    try:
        if aclose is not None:
            await aclose()
    except Exception:  # noqa: BLE001 - closing must not turn a finished response into an error
        log.warning("closing a stream's upstream failed", exc_info=True)


async def _never() -> dict:  # an error response reads nothing
    await asyncio.Future()
    return {}


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator
