"""The node's two clients of its local Ollama, both httpx clients used through public API.

- the ollama SDK's ``AsyncClient``, for listings (what Ollama has, what it has loaded);
- a plain ``httpx.AsyncClient`` on the same base URL (the client the SDK runs on), for what
  is read as it arrives: the ``/ollama/...`` relay that serves the operator's Ollama and OpenAI
  doors, which passes bytes through untouched, and the answers to jobs (``/run``), read a piece
  at a time (``odla.node.generation``) rather than as a model object per line, as the SDK's
  ``generate`` reads them.

Both on httpx's own transport, with no cap on connections (httpx's default, 100, would queue
the 101st stream out of sight) and proxies and certificates from the environment. Not on
aiohttp (httpx-aiohttp), though it parses in C and halved the node's CPU per token (31 µs
against 57 µs one request at a time in ``make bench``): when Ollama's connection breaks,
aiohttp raises before handing over what it had already received, so the tokens Ollama sent
just before a crash never reached the client (the chaos benchmark lost 48 in 10,000
requests). httpx yields every byte it received, then raises. A node's CPU per token is small
beside its GPU's time per token; a lost token is not.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama

from odla.core.config import Settings
from odla.core.errors import ODLAError, UpstreamError

DEFAULT_PORT = 11434

# What a failed ollama SDK call raises: the cases ollama_failure maps.
OLLAMA_FAILURES = (ollama.ResponseError, ConnectionError, httpx.HTTPError, ValueError)


def ollama_failure(exc: BaseException, ollama_host: str) -> ODLAError:
    """What a failed ollama SDK call means to the caller of a node."""
    if isinstance(exc, ollama.ResponseError):
        if exc.status_code in (-1, 500) or exc.status_code >= 500 and exc.status_code != 503:
            return UpstreamError(f"Ollama error: {exc.error}", 502)
        return UpstreamError(exc.error, exc.status_code)
    if isinstance(exc, (httpx.ConnectError, ConnectionError)):
        # streaming SDK calls raise httpx.ConnectError, the others ConnectionError
        return UpstreamError(f"Ollama is not reachable at {ollama_host}", 503)
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(f"Ollama at {ollama_host} timed out", 504)
    if isinstance(exc, httpx.HTTPError):
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
"""Idle connections to Ollama kept for the next job. Few: httpcore's pool polls every idle
connection's socket each time a request starts or ends, which costs more than a connection per
job once dozens wait (the relay benchmark's saturation shape: the node's CPU per token went from
41 to 72 µs with 64 kept); one or two jobs at a time reuse theirs, and skip a connect each."""


def limits() -> httpx.Limits:
    return httpx.Limits(max_connections=None, max_keepalive_connections=KEEP_OPEN)


def sdk_client(settings: Settings, **httpx_kwargs: Any) -> ollama.AsyncClient:
    """The ollama SDK's client for this node's Ollama (``httpx_kwargs`` go to httpx: tests pass a transport)."""
    httpx_kwargs.setdefault("limits", limits())
    return ollama.AsyncClient(host=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                              **httpx_kwargs)


def relay_client(settings: Settings, **httpx_kwargs: Any) -> httpx.AsyncClient:
    """A plain client on the same Ollama, for passing its answers through byte for byte."""
    httpx_kwargs.setdefault("limits", limits())
    if os.getenv("OLLAMA_API_KEY"):  # as the SDK does
        httpx_kwargs.setdefault("headers", {"authorization": f"Bearer {os.environ['OLLAMA_API_KEY']}"})
    return httpx.AsyncClient(base_url=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                             **httpx_kwargs)
