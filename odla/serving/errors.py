"""Errors as the operator and the node answer them: in the shape of the API asked (ODLA's, Ollama's,
OpenAI's: ``Shape``, chosen by path), from FastAPI's exception handlers. (What the ollama SDK raises
is the node's to map: odla/node/ollama_clients.py.)"""

from __future__ import annotations

import json
import logging
from typing import Callable, Mapping, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from odla.core.errors import AuthError, ODLAError, invalid_body
from odla.core.protocol import JOB_HEADER, ErrorLine, error_line

log = logging.getLogger("odla")


class Shape:
    """How one API shapes an error: a body before the stream starts, a last line after."""

    def __init__(self, body: Callable[[str, int], dict], line: Callable[[str], bytes]) -> None:
        self.body = body
        self.line = line

    def response(self, message: str, status_code: int, headers: Optional[Mapping[str, str]] = None) -> Response:
        return Response(json.dumps(self.body(message, status_code)), status_code=status_code,
                        media_type="application/json", headers=dict(headers) if headers else None)

    def error(self, exc: ODLAError) -> Response:
        headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) else exc.headers
        return self.response(exc.message, exc.status_code, headers)


def _openai_body(message: str, status_code: int) -> dict:
    """Ollama's openai.NewError: the type follows the status."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status_code, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


ODLA = Shape(lambda message, status: ErrorLine(error=message).model_dump(), error_line)
OLLAMA = Shape(lambda message, status: {"error": message},
               lambda message: json.dumps({"error": message}).encode() + b"\n")
OPENAI = Shape(_openai_body, lambda message: b"data: " + json.dumps(_openai_body(message, 500)).encode() + b"\n\n")


def shape_for(path: str) -> Shape:
    """ODLA's own endpoints answer in ODLA's shape, the doors in their API's (a node's
    ``/ollama/...`` relay as the API it relays)."""
    path = path[len("/ollama"):] if path.startswith("/ollama/") else path
    if path.startswith("/v1/"):
        return OPENAI
    if path.startswith("/api/") or path == "/":
        return OLLAMA
    return ODLA


def error_response(exc: ODLAError, path: str) -> Response:
    """The answer to ``exc`` before anything was sent, shaped for the endpoint at ``path``."""
    return shape_for(path).error(exc)


def install_error_handlers(app: FastAPI) -> None:
    """Every error leaves with its status, in the shape of the endpoint it came from. A request
    that had opened a job (``request.state.job``) ends it here, refused, and names it."""

    def answer(request: Request, error: ODLAError) -> Response:
        response = error_response(error, request.url.path)
        job = getattr(request.state, "job", None)
        if job is not None:
            job.refused(error)
            response.headers[JOB_HEADER] = job.id
        return response

    @app.exception_handler(ODLAError)
    async def _odla(request: Request, exc: ODLAError) -> Response:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return answer(request, invalid_body(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        return answer(request, ODLAError(str(exc.detail), exc.status_code, getattr(exc, "headers", None)))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        """The client left while its request's body was still coming: no error of ours, nothing to log."""
        job = getattr(request.state, "job", None)
        if job is not None:
            job.end("client_cancel")
        return Response(status_code=499)  # (nobody reads it: nginx's code for a client that closed)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return answer(request, ODLAError("internal error", 500))
