"""The node's two clients of its local Ollama, both used through their public API.

- the ollama SDK's ``AsyncClient`` (on httpx), for listings (what Ollama has, what it has
  loaded) and model management;
- an aiohttp ``ClientSession`` on the same Ollama, for what is read as it arrives: the answers
  to jobs (``/run``), read a piece at a time (``odla.node.generation``) rather than as a model
  object per line as the SDK's ``generate`` reads them, and the ``/ollama/...`` relay that
  serves the operator's Ollama and OpenAI doors, which passes bytes through untouched.

Streams are on aiohttp (its HTTP parser is in C, its pool takes an idle connection off a list)
rather than httpx: httpx's request path costs 3 to 40 times aiohttp's CPU (``bench/floors.py``:
about 860 µs a request at 100 at once, keeping two connections, against 77). aiohttp raises
when a body breaks before handing over what it had received but not yet given out; what reads
a job's answer is always waiting on it when the loop reads the socket (see
``odla.serving.responses``), so what arrived before a break is handed over first.

No cap on connections (a cap would queue the next stream out of sight); proxies from the
environment, as the SDK takes them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import ollama

from odla.core.config import Settings
from odla.core.errors import ODLAError, UpstreamError
from odla.serving.upstream import done_with

DEFAULT_PORT = 11434

STREAM_FAILURES = (aiohttp.ClientError, asyncio.TimeoutError)
"What a stream's request (``Streams``) raises when Ollama cannot be reached or its answer breaks."
# What a failed call to Ollama raises (the SDK's, or a stream's): the cases ollama_failure maps.
OLLAMA_FAILURES = (ollama.ResponseError, ConnectionError, httpx.HTTPError, *STREAM_FAILURES, ValueError)


def ollama_failure(exc: BaseException, ollama_host: str) -> ODLAError:
    """What a failed ollama SDK call means to the caller of a node."""
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code in (-1, 500) or exc.status_code >= 500 and exc.status_code != 503:
            return UpstreamError(f"Ollama error: {exc.error}", 502)
        return UpstreamError(exc.error, exc.status_code)
    if isinstance(exc, (httpx.ConnectError, aiohttp.ClientConnectorError, ConnectionError)):
        # streaming SDK calls raise httpx.ConnectError, the others ConnectionError
        return UpstreamError(f"Ollama is not reachable at {ollama_host}", 503)
    if isinstance(exc, (httpx.TimeoutException, asyncio.TimeoutError)):
        return UpstreamError(f"Ollama at {ollama_host} timed out", 504)
    if isinstance(exc, (httpx.HTTPError, aiohttp.ClientError)):
        return UpstreamError(f"lost connection to Ollama at {ollama_host}", 502)
    if isinstance(exc, ValueError):
        return UpstreamError(f"Ollama at {ollama_host} sent something that is not Ollama's API", 502)
    raise exc


def ollama_base_url(host: str) -> str:
    """``OLLAMA_HOST`` read as the ollama SDK and Ollama read it: ``""`` is 127.0.0.1:11434,
    ``example.com`` gets port 11434, ``:9999`` is 127.0.0.1:9999, ``http://h`` is port 80."""
    scheme, _, hostport = (host or "").partition("://")
    port = DEFAULT_PORT
    if not hostport:
        scheme, hostport = "http", host or ""
    elif scheme in ("http", "https"):
        port = 80 if scheme == "http" else 443
    split = urlsplit(f"{scheme}://{hostport}")
    name = split.hostname or "127.0.0.1"
    port = split.port or port
    try:
        if isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address):
            name = f"[{name}]"
    except ValueError:
        pass
    path = split.path.strip("/")
    return f"{scheme}://{name}:{port}" + (f"/{path}" if path else "")


def timeouts(settings: Settings) -> httpx.Timeout:
    """No read limit (a model load can take minutes; the operator tells a slow Ollama from a
    dead node by asking it, see odla/operator/nodes.py); connecting is bounded."""
    return httpx.Timeout(connect=settings.connect_timeout, read=None, write=None, pool=None)


KEEP_OPEN = 2
"""Idle connections the SDK's client keeps (listings: one or two at a time). Few: httpcore's pool
polls every idle connection's socket each time a request starts or ends."""


def limits() -> httpx.Limits:
    return httpx.Limits(max_connections=None, max_keepalive_connections=KEEP_OPEN)


def sdk_client(settings: Settings, **httpx_kwargs: Any) -> ollama.AsyncClient:
    """The ollama SDK's client for this node's Ollama (``httpx_kwargs`` go to httpx: tests pass a transport)."""
    httpx_kwargs.setdefault("limits", limits())
    return ollama.AsyncClient(host=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                              **httpx_kwargs)


class Streams:
    """Requests to Ollama whose answers are read as they arrive (aiohttp), and how each ends."""

    def __init__(self, settings: Settings) -> None:
        self.base = ollama_base_url(settings.ollama_host)
        headers = {"Authorization": f"Bearer {os.environ['OLLAMA_API_KEY']}"} if os.getenv("OLLAMA_API_KEY") else None
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            # no read limit, connecting bounded: as ``timeouts`` says
            timeout=aiohttp.ClientTimeout(total=None, connect=settings.connect_timeout),
            headers=headers, trust_env=True,
            auto_decompress=False, skip_auto_headers=("Accept-Encoding",))  # bytes as Ollama sent them
        self.open: set[aiohttp.ClientResponse] = set()
        "Answers being read: closed at ``aclose()`` (closing the session alone does not break them)."

    async def send(self, method: str, path: str, body: bytes, query: str = "") -> aiohttp.ClientResponse:
        """Send; return once the status and headers are in (the body is read with ``content``, and
        the response given back with ``done``)."""
        url = f"{self.base}{path}" + (f"?{query}" if query else "")
        resp = await self.session.request(method, url, data=body or None, headers=JSON_HEADERS)
        self.open.add(resp)
        return resp

    def done(self, resp: aiohttp.ClientResponse) -> None:
        """The response is read, or given up: its connection goes back to the pool, or is closed."""
        self.open.discard(resp)
        done_with(resp)

    async def aclose(self) -> None:
        """Break every answer being read (each ends with an error its reader turns into a last line),
        then close the connections."""
        for resp in list(self.open):
            self.done(resp)
        await self.session.close()

    async def __aenter__(self) -> "Streams":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


JSON_HEADERS = {"Content-Type": "application/json"}
