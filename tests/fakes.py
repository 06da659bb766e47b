"""A fake node agent, served over real sockets, whose every answer a test controls."""

from __future__ import annotations

import asyncio
from typing import Optional

from fastapi import FastAPI, Response
from fastapi.responses import StreamingResponse

from odla.core import protocol as p


class FakeNode:
    """Answers /run with its own name as the only token, or as told."""

    def __init__(self, name: str, models: list[str], status: int = 200, tokens: int = 1,
                 crash_after: Optional[int] = None, healthy: bool = True) -> None:
        self.name, self.models, self.status, self.tokens = name, models, status, tokens
        self.crash_after, self.healthy = crash_after, healthy
        self.jobs: list[dict] = []
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/run")
        async def run(job: p.RunRequest) -> Response:
            self.jobs.append(job.model_dump())
            if self.status != 200:
                return Response(p.ErrorLine(error=f"{self.name} says {self.status}").model_dump_json(),
                                status_code=self.status, media_type="application/json")
            return StreamingResponse(self._lines(), media_type=p.NDJSON)

        @app.get("/health")
        async def health() -> Response:
            body = p.HealthResponse(status="healthy" if self.healthy else "unhealthy",
                                    node_id=self.name, models=self.models)
            return Response(body.model_dump_json(), status_code=200 if self.healthy else 503,
                            media_type="application/json")

        return app

    async def _lines(self):
        for i in range(self.tokens):
            if i == self.crash_after:
                raise ConnectionAbortedError("fake node dies")
            yield p.token_line(self.name)
            await asyncio.sleep(0)
        yield p.DONE_LINE


def ndjson_reply(body: bytes) -> bytes:
    """A whole HTTP/1.1 200 answer of JSON lines, with its Content-Length."""
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body), body)


class TCPServerThread:
    """An asyncio TCP server (``_serve(reader, writer)`` per connection) on its own event loop in a
    thread, on a free port of 127.0.0.1; stopped, with every connection's task, on exit."""

    def __init__(self) -> None:
        import threading

        from tests.helpers import bound_socket

        self.sock = bound_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self):
        self.sock.listen(64)
        self.thread.start()
        started = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._serve, sock=self.sock), self.loop)
        self.server = started.result(5)
        return self

    def __exit__(self, *exc: object) -> None:
        async def stop() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.sock.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError


class RawNode(TCPServerThread):
    """A node that speaks raw bytes over TCP, for answers no HTTP framework would give.

    ``script(first_line, reader, writer)`` answers every request but ``GET /health``,
    which gets a healthy answer unless ``healthy`` is False (then: no answer at all).
    Runs on its own event loop in a thread; ``requests`` lists each request line seen and
    ``closed`` counts connections the other side closed.
    """

    def __init__(self, script, models=("llama3",), healthy: bool = True) -> None:
        super().__init__()
        self.script, self.models, self.healthy = script, list(models), healthy
        self.requests: list[str] = []
        self.closed = 0

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                first = (await reader.readline()).decode("latin-1").strip()
                if not first:
                    self.closed += 1
                    return
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode("latin-1").partition(":")
                    length = int(value) if name.strip().lower() == "content-length" else length
                await reader.readexactly(length)
                self.requests.append(first)
                if first.startswith("GET /health"):
                    if not self.healthy:
                        await asyncio.Future()  # never answers
                    body = p.HealthResponse(status="healthy", node_id="raw", models=self.models).model_dump_json()
                    answer = (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
                              % (len(body), body.encode()))
                    if self.healthy == "drip":  # a byte every half second: each read is quick, the whole is not
                        for i in range(len(answer)):
                            writer.write(answer[i:i + 1])
                            await writer.drain()
                            await asyncio.sleep(0.5)
                    else:
                        writer.write(answer)
                elif not await self.script(first, reader, writer):
                    return
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.closed += 1
        finally:
            writer.close()


class Cutter(TCPServerThread):
    """A TCP forwarder to ``127.0.0.1:port`` whose connections can be cut at once (``cut()``):
    a network that fails between a node and the operator while both live."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self.target = port
        self.writers: list[asyncio.StreamWriter] = []

    def __exit__(self, *exc: object) -> None:
        self.cut()
        super().__exit__(*exc)

    def cut(self) -> None:
        def close_all() -> None:
            for writer in self.writers:
                writer.transport.abort()
            self.writers.clear()
        self.loop.call_soon_threadsafe(close_all)

    delay = 0.0
    "Seconds each answer (what comes back from the target) takes longer to arrive: a slow server."

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:  # nothing there (yet): as a refused connection would
            writer.transport.abort()
            return
        self.writers += [writer, up_writer]

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if self.delay and src is up_reader:  # a latency: each piece later by as much, in order
                        loop = asyncio.get_running_loop()
                        loop.call_at(loop.time() + self.delay, dst.write, data)
                        continue
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
