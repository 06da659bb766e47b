"""Fixtures: the simulator, operators and nodes served on 127.0.0.1, stopped after each test."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from typing import Any, Callable, Iterator

import pytest

# The tests check ODLA's signatures against eth-account, whose import (eth-keyfile -> py_ecc) raises
# the interpreter's recursion limit to 100,000 for good: deeply nested JSON then overflows the C stack
# of an in-process server's thread (a segfault) instead of raising RecursionError. The limit goes back.
_LIMIT = sys.getrecursionlimit()
import eth_account  # noqa: E402,F401
sys.setrecursionlimit(_LIMIT)

from tests.helpers import Anvil, Network, RedisServer, ServerThread, Sim, bound_socket, settings

import node as node_agent
import server as operator_app


@pytest.fixture
def sim() -> Iterator[Sim]:
    with Sim(models=["llama3:latest", "mistral"], tokens=6) as s:
        yield s


@pytest.fixture
def start() -> Iterator[Callable[..., ServerThread]]:
    """``start(app)`` serves an app until the test ends."""
    with contextlib.ExitStack() as stack:
        def _start(app: Any, sock=None) -> ServerThread:
            return stack.enter_context(ServerThread(app, sock))
        yield _start


@pytest.fixture
def operator(start) -> Callable[..., ServerThread]:
    """``operator(**settings)`` starts an operator."""
    def _operator(**values: Any) -> ServerThread:
        return start(operator_app.create_app(settings(**values)))
    return _operator


@pytest.fixture
def node(start) -> Callable[..., ServerThread]:
    """``node(operator_url, ollama_url, node_id=..., **settings)`` starts a node agent."""
    def _node(operator_url: str, ollama_url: str, node_id: str = "n1", **values: Any) -> ServerThread:
        sock = bound_socket()
        port = sock.getsockname()[1]
        conf = settings(operator_url=operator_url, ollama_host=ollama_url, node_id=node_id,
                        node_port=port, node_url=f"http://127.0.0.1:{port}", **values)
        return start(node_agent.create_app(conf), sock)
    return _node


@pytest.fixture
def net(tmp_path) -> Iterator[Network]:
    """The network as real processes (``python X.py``), all stopped by pid at the end."""
    with contextlib.ExitStack() as stack:
        yield Network(tmp_path, stack)


@pytest.fixture
def anvil(tmp_path) -> Iterator[Anvil]:
    """A local chain of the test's own (anvil), on a free port; stopped by its pid."""
    with Anvil(tmp_path / "anvil-state.json") as chain:
        yield chain


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own, on a free port; stopped by its pid."""
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is missing in CI: make test installs Debian's redis-server")
        pytest.skip("redis-server not installed (make test installs it when run as root)")
    with RedisServer() as server:
        yield server
