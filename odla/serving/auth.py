"""Access control: the node join token and client API keys, compared in constant time.

**Nodes** present a credential the same way on every transport (``X-ODLA-Join-Token`` or
``Authorization: Bearer``, on ``POST /register``, ``/deregister`` and the ``/nodes/link``
WebSocket): a node listed in ``node_tokens`` its own, any other the shared ``join_token``
(``may_join``). Before a request's body or a link's hello is read, the caller must hold some
credential of this network (``holds_node_credential``): no credentials, no read."""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Mapping, Optional

from starlette.requests import Request

from odla.core.errors import AuthError, ODLAError
from odla.core.logs import Throttle

if TYPE_CHECKING:
    from odla.core.config import Settings

JOIN_HEADER = "x-odla-join-token"
WALLET_TOKEN = "odla_wallet_"
"How a wallet sign-in's bearer token begins (``odla.settlement.signin``)."
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


class Callers:
    """Who a client is, on every client-facing endpoint: one of ``api_keys`` (its account is a hash
    of the key, never the key), or a wallet signed in (``odla.settlement.signin``: its address).
    Without ``api_keys`` anyone may ask, as ``""`` (or as the wallet it signed in with)."""

    def __init__(self, api_keys: list[str], admin_keys: list[str], sessions: Any = None) -> None:
        self.api_keys = api_keys
        self.admin_keys = admin_keys
        self.sessions = sessions

    def __call__(self, headers: Mapping[str, str]) -> str:
        """The caller's account; ``AuthError`` when it may not ask."""
        key = bearer(headers)
        if key and self.sessions is not None and key.startswith(WALLET_TOKEN):
            account = self.sessions.account(key)
            if account is None:
                raise AuthError("the wallet sign-in has expired or is unknown here: sign in again (client.py login)")
            return account
        if self.api_keys and not matches(key, self.api_keys):
            raise AuthError("missing or wrong API key (send Authorization: Bearer <key>)")
        return hashlib.sha256(key.encode()).hexdigest()[:16] if key else ""

    def whose(self, headers: Mapping[str, str]) -> Optional[str]:
        """Whose records the caller may read: its own account, or None (everyone's) for an admin key,
        and for anyone on an operator without ``api_keys``."""
        caller = self(headers)
        if not self.api_keys or matches(bearer(headers), self.admin_keys):
            return None
        return caller

    def dependency(self) -> Callable[[Request], Awaitable[None]]:
        """A FastAPI dependency that lets through only callers who may ask."""
        async def client_auth(request: Request) -> None:
            self(request.headers)
        return client_auth

    def admin_dependency(self) -> Callable[[Request], Awaitable[None]]:
        """A FastAPI dependency that lets through only those who may change the network (pull or remove
        models on the nodes): an admin key; anyone on an operator without ``api_keys``."""
        async def admin_auth(request: Request) -> None:
            self(request.headers)
            if self.api_keys and not matches(bearer(request.headers), self.admin_keys):
                raise ODLAError("managing the network's models needs an admin key (admin_keys)", 403)
        return admin_auth


def join_headers(token: Optional[str]) -> dict[str, str]:
    return {JOIN_HEADER: token} if token else {}


def node_credential(headers: Mapping[str, str]) -> Optional[str]:
    """What a node presents: its join token header, else a bearer token (a dial node's)."""
    return headers.get(JOIN_HEADER) or bearer(headers)


def may_join(settings: "Settings", node_id: str, token: Optional[str]) -> bool:
    """A node listed in ``node_tokens`` must present its own token; any other, the shared
    ``join_token`` (refused when only ``node_tokens`` is set); anyone when neither is set."""
    own = (settings.node_tokens or {}).get(node_id)
    if own is not None:
        return matches(token, [own])
    if settings.join_token:
        return matches(token, [settings.join_token])
    return not settings.node_tokens


def holds_node_credential(settings: "Settings", token: Optional[str]) -> bool:
    """Does ``token`` belong to this network at all (the shared join token or any node's own)?
    Asked before the body that names the node is read; ``may_join`` decides once it is."""
    secrets = [t for t in (settings.join_token, *(settings.node_tokens or {}).values()) if t]
    return not secrets or matches(token, secrets)


def token_for(settings: "Settings", node_id: str) -> Optional[str]:
    """What the operator presents to a node: its own token when it has one, else the join token."""
    return (settings.node_tokens or {}).get(node_id) or settings.join_token


# FastAPI dependencies (async: FastAPI runs plain-def dependencies in a thread pool, a hand-off per request)

def node_credential_dependency(settings: "Settings") -> Callable[[Request], Awaitable[None]]:
    """The operator's node-facing endpoints: the caller must hold a credential of this network
    (``holds_node_credential``); the endpoint then checks it is the one for the node it names.
    Refusals are logged as ``join_token_dependency``'s."""
    throttle = Throttle()

    async def node_auth(request: Request) -> None:
        if not holds_node_credential(settings, node_credential(request.headers)):
            refused(request, throttle)
            raise AuthError("missing or wrong join token (header X-ODLA-Join-Token)")
    return node_auth


def refused(request: Request, throttle: Throttle) -> None:
    """Log a node-facing refusal, once a minute per address and path at most."""
    client = request.client.host if request.client else "?"
    held = throttle((client, request.url.path))
    if held is not None:
        log.warning("refused %s %s from %s: missing or wrong join token%s", request.method,
                    request.url.path, client, f" ({held} more refused since the last such line)" if held else "")


def join_token_dependency(token: Optional[str]) -> Callable[[Request], Awaitable[None]]:
    """A dependency that lets through only callers holding the join token (anyone when unset).
    A refusal is logged (where it is looked for: a node that cannot join), once a minute per
    address and path at most."""
    throttle = Throttle()

    async def node_auth(request: Request) -> None:
        try:
            check_join_token(request.headers, token)
        except AuthError:
            refused(request, throttle)
            raise
    return node_auth
