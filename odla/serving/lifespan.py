"""Background loops owned by an app's lifespan; the process around an app: its socket, its garbage collector."""

import asyncio
import inspect
import contextlib
import gc
import logging
import socket
import sys
from typing import Any, AsyncIterator, Coroutine, Optional

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


@contextlib.asynccontextmanager
async def background(loop: Coroutine, name: str) -> AsyncIterator[asyncio.Task]:
    """Run ``loop`` as a task for the duration of the block; cancel it and wait for it after."""
    task = asyncio.create_task(loop, name=name)
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def tune_gc() -> None:
    """Collect cyclic garbage less often: a relay allocates many short-lived objects per token,
    and with 1,000 open streams Python's default thresholds (700, 10, 10) ran a young collection
    every few milliseconds, each scanning every stream's objects. Measured with 1,000 open
    streams (bench/, open-1000): GC took 0.35 s of the operator's CPU and 0.61 s of the node's
    for 10,000 tokens; with these thresholds 0.06 s and 0.10 s. Objects without cycles are
    still freed at once by reference counting; only cycles wait a little longer."""
    gc.set_threshold(20_000, 50, 100)


def freeze_gc() -> None:
    """Move everything alive now (modules, the app, its routes) out of the collector's sight:
    the full collections that 1,000 open streams still cause then scan only what the
    streams made, not the whole program (measured: 7% of the operator's CPU before)."""
    gc.collect()
    gc.freeze()


class CalmWebSockets(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, with pongs that wait for a peer that reads. uvicorn writes each
    pong at once, however much its write buffer already holds, so a peer that sends pings and never
    reads would pile them up in the operator's memory (about a megabyte per megabyte of pings).
    Here a ping read while the buffer is over its high-water mark stops reading, and reading starts
    again when the buffer drains (unless the app's own back-pressure holds it)."""

    def handle_ping(self) -> None:
        super().handle_ping()
        if not self.writable.is_set():
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        if not self.read_paused:
            self.transport.resume_reading()


class TimelyHttp(HttpToolsProtocol):
    """uvicorn's HTTP protocol with the two deadlines it lacks (per connection, a timer each):

    - **a connection that never sends a byte** (half-open, or held to use up the descriptors) is
      closed after ``timeout_keep_alive``, like an idle one: the keep-alive timer runs from the
      moment the connection opens, not only between requests (uvicorn cancels it when data comes);
    - **a request's head must arrive** within ``header_timeout`` of its first byte (the first
      request's: of the connection's opening), and **the whole request**, headers and body, within
      ``request_timeout``: a client that trickles it a byte at a time (slowloris, or a slow body) is
      closed instead of holding a connection and a task.
    """

    request_timeout: float = 30.0  # set per server by serve()
    header_timeout: float = 10.0
    _deadline: Optional[asyncio.TimerHandle] = None
    _head: Optional[asyncio.TimerHandle] = None

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)
        self._head = self.loop.call_later(self.header_timeout, self._too_slow)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)
        if self._head is None:
            self._head = self.loop.call_later(self.header_timeout, self._too_slow)

    def on_headers_complete(self) -> None:
        if self._head is not None:
            self._head.cancel()
            self._head = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._no_deadline()
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:  # the connection is a WebSocket's from here on
        self._no_deadline()
        super().handle_websocket_upgrade()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._no_deadline()
        super().connection_lost(exc)

    def _no_deadline(self) -> None:
        for timer in (self._deadline, self._head):
            if timer is not None:
                timer.cancel()
        self._deadline = self._head = None

    def _too_slow(self) -> None:
        self._no_deadline()
        if not self.transport.is_closing():
            self.transport.close()


