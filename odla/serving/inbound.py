"""What comes in: a bounded body, parsed JSON, a bounded prompt.

``BodyLimit`` keeps any body larger than the settings allow from being read into memory;
``read_body`` is where the streaming endpoints take their body from.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any, Callable, Type, TypeVar

from fastapi import FastAPI, HTTPException, Request
from starlette.middleware.trustedhost import TrustedHostMiddleware
from pydantic import BaseModel, ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from odla.core.config import Settings
from odla.core.errors import ODLAError, invalid_body
from odla.serving.errors import install_error_handlers, shape_for

M = TypeVar("M", bound=BaseModel)


def build_app(title: str, lifespan: Any, settings: Settings,
              on_refused: Callable[[str], None] = lambda path: None, docs: bool = True,
              listen_host: str = "0.0.0.0") -> FastAPI:
    """A FastAPI app as the operator and the node both need it: bounded bodies, one error
    table, and no OpenTelemetry hooks (FastAPI's look at the environment on every request).
    ``on_refused(path)`` hears of a request refused before routing (its body is too large).
    Without ``docs``, no /docs, /redoc or /openapi.json (a locked operator serves its own)."""
    pages = {} if docs else {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(title=title, lifespan=lifespan, **pages,
                  telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes, on_refused=on_refused)
    # DNS rebinding: a web page must not reach a loopback listener under its own name, nor read
    # or write across origins (the outermost checks: nothing else runs for such a request).
    app.add_middleware(OriginCheck, allowed=settings.allowed_origins)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(settings, listen_host))
    install_error_handlers(app)
    return app


LOCAL_NAMES = ["localhost", "127.0.0.1", "::1", "[::1]"]


def allowed_hosts(settings: Settings, listen_host: str) -> list[str]:
    """``allowed_hosts`` as set; unset, only localhost's names on a loopback listener, else any,
    as Ollama does (OLLAMA_HOST=127.0.0.1 answers only to them)."""
    if settings.allowed_hosts is not None:
        return settings.allowed_hosts
    loopback = listen_host == "localhost"
    with contextlib.suppress(ValueError):
        loopback = loopback or ipaddress.ip_address(listen_host).is_loopback
    return LOCAL_NAMES if loopback else ["*"]


class OriginCheck:
    """ASGI middleware: 403 for a browser request from another web origin (its ``Origin`` header
    names neither this server nor one of ``allowed``), a WebSocket (``/nodes/link``) as well as
    plain HTTP. Requests without ``Origin`` (curl, the SDKs, nodes, the dashboard's own GETs) pass."""

    def __init__(self, app: ASGIApp, allowed: list[str]) -> None:
        self.app = app
        self.allowed = {o.rstrip("/").lower() for o in allowed}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            origin = next((v for k, v in scope["headers"] if k == b"origin"), None)
            if origin is not None and not self._same(origin.decode("latin-1").lower(), scope):
                if scope["type"] == "websocket":  # closed before it is accepted: the browser gets a 403
                    await send({"type": "websocket.close", "code": 4403, "reason": "cross-origin"})
                    return
                await shape_for(scope["path"]).error(ODLAError("cross-origin request refused (allowed_origins)",
                                                               403))(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _same(self, origin: str, scope: Scope) -> bool:
        if origin in self.allowed or "*" in self.allowed:
            return True
        host = next((v for k, v in scope["headers"] if k == b"host"), b"").decode("latin-1").lower()
        return origin in (f"http://{host}", f"https://{host}")


class BodyLimit:
    """ASGI middleware: 413 for a body over ``limit`` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app: ASGIApp, limit: int, on_refused: Callable[[str], None] = lambda path: None) -> None:
        self.app = app
        self.limit = limit
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope["headers"] if k == b"content-length"), b"0")
        if not length.isdigit():
            error = ODLAError("invalid Content-Length", 400)
        elif int(length) > self.limit:
            error = ODLAError(self._message, 413)
        else:
            await self.app(scope, self._counting(receive), send)
            return
        self.on_refused(scope["path"])
        await shape_for(scope["path"]).error(error)(scope, receive, send)

    @property
    def _message(self) -> str:
        return f"request body is larger than {self.limit} bytes"

    def _counting(self, receive: Receive) -> Receive:
        size = 0

        async def counted() -> Message:
            nonlocal size
            message = await receive()
            size += len(message.get("body", b""))
            if size > self.limit:  # a chunked body with no Content-Length
                raise HTTPException(413, self._message)
            return message

        return counted


def check_prompt(prompt: str, settings: Settings) -> None:
    """413 for a prompt longer than ``max_prompt_chars``."""
    if len(prompt) > settings.max_prompt_chars:
        raise ODLAError(f"prompt is longer than {settings.max_prompt_chars} characters", 413)


async def read_body(request: Request, model: Type[M], settings: Settings) -> M:
    """The body as ``model``, whatever its Content-Type says (``curl -d`` sends JSON labelled
    as a form); 400 when not JSON, 422 when not the right fields, 413 for a prompt over
    ``max_prompt_chars``. Document it with ``openapi_body(model)``. (Called by the endpoint,
    not a dependency: on the hot endpoints FastAPI's cost is per dependency, and this one
    would save nothing.)"""
    try:
        body = model.model_validate_json(await request.body())
    except ValidationError as exc:
        raise invalid_body(exc.errors()) from None
    prompt = getattr(body, "prompt", None)
    if isinstance(prompt, str):
        check_prompt(prompt, settings)
    return body


def openapi_body(model: Type[BaseModel]) -> dict:
    """``openapi_extra`` for an endpoint that reads its body through ``read_body``."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}
