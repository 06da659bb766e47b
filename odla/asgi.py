"""``LineStream``: the streaming response both hops use.

Like Starlette's ``StreamingResponse``, with two differences that matter on the hot path:

- lines that are ready together leave in one send: the body is read by a producer task
  that runs until it would wait, while the sender takes everything gathered so far, so
  a burst of tokens costs one write instead of one per token;
- a client that disconnects cancels the producer at once, and the body iterator is
  always closed, which is what closes the upstream stream (and so stops Ollama).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .protocol import NDJSON


class LineStream(Response):
    """An ASGI response streaming ``body`` (an async iterator of bytes), batched."""

    def __init__(self, body: AsyncIterator[bytes], media_type: str = NDJSON, status_code: int = 200,
                 headers: dict[str, str] | None = None) -> None:  # noqa: D107 (no Response.__init__: no body)
        self.body_iterator = body
        self.status_code = status_code
        self.background = None
        self.raw_headers = [(b"content-type", media_type.encode())]
        self.raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        pending: list[bytes] = []
        ready = asyncio.Event()
        producer = asyncio.create_task(self._produce(pending, ready))
        watcher = asyncio.create_task(_disconnected(receive))
        watcher.add_done_callback(lambda _: ready.set())
        try:
            while True:
                await ready.wait()
                ready.clear()
                if pending:
                    data = b"".join(pending) if len(pending) > 1 else pending[0]
                    pending.clear()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if producer.done():
                    break
                if watcher.done():
                    return
            producer.result()  # an unexpected error in the body surfaces here
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _produce(self, pending: list[bytes], ready: asyncio.Event) -> None:
        body = self.body_iterator
        try:
            async for data in body:
                pending.append(data)
                ready.set()
        finally:
            ready.set()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
