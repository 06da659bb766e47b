"""The node's two clients of its local Ollama, both httpx clients used through public API.

- the ollama SDK's ``AsyncClient``, for jobs (``/run``) and listings;
- a plain ``httpx.AsyncClient`` on the same base URL, for the ``/ollama/...`` relay that
  serves the operator's Ollama and OpenAI doors: those pass bytes through untouched,
  which the SDK (it parses every answer into models) cannot do.

Under both, httpx-aiohttp's transport (the SDK passes ``transport=`` on to httpx): aiohttp
parses in C, where httpx's own transport parses every streamed chunk in Python and scans
its whole pool on every request. Measured with ``make bench`` in one run: the node's CPU
per token 31 µs against 57 µs one request at a time, 207 µs against 475 µs with 1,000
open streams. It honours the connect and read timeouts and the environment's proxies and
certificates. aiohttp has no write timeout, so none is set. Its map of aiohttp's errors
calls a refused connection a timeout: ``odla.errors.ollama_failure`` reads the cause.
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
import ollama
from httpx_aiohttp import AiohttpTransport

from .config import Settings

DEFAULT_PORT = 11434


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
    dead node by asking it, see odla/nodes.py); connecting is bounded."""
    return httpx.Timeout(connect=settings.connect_timeout, read=None, write=None, pool=None)


def transport() -> AiohttpTransport:
    """aiohttp under httpx, with no cap on connections (aiohttp's default, 100, would queue the
    101st stream out of sight), and proxies from the environment (HTTP_PROXY, NO_PROXY: httpx
    reads none once given a transport, so aiohttp does). Create it in a running event loop;
    closing the client closes it."""
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), trust_env=True)
    return AiohttpTransport(client=session)


def sdk_client(settings: Settings, **httpx_kwargs: Any) -> ollama.AsyncClient:
    """The ollama SDK's client for this node's Ollama (``httpx_kwargs`` go to httpx: tests pass a transport)."""
    httpx_kwargs.setdefault("transport", transport())
    return ollama.AsyncClient(host=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                              **httpx_kwargs)


def relay_client(settings: Settings, **httpx_kwargs: Any) -> httpx.AsyncClient:
    """A plain client on the same Ollama, for passing its answers through byte for byte."""
    httpx_kwargs.setdefault("transport", transport())
    if os.getenv("OLLAMA_API_KEY"):  # as the SDK does
        httpx_kwargs.setdefault("headers", {"authorization": f"Bearer {os.environ['OLLAMA_API_KEY']}"})
    return httpx.AsyncClient(base_url=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                             **httpx_kwargs)
