"""What the libraries on the relay's path cost alone: the floor under ODLA's CPU per request.

    .venv/bin/python bench/floors.py [--requests 2000] [--smoke]

Servers, each in its own process on uvicorn (uvloop, httptools) as ODLA serves, answering a POST
with two JSON lines (a token and the final line), 100 requests at once from an aiohttp client;
CPU per request read from the server's /proc/<pid>/task/*/schedstat:

- **ASGI**: a bare ASGI app, no framework: what uvicorn costs;
- **FastAPI**: a FastAPI route returning Starlette's ``StreamingResponse``;
- **LineStream**: the same route returning ODLA's ``LineStream`` (``odla.serving.responses``:
  the task group that listens for the client while it streams).

Clients, each in this process against the bare ASGI server, 1 and 100 requests at once, the body
read as it arrives; CPU per request from ``getrusage``: aiohttp (what the operator asks its nodes
with, and the node its Ollama), httpx (what the ollama SDK runs on) with its connection pool
keeping every connection, and keeping two.

Relays of the simulator's answer (50 tokens), one request at a time as the relay benchmark's serial
shape, each piece passed on as it arrives (aiohttp): a bare ASGI app, and a FastAPI route with a
``StreamingResponse``; CPU per token and per request: what a relay costs on these libraries with
none of ODLA's work (scheduling, receipts, metrics, the client's disconnect watched).

Prints a table and writes bench/results/floors.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.relay_bench import cpu_ns, free_port, pids_of, wait_port  # noqa: E402

LINES = (b'{"token": "a", "done": false}\n', b'{"done": true}\n')
TOKENS = 50
"The relays' answers: as the relay benchmark's serial shape."


# --- the servers (run as ``floors.py --serve KIND --port N``) ----------------------------------------

async def bare(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
    await send({"type": "http.response.body", "body": LINES[0], "more_body": True})
    await send({"type": "http.response.body", "body": LINES[1], "more_body": False})


def framework(kind: str):
    from odla.serving.responses import LineStream

    app = FastAPI()

    async def lines():
        for line in LINES:
            yield line

    @app.post("/run")
    async def run(request: Request):
        json.loads(await request.body())
        if kind == "FastAPI":
            return StreamingResponse(lines(), media_type="application/x-ndjson")
        return LineStream(lines())
    return app


def relaying(kind: str, upstream: str):
    """A relay of the upstream's answer, each piece passed on as it arrives (aiohttp, as the
    operator reads its nodes): bare ASGI, or a FastAPI route with a ``StreamingResponse``."""
    session: list[aiohttp.ClientSession] = []

    async def pieces(body: bytes):
        if not session:
            session.append(aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)))
        async with session[0].post(upstream, data=body) as resp:
            async for data in resp.content.iter_any():
                yield data

    async def closed() -> None:
        if session:
            await session.pop().close()

    async def bare_relay(scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            await bare(scope, receive, send)
            await closed()
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/x-ndjson")]})
        async for data in pieces(body):
            await send({"type": "http.response.body", "body": data, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    if kind == "ASGI relay":
        return bare_relay

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await closed()

    app = FastAPI(lifespan=lifespan)

    @app.post("/run")
    async def run(request: Request):
        return StreamingResponse(pieces(await request.body()), media_type="application/x-ndjson")
    return app


def serve(kind: str, port: int, upstream: str = "") -> None:
    import uvicorn

    app = bare if kind == "ASGI" else relaying(kind, upstream) if kind.endswith("relay") else framework(kind)
    uvicorn.run(app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_level="warning",
                access_log=False)


# --- the measurements ---------------------------------------------------------------------------------

async def load(url: str, requests: int, at_once: int = 100) -> None:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one(i: int) -> None:
            async with session.post(url, json={"job_id": f"j{i}"}) as resp:
                assert (await resp.read()).endswith(LINES[1])
        for _ in range(max(1, requests // at_once)):
            await asyncio.gather(*(one(i) for i in range(at_once)))


def server_cost(kind: str, requests: int) -> float:
    """µs of the server's CPU per request, 100 at once."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)], cwd=ROOT)
    try:
        wait_port(port)
        url = f"http://127.0.0.1:{port}/run"
        asyncio.run(load(url, min(300, requests)))  # warm
        pids = pids_of(proc)
        before = cpu_ns(pids)
        asyncio.run(load(url, requests))
        return (cpu_ns(pids) - before) / 1e3 / requests
    finally:
        stop(proc)


