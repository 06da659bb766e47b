"""Real servers on real sockets for the tests: uvicorn in threads, and whole processes.

Everything a test starts it stops, by pid for processes, even when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import httpx
import uvicorn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from odla.core.config import Settings  # noqa: E402
from odla.settlement.anvil import ANVIL  # noqa: E402
from sim.ollama_sim import Behaviour, Simulator  # noqa: E402


def bound_socket(port: int = 0) -> socket.socket:
    """A socket bound on 127.0.0.1 (a free port by default), not yet listening."""
    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP,
    # and without it a response written in two parts waits 40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


PORTS_FROM, PORTS_PER_WORKER = 20000, 2000
"""Ports for processes a test starts come from below Linux's ephemeral range (32768-60999), a block
per xdist worker: between ``free_port()`` and the process binding the port, no outbound connection
(the suite makes thousands) and no other worker can take it, as they could a port the kernel chose."""
_ports = itertools.count(os.getpid() % PORTS_PER_WORKER)  # a run after another starts elsewhere in the block


def free_port() -> int:
    """A port free now on 127.0.0.1, for a process to bind; the worker's next in its block."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:]
    first = PORTS_FROM + (int(worker) % 6 if worker.isdigit() else 0) * PORTS_PER_WORKER
    for _ in range(PORTS_PER_WORKER):
        port = first + next(_ports) % PORTS_PER_WORKER
        try:
            with bound_socket(port):
                return port
        except OSError:  # taken (by something else on the machine)
            continue
    with bound_socket() as sock:  # the block is full: any port the kernel gives
        return sock.getsockname()[1]


