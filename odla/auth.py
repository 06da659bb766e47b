"""Access control: the node join token and client API keys, compared in constant time."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Awaitable, Callable, Iterable, Mapping, Optional

from starlette.requests import Request

from .errors import AuthError
from .logs import Throttle

JOIN_HEADER = "x-odla-join-token"
log = logging.getLogger("odla")


def matches(presented: Optional[str], secrets: Iterable[str]) -> bool:
    if not presented:
        return False
    found = False
    for secret in secrets:  # no early exit: time does not depend on which key matched
        found |= hmac.compare_digest(presented.encode(), secret.encode())
    return found


def bearer(headers: Mapping[str, str]) -> Optional[str]:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else None


def check_join_token(headers: Mapping[str, str], token: Optional[str]) -> None:
    """Node-facing endpoints: the caller must hold the network's join token, when one is set."""
    if token and not matches(headers.get(JOIN_HEADER), [token]):
        raise AuthError("missing or wrong join token (header X-ODLA-Join-Token)")


def check_api_key(headers: Mapping[str, str], keys: list[str]) -> None:
    """Client-facing endpoints: ``Authorization: Bearer <key>``, when keys are set."""
    if keys and not matches(bearer(headers), keys):
        raise AuthError("missing or wrong API key (send Authorization: Bearer <key>)")


def caller_of(headers: Mapping[str, str]) -> str:
    """Who is asking, for fair queueing: a hash of the API key (never the key), or "" without one."""
    key = bearer(headers)
    return hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""


def join_headers(token: Optional[str]) -> dict[str, str]:
    return {JOIN_HEADER: token} if token else {}


# FastAPI dependencies (async: FastAPI runs plain-def dependencies in a thread pool, a hand-off per request)

def api_key_dependency(keys: list[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets through only callers holding one of ``keys`` (anyone when empty)."""
    async def client_auth(request: Request) -> None:
        check_api_key(request.headers, keys)
    return client_auth


def join_token_dependency(token: Optional[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets through only callers holding the join token (anyone when unset).
    A refusal is logged (where it is looked for: a node that cannot join), once a minute per
    address and path at most."""
    throttle = Throttle()

    async def node_auth(request: Request) -> None:
        try:
            check_join_token(request.headers, token)
        except AuthError:
            client = request.client.host if request.client else "?"
            held = throttle((client, request.url.path))
            if held is not None:
                log.warning("refused %s %s from %s: missing or wrong join token%s", request.method,
                            request.url.path, client, f" ({held} more refused since the last such line)" if held else "")
            raise
    return node_auth