def relay_cost(kind: str, requests: int, sim_url: str, tokens: int) -> tuple[float, float]:
    """µs of the relay's CPU per token and per request, one request at a time."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port),
                             "--upstream", f"{sim_url}/api/generate"], cwd=ROOT)
    body = json.dumps({"model": "llama3", "prompt": "p"}).encode()

    async def serially(count: int) -> None:
        async with aiohttp.ClientSession() as session:
            for _ in range(count):
                async with session.post(f"http://127.0.0.1:{port}/run", data=body) as resp:
                    assert (await resp.read()).count(b"\n") == tokens + 1
    try:
        wait_port(port)
        asyncio.run(serially(20))  # warm
        pids = pids_of(proc)
        before = cpu_ns(pids)
        asyncio.run(serially(requests))
        spent = (cpu_ns(pids) - before) / 1e3
        return spent / (requests * tokens), spent / requests
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def client_costs(url: str, requests: int) -> dict[str, dict[int, float]]:
    """µs of this process's CPU per request, per client and requests at once."""
    async def measure(one, at_once: int) -> float:
        rounds = max(3, requests // at_once)
        await asyncio.gather(*(one(i) for i in range(at_once)))  # warm: connections made
        before = own_cpu()
        for _ in range(rounds):
            await asyncio.gather(*(one(i) for i in range(at_once)))
        return (own_cpu() - before) * 1e6 / (rounds * at_once)

    costs: dict[str, dict[int, float]] = {"aiohttp": {}, "httpx, keeping all": {}, "httpx, keeping 2": {}}
    for at_once in (1, 100):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            async def by_aiohttp(i: int) -> None:
                async with session.post(url, json={"job_id": f"j{i}"}) as resp:
                    async for _ in resp.content.iter_any():
                        pass
            costs["aiohttp"][at_once] = await measure(by_aiohttp, at_once)
        for name, keep in (("httpx, keeping all", None), ("httpx, keeping 2", 2)):
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=keep)
            async with httpx.AsyncClient(limits=limits) as client:
                async def by_httpx(i: int) -> None:
                    async with client.stream("POST", url, json={"job_id": f"j{i}"}) as resp:
                        async for _ in resp.aiter_raw():
                            pass
                costs[name][at_once] = await measure(by_httpx, at_once)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--smoke", action="store_true", help="a few requests: that it runs")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "floors.json"))
    args = parser.parse_args()
    if args.serve:
        serve(args.serve, args.port, args.upstream)
        return
    requests = 100 if args.smoke else args.requests
    import uvloop
    servers = {kind: server_cost(kind, requests) for kind in ("ASGI", "FastAPI", "LineStream")}
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", "ASGI", "--port", str(port)], cwd=ROOT)
    try:
        wait_port(port)
        clients = uvloop.run(client_costs(f"http://127.0.0.1:{port}/run", requests))
    finally:
        stop(proc)
    sim_port = free_port()
    sim = subprocess.Popen([sys.executable, "sim/ollama_sim.py", "--port", str(sim_port), "--tokens", str(TOKENS)],
                           cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(sim_port)
        relays = {kind: relay_cost(kind, max(10, requests // 10), f"http://127.0.0.1:{sim_port}", TOKENS)
                  for kind in ("ASGI relay", "FastAPI relay")}
    finally:
        stop(sim)
    print("server, 100 requests at once        | CPU µs/request")
    print("------------------------------------|---------------")
    for kind, cost in servers.items():
        print(f"{kind + ' on uvicorn':<36}| {cost:.0f}")
    print()
    print("client                              | CPU µs/request, 1 at once | 100 at once")
    print("------------------------------------|---------------------------|------------")
    for name, cost in clients.items():
        print(f"{name:<36}| {cost[1]:<26.0f}| {cost[100]:.0f}")
    print()
    print(f"relay of the simulator's {TOKENS} tokens, one at a time | CPU µs/token | µs/request")
    print("---------------------------------------------|-------------|-----------")
    for kind, (per_token, per_request) in relays.items():
        print(f"{kind + ' (uvicorn, aiohttp)':<45}| {per_token:<12.1f}| {per_request:.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "requests": requests,
                               "servers_us_per_request": servers, "clients_us_per_request": clients,
                               "relays_us_per_token_and_request": relays}, indent=2))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
