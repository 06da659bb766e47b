"""Bare-ASGI pieces of the hot path: ``FastRoutes`` and ``LineStream``.

``FastRoutes`` serves the streaming endpoints (the operator's ``/inference``, the
node's ``/run``) in front of the FastAPI app, which serves everything else. FastAPI's
middleware stack, routing and dependency solving cost about 0.2 ms per request on
this machine's 2 cores (bench/), more than the whole relay of a short answer; the
hot endpoints need none of it. They still validate with the protocol's pydantic
models, answer errors from the one error table, and appear in the OpenAPI schema.

``LineStream``: the streaming response both hops use.

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
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Optional, Type, TypeVar

from fastapi import FastAPI
from pydantic import BaseModel, ValidationError
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .config import Settings
from .errors import AuthError, ODLAError, error_response, invalid_body
from .protocol import NDJSON, ErrorLine

log = logging.getLogger("odla")
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
M = TypeVar("M", bound=BaseModel)


class StreamBroken(Exception):
    """Raised by a body iterator to cut the response off, so the caller sees a broken stream."""


class FastRoutes:
    """An ASGI app: a few (method, path) handlers first, the FastAPI ``app`` for the rest."""

    def __init__(self, app: FastAPI,
                 routes: dict[tuple[str, str], tuple[Handler, Optional[Type[BaseModel]], str]]) -> None:
        """``routes``: (method, path) -> (handler, body model for the docs or None, summary).

        A path ending in ``*`` matches every path that starts with the rest.
        """
        self.app = app
        self.state = app.state
        self.routes = {key: handler for key, (handler, _, _) in routes.items() if not key[1].endswith("*")}
        self.prefixes = [(m, path[:-1], handler) for (m, path), (handler, _, _) in routes.items() if path.endswith("*")]
        self.allowed: dict[str, str] = {}
        for method, path in self.routes:
            self.allowed[path] = ", ".join(filter(None, (self.allowed.get(path), method)))
        _document(app, {k: v for k, v in routes.items() if v[1] is not None})

    def _find(self, method: str, path: str) -> Optional[Handler]:
        handler = self.routes.get((method, path))
        if handler is None:
            handler = next((h for m, prefix, h in self.prefixes if m == method and path.startswith(prefix)), None)
        return handler

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._find(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if handler is None:
            allowed = self.allowed.get(scope.get("path", "")) if scope["type"] == "http" else None
            if allowed is not None:
                await error_response("method not allowed", 405, {"Allow": allowed})(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        try:
            await handler(scope, receive, send)
        except ODLAError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else None
            await error_response(exc.message, exc.status_code, headers)(scope, receive, send)
        except Exception:
            log.exception("unexpected error on %s %s", scope["method"], scope["path"])
            await error_response("internal error", 500)(scope, receive, send)


def headers_of(scope: Scope) -> Headers:
    return Headers(scope=scope)


async def read_model(receive: Receive, model: Type[M], limit: int) -> M:
    """The request body as ``model``; 413 past ``limit`` bytes, 400/422 when invalid."""
    try:
        return model.model_validate_json(await read_body(receive, limit))
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None


async def read_body(receive: Receive, limit: int) -> bytes:
    """The whole request body; 413 past ``limit`` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ODLAError("client disconnected", 499)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise ODLAError(f"request body is larger than {limit} bytes", 413)
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


async def read_prompt_request(receive: Receive, model: Type[M], settings: Settings) -> M:
    """A body with a ``prompt``: 413 when it is longer than ``settings.max_prompt_chars``."""
    body = await read_model(receive, model, settings.max_body_bytes)
    if len(body.prompt) > settings.max_prompt_chars:  # type: ignore[attr-defined]
        raise ODLAError(f"prompt is longer than {settings.max_prompt_chars} characters", 413)
    return body


def _document(app: FastAPI, routes: dict[tuple[str, str], tuple[Any, Type[BaseModel], str]]) -> None:
    """Add the bare-ASGI endpoints to the app's OpenAPI schema."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()  # also stored as app.openapi_schema
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.setdefault("ErrorLine", ErrorLine.model_json_schema())
            for (method, path), (_, model, summary) in routes.items():
                schemas[model.__name__] = model.model_json_schema()
                schema["paths"].setdefault(path, {})[method.lower()] = _operation(model, summary)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _operation(model: Type[BaseModel], summary: str) -> dict:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorLine"}}}}
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}},
        "responses": {
            "200": {"description": "JSON lines: tokens, then one final line",
                    "content": {NDJSON: {"schema": {"type": "string"}}}},
            **{code: {"description": text, **error} for code, text in (
                ("400", "not JSON"), ("401", "missing or wrong credentials"), ("404", "no such model"),
                ("413", "too large"), ("422", "invalid fields"), ("502", "upstream failed"),
                ("503", "no upstream could take the job"))},
        },
    }


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
        started = False  # the status line leaves with the first data: one wake-up downstream, not two
        buf = _Buffer()
        producer = asyncio.create_task(self._produce(buf))
        watcher = asyncio.create_task(_disconnected(receive))
        watcher.add_done_callback(lambda _: buf.ready.set())
        try:
            while True:
                await buf.ready.wait()
                buf.ready.clear()
                data = buf.take()
                if data:
                    if not started:
                        started = True
                        await send({"type": "http.response.start", "status": self.status_code,
                                    "headers": self.raw_headers})
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                if producer.done() and not buf.pieces:  # what came during the last send goes too
                    break
                if watcher.done():
                    return
            try:
                producer.result()  # an unexpected error in the body surfaces here
            except StreamBroken as exc:
                log.warning("stream cut off: %s", exc)
                return  # without the last chunk: the server closes the connection mid-body
            if not started:
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
            if not producer.done():
                producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer

    async def _produce(self, buf: "_Buffer") -> None:
        body = self.body_iterator
        try:
            async for data in body:
                await buf.put(data)
        finally:
            buf.ready.set()
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                await aclose()


class _Buffer:
    """What the body produced and the client has not been sent yet, bounded: a slow
    client slows the upstream down (TCP back-pressure) instead of filling memory."""

    LIMIT = 1 << 20

    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.size = 0
        self.ready = asyncio.Event()
        self.room = asyncio.Event()

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


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