def serve(app: Any, host: str, port: int, name: str, request_timeout: float = 30.0, header_timeout: float = 10.0,
          **uvicorn_options: Any) -> None:
    """Bind ``host:port`` first, then start the app on it: a port that is taken ends the process
    with a clear message before the app starts (a node must not register, or deregister a running
    node of the same id, when it cannot even listen), and "listening" is only said once it is true."""
    log = logging.getLogger(f"odla.{name}")
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening before the app starts: a node registers during its start-up, and a job sent
        # to it at once waits in the backlog until it serves, rather than being refused.
        sock.listen(2048)
    except OSError as exc:
        sys.exit(f"{name}: cannot listen on {host}:{port}: {exc.strerror or exc}")
    log.info("%s listening on %s:%d", name, host, port)
    config = uvicorn.Config(_QuietStartup(app), log_level="warning", access_log=False, timeout_graceful_shutdown=5,
                            ws=CalmWebSockets,
                            http=type("TimelyHttp", (TimelyHttp,), {"request_timeout": request_timeout,
                                                                    "header_timeout": header_timeout}),
                            **uvicorn_options)
    server = _Server(config, app)
    app.state.stop = lambda: setattr(server, "should_exit", True)
    logging.getLogger("uvicorn.error").addFilter(_StartupFailedFilter(app))
    freeze_gc()
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's own exit when the start-up failed: the app says why, below
        if server.started:
            raise
    except KeyboardInterrupt:  # uvicorn raises Ctrl-C again once it has stopped cleanly: no traceback
        sys.exit(130)
    if not server.started:  # the app's start-up failed; it says why in app.state.startup_error
        sys.exit(f"{name}: {getattr(app.state, 'startup_error', 'could not start')}")
    if getattr(app.state, "exit_error", None):  # it stopped itself, for a reason it gave
        sys.exit(f"{name}: {app.state.exit_error}")


class _Server(uvicorn.Server):
    """uvicorn's server, which also tells the app as soon as it is asked to stop (``app.state.on_exit``,
    a callable, or an async one): uvicorn waits for open streams to end before the lifespan's shutdown, and an
    app with answers under way ends them itself (each with a last line saying why)."""

    def __init__(self, config: uvicorn.Config, app: Any) -> None:
        super().__init__(config)
        self.app = app
        self.leaving: Optional[asyncio.Future] = None

    def handle_exit(self, sig: int, frame: Any) -> None:
        on_exit = getattr(self.app.state, "on_exit", None)
        if not self.should_exit and on_exit is not None and self.leaving is None:
            loop = asyncio.get_event_loop()
            loop.call_soon_threadsafe(self._leave, on_exit)
        super().handle_exit(sig, frame)

    def _leave(self, on_exit: Any) -> None:
        leaving = on_exit()
        if inspect.isawaitable(leaving):
            self.leaving = asyncio.ensure_future(leaving)
            self.leaving.add_done_callback(_report)


def _report(task: asyncio.Future) -> None:
    if not task.cancelled() and task.exception() is not None:
        logging.getLogger("odla").error("stopping: %s", task.exception(), exc_info=task.exception())


def stop_serving(app: Any, reason: str) -> None:
    """Stop the process serving ``app`` (cleanly, as on SIGTERM), then exit non-zero saying ``reason``.
    A no-op for an app served otherwise (tests serve apps in threads)."""
    app.state.exit_error = reason
    stop = getattr(app.state, "stop", None)
    if stop is not None:
        stop()


class _QuietStartup:
    """An app whose start-up fails for a reason it gives (``app.state.startup_error``: a taken port,
    a node id a live node has, a wrong join token) ends with that one line, not a traceback:
    Starlette reports a failed lifespan with the whole traceback, which uvicorn logs."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def told(message: dict) -> None:
            if message["type"] == "lifespan.startup.failed" and getattr(self.app.state, "startup_error", None):
                message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, told)


class _StartupFailedFilter(logging.Filter):
    """uvicorn's "Application startup failed. Exiting." once the app has said why, in one line."""

    def __init__(self, app: Any) -> None:
        super().__init__()
        self.app = app

    def filter(self, record: logging.LogRecord) -> bool:
        return not (getattr(self.app.state, "startup_error", None) and "startup failed" in record.getMessage())
