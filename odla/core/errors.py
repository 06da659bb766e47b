"""One error table for ODLA, shared by the operator, the node agent and the client.

    ODLAError                   an HTTP status and a message safe to show callers
    ├── NoNodeError             404 no healthy node has the model
    ├── QueueFull               503 the model's queue (or the caller's share of it) is full
    ├── QueueTimeout            504 a queued job found no slot in time
    ├── UpstreamError           4xx/5xx a node or Ollama refused or could not be reached
    └── AuthError               401 missing or wrong token / API key

Before a stream's first byte an error is an HTTP status with the body
``{"error": message, "done": true}``; after it, the same object is the stream's
last line. How each API shapes them, and the handlers that answer them, are
odla/serving/errors.py's.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Optional, Sequence


class ODLAError(Exception):
    """An error with the HTTP status it is answered with."""

    status_code = 500

    def __init__(self, message: str, status_code: int | None = None,
                 headers: Optional[Mapping[str, str]] = None) -> None:
        super().__init__(message)
        self.message = message
        self.headers: Mapping[str, str] = headers or {}
        if status_code is not None:
            self.status_code = status_code


class NoNodeError(ODLAError):
    status_code = 404

    def __init__(self, model: str, why: str = "") -> None:
        super().__init__(f"No node available with model: {model}" + (f" ({why})" if why else ""))


class QueueFull(ODLAError):
    """503: the queue for a model (or a caller's share of it) is full."""
    status_code = 503


class QueueTimeout(ODLAError):
    """504: a queued job waited ``queue_timeout`` for a slot."""
    status_code = 504


class UpstreamError(ODLAError):
    status_code = 502


class AuthError(ODLAError):
    status_code = 401


class NodeUnreachable(Exception):
    """A node could not be reached, broke the connection (or its link), or went silent."""


def message_of(body: bytes, status_code: int) -> str:
    """The message in an error body of any of the three shapes."""
    return error_in(body) or f"HTTP {status_code}"


def error_in(body: bytes) -> Optional[str]:
    """The ``error`` of a body in any of the three shapes (OpenAI's: its ``message``); None without one."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(error, dict):
        error = error.get("message")
    return None if error is None else str(error)


def invalid_body(errors: Sequence[Any]) -> ODLAError:
    """A 400 (not JSON) or 422 (not the right fields) out of pydantic's error list."""
    malformed = any(err.get("type") == "json_invalid" for err in errors)
    return ODLAError(describe_validation(errors), 400 if malformed else 422)


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable sentence out of pydantic's error list."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "json_invalid":
            parts.append("request body is not valid JSON")
        elif not loc and err.get("type") in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("request body must be a JSON object sent as Content-Type: application/json")
        elif err.get("type") == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg')}")
    return "invalid request: " + "; ".join(parts)
