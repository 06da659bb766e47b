"""The operator's Ollama and OpenAI doors: clients of either API point at the operator unchanged.

Requests that name a model are routed like ``/inference`` (round-robin, failover before
the first byte, cancellation on disconnect) to a node's ``/ollama/...`` relay, which
passes them to that node's Ollama; the answer comes back byte for byte, status and
errors included. Listings (``/api/tags``, ``/api/ps``, ``/v1/models``) merge what every
healthy node's Ollama lists. Errors the operator makes itself take the door's shape:
Ollama's ``{"error": "..."}`` or OpenAI's ``{"error": {"message", "type", ...}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable, Optional

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .asgi import LineStream, headers_of, read_body
from .auth import check_api_key
from .config import Settings
from .errors import AuthError, NoNodeError, ODLAError
from .registry import Registry
from .relay import Router
from .upstream import UpstreamError

log = logging.getLogger("odla.operator")

ROUTED = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
          "/v1/chat/completions", "/v1/completions", "/v1/embeddings")
LISTINGS = {"/api/tags": "models", "/api/ps": "models", "/v1/models": "data"}


class Flavor:
    """How one API shapes its errors."""

    def __init__(self, body: Callable[[int, str], dict], broken: Callable[[str], bytes]) -> None:
        self.body = body
        self.broken = broken

    def response(self, status: int, message: str, auth: bool = False) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if auth else None
        return _json(self.body(status, message), status, headers)


def _json(body: object, status: int = 200, headers: Optional[dict] = None) -> Response:
    return Response(json.dumps(body), status_code=status, media_type="application/json; charset=utf-8",
                    headers=headers)


def _openai_error(status: int, message: str) -> dict:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


OLLAMA = Flavor(lambda status, message: {"error": message},
                lambda message: json.dumps({"error": message}).encode() + b"\n")
OPENAI = Flavor(_openai_error,
                lambda message: b"data: " + json.dumps(_openai_error(500, message)).encode() + b"\n\n")


def flavor_of(path: str) -> Flavor:
    return OPENAI if path.startswith("/v1/") else OLLAMA


class Doors:
    """Handlers for the operator's FastRoutes."""

    def __init__(self, settings: Settings, registry: Registry, router: Callable[[], Router]) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router

    def routes(self) -> dict:
        table: dict = {("POST", path): (self.routed, None, "") for path in ROUTED}
        table.update({("GET", path): (self.listing, None, "") for path in LISTINGS})
        table[("GET", "/api/version")] = (self.version, None, "")
        table[("GET", "/")] = table[("HEAD", "/")] = (self.root, None, "")
        return table

    async def root(self, scope: Scope, receive: Receive, send: Send) -> None:
        await Response("Ollama is running", media_type="text/plain; charset=utf-8")(scope, receive, send)

    async def routed(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A request naming a model: to a node that has it, the answer back as Ollama gave it."""
        flavor = flavor_of(scope["path"])
        try:
            check_api_key(headers_of(scope), self.settings.api_keys)
            body = await read_body(receive, self.settings.max_body_bytes)
            model = _model_of(body)
            router = self.router()
            node, resp = await router.open(model, "POST", "/ollama" + scope["path"], body)
        except NoNodeError:
            await flavor.response(404, f"model '{model}' not found")(scope, receive, send)
            return
        except ODLAError as exc:
            await flavor.response(exc.status_code, exc.message, isinstance(exc, AuthError))(scope, receive, send)
            return
        media = dict(resp.headers).get(b"content-type", b"application/json").decode("latin-1")
        streaming = "ndjson" in media or "event-stream" in media
        broken = flavor.broken if streaming else (lambda message: b"")
        body_iter = router.relay(node, resp, broken=broken, check_final=False)
        await LineStream(body_iter, media_type=media, status_code=resp.status_code)(scope, receive, send)

    async def listing(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``/api/tags``, ``/api/ps``, ``/v1/models``: every healthy node's, one entry per model."""
        flavor, path = flavor_of(scope["path"]), scope["path"]
        try:
            check_api_key(headers_of(scope), self.settings.api_keys)
        except AuthError as exc:
            await flavor.response(401, exc.message, True)(scope, receive, send)
            return
        answers = await self._ask_all("GET", path)
        key, seen, merged = LISTINGS[path], set(), []
        for answer in answers:
            for entry in answer.get(key) or []:
                name = entry.get("name") or entry.get("id") or entry.get("model")
                if name not in seen:
                    seen.add(name)
                    merged.append(entry)
        body = {"object": "list", "data": merged} if key == "data" else {"models": merged}
        await _json(body)(scope, receive, send)

    async def version(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The lowest Ollama version among the healthy nodes: what every node can do."""
        versions = [a["version"] for a in await self._ask_all("GET", "/api/version") if "version" in a]
        if not versions:
            await OLLAMA.response(503, "no healthy node")(scope, receive, send)
            return
        lowest = min(versions, key=_version_key)
        await _json({"version": lowest})(scope, receive, send)

    async def _ask_all(self, method: str, path: str) -> list[dict]:
        nodes = [n for n in self.registry.nodes() if n.healthy]
        answers = await asyncio.gather(*(self._ask(n.url, method, path) for n in nodes))
        return [a for a in answers if a is not None]

    async def _ask(self, url: str, method: str, path: str) -> Optional[dict]:
        router = self.router()
        try:
            resp = await asyncio.wait_for(
                router.pool.request(method, f"{url}/ollama{path}", b"", router.headers),
                self.settings.health_check_timeout)
            try:
                data = await asyncio.wait_for(resp.read(), self.settings.health_check_timeout)
            finally:
                await resp.aclose()
            return json.loads(data) if resp.status_code == 200 else None
        except (asyncio.TimeoutError, UpstreamError, ValueError) as exc:
            log.info("node at %s did not answer %s (%s)", url, path, exc)
            return None


def _model_of(body: bytes) -> str:
    """The ``model`` (or ``/api/show``'s older ``name``) a request names; 400 like Ollama when none."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ODLAError(f"invalid JSON: {exc}", 400) from None
    if not isinstance(data, dict):
        raise ODLAError("request body must be a JSON object", 400)
    model = data.get("model") or data.get("name")
    if not isinstance(model, str) or not model.strip():
        raise ODLAError("model is required", 400)
    return model


def _version_key(version: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in version.split("-")[0].split("."))