class ServerThread:
    """An ASGI app served by uvicorn on its own socket and event loop, in a thread."""

    def __init__(self, app: Any, sock: Optional[socket.socket] = None, **config: Any) -> None:
        self.app = app
        self.sock = sock or bound_socket()
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                                timeout_graceful_shutdown=2, **config)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def _serve(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            await self.server.serve(sockets=[self.sock])

        with contextlib.suppress(SystemExit):  # uvicorn's own exit when the app's start-up failed
            asyncio.run(serve())

    def call(self, coroutine: Any, timeout: float = 10) -> Any:
        """Run ``coroutine`` in the server's event loop (as its own tasks would) and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def start(self) -> "ServerThread":
        # Listening before the app starts, as the programs do (odla.serving.lifespan.serve): a node
        # registers during its start-up, and the operator's first health check must wait in the
        # backlog, not be refused (the node would be marked down until its next heartbeat).
        self.sock.listen(2048)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                why = getattr(getattr(self.server.config.app, "state", None), "startup_error", "")
                raise RuntimeError(f"server did not start{': ' + why if why else ''}")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        if self.thread.is_alive():  # say where it hangs: a server that does not stop is a bug to find
            stacks = []
            for task in list(asyncio.all_tasks(self.loop)):
                frames, coro = [], task.get_coro()
                while coro is not None:  # down the chain of awaits, to where it waits
                    frame = getattr(coro, "cr_frame", None) or getattr(coro, "ag_frame", None)
                    if frame is not None:
                        frames.append(f"  {frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}")
                    coro = getattr(coro, "cr_await", None) or getattr(coro, "ag_await", None)
                stacks.append(f"{task.get_name()}:\n" + "\n".join(frames))
            sys.__stderr__.write(f"\nserver thread {self.url} did not stop within 10 s; its tasks:\n"
                                 + "\n".join(stacks) + "\n")
        self.sock.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sim(ServerThread):
    """The Ollama simulator, with its knobs."""

    def __init__(self, sock: Optional[socket.socket] = None, **behaviour: Any) -> None:
        self.sim = Simulator(Behaviour(**behaviour))
        super().__init__(self.sim, sock)

    def configure(self, **values: Any) -> None:
        httpx.post(f"{self.url}/_sim/config", json=values).raise_for_status()

    def release(self) -> None:
        httpx.post(f"{self.url}/_sim/release").raise_for_status()

    def stats(self) -> dict:
        return httpx.get(f"{self.url}/_sim/stats").json()


NODE_KEY, OPERATOR_KEY = "0x" + "11" * 32, "0x" + "22" * 32
"In-process tests' keys (no key files in the repository); processes make theirs next to their config."


def settings(**values: Any) -> Settings:
    """Test settings: fast intervals, loopback only."""
    base = dict(operator_host="127.0.0.1", node_host="127.0.0.1", health_check_interval=0.5,
                health_check_timeout=1, heartbeat_interval=0.5, connect_timeout=1, jobs_db=":memory:",
                node_private_key=NODE_KEY, operator_private_key=OPERATOR_KEY, audit_rate=0)
    base.update(values)
    return Settings(**base)


def wait_for(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except (httpx.HTTPError, OSError, ValueError, KeyError):
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        time.sleep(interval)


def node_ids(operator_url: str, **kw: Any) -> set[str]:
    resp = httpx.get(f"{operator_url}/nodes", **kw)
    return {n["node_id"] for n in resp.json()["nodes"]}


def read_stream(resp: httpx.Response) -> list[dict]:
    return [json.loads(line) for line in resp.iter_lines() if line.strip()]


def infer(operator_url: str, prompt: str = "hello", model: str = "llama3", **kw: Any) -> tuple[int, list[dict]]:
    with httpx.stream("POST", f"{operator_url}/inference", json={"model": model, "prompt": prompt},
                      timeout=30, **kw) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, [resp.json()]
        return 200, read_stream(resp)


class Proc:
    """A script of this repo run as a real process; killed by pid on exit."""

    def __init__(self, *args: str, env: Optional[dict[str, str]] = None) -> None:
        self.args = [sys.executable, *args]
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Proc":
        self.log = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: a full pipe would stall it
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=self.env, stdout=self.log,
                                     stderr=subprocess.STDOUT, text=True)
        return self

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> str:
        """Stop the process (SIGKILL if it lingers) and return what it printed."""
        if self.proc is None:
            return ""
        self.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:  # say which, and what it said last: a process that lingers is a bug to find
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            sys.__stderr__.write(f"\nprocess {' '.join(self.args[1:])} did not stop within {timeout:g} s of signal "
                                 f"{sig}; the end of its output:\n{self.output()[-2000:]}\n")
        return self.output()

    def __enter__(self) -> "Proc":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_http(url: str, timeout: float = 15) -> None:
    wait_for(lambda: httpx.get(url, timeout=1).status_code < 500, timeout=timeout)


FAST = {"health_check_interval": 0.5, "health_check_timeout": 1, "heartbeat_interval": 0.5,
        "prune_after": 3, "connect_timeout": 1, "audit_rate": 0}
"(No audits unless a test asks: a re-run is a job on a node, which most tests count.)"


class Network:
    """Starts processes and remembers them, so the fixture can stop them all."""

    def __init__(self, tmp_path, stack: contextlib.ExitStack) -> None:
        self.stack = stack
        self.config = tmp_path / "config.json"
        self.op_port = free_port()
        self.op_url = f"http://127.0.0.1:{self.op_port}"
        self.config.write_text(json.dumps({**FAST, "operator_url": self.op_url, "operator_host": "127.0.0.1",
                                           "node_host": "127.0.0.1"}))
        self.nodes: dict[str, Proc] = {}
        self.sims: dict[str, Proc] = {}

    def start(self, *args: str, **env: str) -> Proc:
        return self.stack.enter_context(Proc(*args, env={"ODLA_CONFIG": str(self.config), **env}))

    def sim(self, *flags: str) -> str:
        """A simulator process; its URL (its process: ``sims[url]``)."""
        port = free_port()
        proc = self.start("sim/ollama_sim.py", "--port", str(port), "--models", "llama3", *flags)
        url = f"http://127.0.0.1:{port}"
        self.sims[url] = proc
        self.answers(proc, url)
        return url

    def operator(self, **config: Any) -> Proc:
        """The operator, with ``config`` added to the network's config file (which nodes started later read too)."""
        if config:
            self.config.write_text(json.dumps({**json.loads(self.config.read_text()), **config}))
        proc = self.start("server.py", operator_port=str(self.op_port))
        self.answers(proc, f"{self.op_url}/health")
        return proc

    @staticmethod
    def answers(proc: Proc, url: str, timeout: float = 30) -> None:
        """Wait for a process just started to answer at ``url`` (slowly beside busy workers); when it
        does not, the failure says what it printed."""
        try:
            wait_http(url, timeout)
        except AssertionError:
            raise AssertionError(f"{' '.join(proc.args[1:])} did not answer at {url} within {timeout:g} s; "
                                 f"it printed:\n{proc.output()[-3000:]}") from None

    def node(self, node_id: str, ollama_url: str, **env: str) -> Proc:
        port = free_port()
        proc = self.nodes[node_id] = self.start("node.py", NODE_ID=node_id, NODE_PORT=str(port),
                                                OLLAMA_HOST=ollama_url, **env)
        return proc

    def sims_url(self) -> str:
        """The only simulator's URL."""
        (url,) = self.sims
        return url

    def listing(self) -> dict:
        return {n["node_id"]: n for n in httpx.get(f"{self.op_url}/nodes", timeout=5).json()["nodes"]}

    def wait_nodes(self, *ids: str, timeout: float = 30) -> None:  # processes start slowly beside busy workers
        """Wait for the operator to list exactly the nodes ``ids``; when it does not, the failure says
        what it listed and what each node process missing from it printed."""
        try:
            wait_for(lambda: set(self.listing()) == set(ids), timeout=timeout)
        except AssertionError:
            try:
                listed = self.listing()
            except (httpx.HTTPError, ValueError) as exc:
                listed = {"(operator)": repr(exc)}
            missing = {i: self.nodes[i].output()[-2000:] for i in ids if i not in listed and i in self.nodes}
            raise AssertionError(f"the operator lists {sorted(listed)} within {timeout:g} s, not {sorted(ids)}; "
                                 + "".join(f"\nnode {i} printed:\n{out}" for i, out in missing.items())) from None




class Anvil:
    """A local EVM chain (Foundry's anvil, from npm: make test installs it) on a free port of
    127.0.0.1, its state kept in ``state`` across a stop and a start; stopped by its pid."""

    def __init__(self, state: Optional[Path] = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        self.proc: Optional[subprocess.Popen] = None

    def start(self) -> "Anvil":
        assert ANVIL.exists(), "anvil is missing: make test installs it (npm ci in contracts/)"
        args = [str(ANVIL), "--host", "127.0.0.1", "--port", str(self.port), "--silent", "--chain-id", "31337"]
        if self.state is not None:
            args += ["--state", str(self.state)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                              timeout=1).json().get("result") == "0x7a69":
                    return self
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise AssertionError("anvil did not start")
            time.sleep(0.1)

    def rpc(self, method: str, *params: Any) -> Any:
        return httpx.post(self.url, json={"jsonrpc": "2.0", "id": 1, "method": method, "params": list(params)},
                          timeout=10).json().get("result")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # anvil writes its --state on the way out
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "Anvil":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisServer:
    """Debian's redis-server on a free port of 127.0.0.1, with no persistence; stopped by its pid."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: Optional[subprocess.Popen] = None

    def __enter__(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        assert exe, "redis-server is missing: make test installs Debian's redis-server"
        self.proc = subprocess.Popen([exe, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.__exit__()
                raise AssertionError("redis-server did not start")
            time.sleep(0.05)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
