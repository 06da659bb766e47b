"""A lean keep-alive HTTP/1.1 client for the hot path, on asyncio protocols and httptools.

httpx parses every chunk of a stream in pure Python (h11) and builds several objects
per request; on the relay's hot path that cost more than everything else together
(bench/). This client does one thing: POST (or GET) to a plain-HTTP upstream and
hand back the body as it arrives, every byte that is already there in one piece.
httptools (llhttp, in C) is the parser uvicorn already uses.

    pool = Pool(connect_timeout=5)
    resp = await pool.request("POST", "http://node:8001/run", body, headers)
    async for data in resp: ...      # raises UpstreamLost if the connection breaks
    await resp.aclose()              # back to the pool when complete, else closed

``Transport`` puts the same client under httpx (and so under the ollama SDK).
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from typing import AsyncIterator, Iterable, Optional
from urllib.parse import urlsplit

import httptools
import httpx

HIGH_WATER = 1 << 20  # stop reading from a fast upstream while this much waits for a slow client


class UpstreamError(Exception):
    """Base: the upstream could not be used."""


class UpstreamConnectError(UpstreamError):
    """No connection could be opened."""


class UpstreamLost(UpstreamError):
    """The connection broke before the response was complete."""


class _Connection(asyncio.Protocol):
    """One connection; parses responses into status, headers and body pieces."""

    def __init__(self, key: tuple[str, int, bool]) -> None:
        self.key = key
        self.transport: Optional[asyncio.Transport] = None
        self.parser = httptools.HttpResponseParser(self)
        self.reused = False
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.lost: Optional[Exception] = None
        self.got_bytes = False
        self.waiter: Optional[asyncio.Future] = None
        self.paused = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self.lost = UpstreamLost(f"bad HTTP from upstream: {exc}")
            self.transport.close()
        self._wake()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if not self.complete:
            self.lost = UpstreamLost("connection closed by upstream")
        self.transport = None
        self._wake()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        self.body.append(body)
        self.buffered += len(body)
        if self.buffered > HIGH_WATER and self.transport and not self.paused:
            self.transport.pause_reading()
            self.paused = True

    def on_message_complete(self) -> None:
        self.complete = True

    # for the response
    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def wait(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    def take(self) -> bytes:
        data = b"".join(self.body) if len(self.body) > 1 else self.body[0]
        self.body.clear()
        self.buffered = 0
        if self.paused and self.transport:
            self.transport.resume_reading()
            self.paused = False
        return data

    @property
    def usable(self) -> bool:
        return self.transport is not None and not self.transport.is_closing() and self.lost is None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class Response:
    """A response whose body streams; iterate it, then ``aclose()``."""

    def __init__(self, pool: "Pool", conn: _Connection) -> None:
        self._pool, self._conn = pool, conn
        self.status_code = conn.status
        self.headers = conn.headers
        self._closed = False

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[bytes]:
        conn = self._conn
        while True:
            if conn.body:
                yield conn.take()
            elif conn.complete:
                return
            elif conn.lost is not None:
                raise conn.lost
            else:
                await conn.wait()

    async def read(self) -> bytes:
        return b"".join([piece async for piece in self])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.complete and conn.keep_alive and conn.usable and not conn.body:
            self._pool._release(conn)
        else:
            conn.close()  # unread or broken: closing it is what tells the upstream we left


class Pool:
    """Idle keep-alive connections per (host, port, tls); no limit on connections in use."""

    def __init__(self, connect_timeout: float = 5.0, max_idle_per_host: int = 512) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle_per_host
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._ssl: Optional[ssl.SSLContext] = None

    async def request(self, method: str, url: str, body: bytes = b"",
                      headers: Iterable[tuple[str, str]] = ()) -> Response:
        """Send a request and wait for the response's status and headers."""
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise UpstreamError(f"not an http(s) URL: {url}")
        tls = parts.scheme == "https"
        key = (parts.hostname or "127.0.0.1", parts.port or (443 if tls else 80), tls)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        head = [f"{method} {target} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers]
        raw = ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body
        for attempt in range(2):
            conn = await self._connection(key)
            conn.transport.write(raw)
            while not conn.headers_done:
                if conn.lost is not None:
                    break
                await conn.wait()
            if conn.headers_done:
                return Response(self, conn)
            conn.close()
            if not (conn.reused and not conn.got_bytes and attempt == 0):
                raise conn.lost  # a fresh connection failed: the upstream is at fault
            # a kept-alive connection the upstream had just closed: one retry on a new one
        raise UpstreamLost("connection closed by upstream")  # not reached

    async def _connection(self, key: tuple[str, int, bool]) -> _Connection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.usable:
                conn._reset()
                conn.parser = httptools.HttpResponseParser(conn)
                conn.reused = True
                return conn
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(lambda: _Connection(key), key[0], key[1],
                                       ssl=self._tls() if key[2] else None), self.connect_timeout)
        except asyncio.TimeoutError as exc:
            raise UpstreamConnectError(f"timed out connecting to {key[0]}:{key[1]}") from exc
        except OSError as exc:
            raise UpstreamConnectError(f"cannot connect to {key[0]}:{key[1]}: {exc.strerror or exc}") from exc
        return conn

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def _release(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


class _Body(httpx.AsyncByteStream):
    def __init__(self, resp: Response, request: httpx.Request) -> None:
        self.resp, self.request = resp, request

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for data in self.resp:
                yield data
        except UpstreamLost as exc:
            raise httpx.RemoteProtocolError(str(exc), request=self.request) from exc

    async def aclose(self) -> None:
        await self.resp.aclose()


class Transport(httpx.AsyncBaseTransport):
    """``Pool`` as an httpx transport, for clients such as the ollama SDK."""

    def __init__(self, connect_timeout: float = 5.0) -> None:
        self.pool = Pool(connect_timeout)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        body = await request.aread()
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in ("host", "content-length")]
        try:
            resp = await self.pool.request(request.method, str(request.url), body, headers)
        except UpstreamConnectError as exc:
            raise httpx.ConnectError(str(exc), request=request) from exc
        except UpstreamError as exc:
            raise httpx.RemoteProtocolError(str(exc), request=request) from exc
        return httpx.Response(resp.status_code, headers=resp.headers, stream=_Body(resp, request),
                              request=request)

    async def aclose(self) -> None:
        await self.pool.aclose()
