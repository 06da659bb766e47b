"""The node's two clients of its local Ollama, both on httpx and both through public API.

- the ollama SDK's ``AsyncClient``, for jobs (``/run``) and listings;
- a plain ``httpx.AsyncClient`` on the same base URL, for the ``/ollama/...`` relay that
  serves the operator's Ollama and OpenAI doors: those pass bytes through untouched,
  which the SDK (it parses every answer into models) cannot do.

Both use httpx's own transport, so every httpx setting holds: timeouts, ``verify``,
proxies from the environment. Why not ``httpx-aiohttp``'s transport: see ``bench/README``
in the main README (measured: no gain worth a second HTTP stack under the SDK).
"""

from __future__ import annotations

import ipaddress
import os
from typing import Any
from urllib.parse import urlsplit

import httpx
import ollama

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
    dead node by asking it, see odla/nodes.py); connecting and sending are bounded."""
    return httpx.Timeout(connect=settings.connect_timeout, read=None, write=30, pool=None)


# httpx's default pool holds 100 connections and queues the rest out of sight: none here.
LIMITS = httpx.Limits(max_connections=None, max_keepalive_connections=256, keepalive_expiry=30)


def sdk_client(settings: Settings, **httpx_kwargs: Any) -> ollama.AsyncClient:
    """The ollama SDK's client for this node's Ollama (``httpx_kwargs`` go to httpx: tests pass a transport)."""
    httpx_kwargs.setdefault("limits", LIMITS)
    return ollama.AsyncClient(host=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                              **httpx_kwargs)


def relay_client(settings: Settings, **httpx_kwargs: Any) -> httpx.AsyncClient:
    """A plain client on the same Ollama, for passing its answers through byte for byte."""
    httpx_kwargs.setdefault("limits", LIMITS)
    if os.getenv("OLLAMA_API_KEY"):  # as the SDK does
        httpx_kwargs.setdefault("headers", {"authorization": f"Bearer {os.environ['OLLAMA_API_KEY']}"})
    return httpx.AsyncClient(base_url=ollama_base_url(settings.ollama_host), timeout=timeouts(settings),
                             **httpx_kwargs)
