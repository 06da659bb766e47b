"""Hostile load run (issue 15): every attack on the operator at once, and an honest client beside.

    .venv/bin/python bench/hostile_bench.py [--smoke]

Starts two simulators, an operator with a join token, an honest node (llama3, 20 fast tokens),
a node for the attackers' streams ("slow": long answers, 2 tokens a second) and a hostile
node (a process of this script) that answers every request with a 150 MB body and keeps
itself registered, so that it is health-checked every interval. It times the honest
client's request alone, then runs, all at once, from a process of its own:

- 1,000 clients that start a long stream and never read it (receive buffer 4 KiB),
- 3,000 connections that never send a byte, reopened as the operator closes them,
- 20,000 registration attempts without the join token (50 connections at a time),

while it times an honest request every half second and samples the operator's memory.
Targets: the operator's peak RSS under 300 MB; every honest request within 2 s of its usual time.
Prints a table and writes bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import PY, ROOT, Procs, free_port, peak_rss_mb, raise_fd_limit, wait_port, wait_registered  # noqa: E402

TOKEN = "hostile-bench-token"
FULL = {"readers": 1000, "silent": 3000, "registrations": 20000, "health_mb": 150, "seconds": 30}
SMOKE = {"readers": 50, "silent": 100, "registrations": 500, "health_mb": 15, "seconds": 6}
RSS_LIMIT_MB = 300
SLOWER_BY_AT_MOST_S = 2.0


# --- the attackers (a process of their own: `--attack`) --------------------------------------------

async def never_read(port: int, count: int, held: list[socket.socket]) -> None:
    """Clients that start a long stream and never read a byte of it."""
    loop = asyncio.get_running_loop()
    body = json.dumps({"model": "slow", "prompt": "never read"}).encode()
    request = (f"POST /inference HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request)
        held.append(sock)
        await asyncio.sleep(0.005)


def closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def stay_silent(port: int, count: int, stop: asyncio.Event, stats: dict) -> None:
    """Connections that never send a byte, reopened as the operator closes them."""
    loop = asyncio.get_running_loop()
    sockets: list[socket.socket] = []

    async def opened() -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        return sock

    try:
        while not stop.is_set():
            for sock in [s for s in sockets if closed(s)]:
                sockets.remove(sock)
                sock.close()
                stats["silent_closed_by_operator"] += 1
            while len(sockets) < count and not stop.is_set():
                try:
                    sockets.append(await opened())
                except OSError:
                    stats["silent_refused"] += 1
                    break
                if len(sockets) % 100 == 0:
                    await asyncio.sleep(0.01)
            stats["silent_open_max"] = max(stats["silent_open_max"], len(sockets))
            await asyncio.sleep(0.5)
    finally:
        for sock in sockets:
            sock.close()


async def register_without_token(port: int, count: int, stats: dict) -> None:
    """Registration attempts with no join token, 50 connections at a time."""
    url = f"http://127.0.0.1:{port}/register"
    left = iter(range(count))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as http:
        async def worker() -> None:
            for i in left:
                try:
                    async with http.post(url, json={"node_id": f"intruder{i}", "url": "http://127.0.0.1:9",
                                                    "models": ["llama3"]}) as resp:
                        await resp.read()
                        key = f"registrations_{resp.status}"
                except aiohttp.ClientError:
                    key = "registrations_failed"
                stats[key] = stats.get(key, 0) + 1
        began = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(50)))
        stats["registrations_seconds"] = round(time.monotonic() - began, 1)


def answered_200(sock: socket.socket) -> bool:
    """Did the operator answer 200 (a stream under way)? Peeked: the bytes stay unread."""
    try:
        return sock.recv(12, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"HTTP/1.1 200"
    except OSError:
        return False


async def attack(port: int, load: dict) -> dict:
    """The silent connections and the never-reading streams open first (a few seconds: these
    are attacks, not a SYN flood), then the registrations come while both are held."""
    stats = {"silent_open_max": 0, "silent_closed_by_operator": 0, "silent_refused": 0}
    stop = asyncio.Event()
    held: list[socket.socket] = []
    began = time.monotonic()
    silent = asyncio.create_task(stay_silent(port, load["silent"], stop, stats))
    await never_read(port, load["readers"], held)
    stats["never_reading_opened_s"] = round(time.monotonic() - began, 1)
    await register_without_token(port, load["registrations"], stats)
    await asyncio.sleep(max(0.0, load["seconds"] - (time.monotonic() - began)))
    stats["never_reading_open"] = sum(not closed(s) for s in held)
    stats["never_reading_streaming"] = sum(answered_200(s) for s in held)
    stop.set()
    await silent
    for sock in held:
        sock.close()
    return stats


# --- the hostile node (a process of its own: `--fat-node`) ------------------------------------------

def fat_node(port: int, megabytes: int) -> None:
    """Answers every request with a ``megabytes`` MB body, 1 MB at a time."""
    chunk = b" " * (1 << 20)

    async def answer(request: web.Request) -> web.StreamResponse:
        print(request.method, request.path, flush=True)  # counted by the run: was it checked?
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.content_length = megabytes << 20
        await resp.prepare(request)
        for _ in range(megabytes):
            await resp.write(chunk)
        return resp

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    web.run_app(app, host="127.0.0.1", port=port, print=None)


# --- the run ------------------------------------------------------------------------------------------

def honest(http: httpx.Client) -> float:
    began = time.monotonic()
    with http.stream("POST", "/inference", json={"model": "llama3", "prompt": "honest"}) as resp:
        lines = [json.loads(line) for line in resp.iter_lines() if line]
    if resp.status_code != 200 or lines[-1] != {"done": True}:
        raise RuntimeError(f"honest request failed: {resp.status_code} {lines[-1:]}")
    return time.monotonic() - began


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="small numbers: checks that it runs (tests)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hostile.json"))
    parser.add_argument("--attack", type=int, help=argparse.SUPPRESS)  # the attackers' process: operator port
    parser.add_argument("--fat-node", type=int, help=argparse.SUPPRESS)  # the hostile node's process: its port
    args = parser.parse_args()
    load = SMOKE if args.smoke else FULL
    raise_fd_limit()
    if args.attack:
        print(json.dumps(asyncio.run(attack(args.attack, load))), flush=True)
        return
    if args.fat_node:
        fat_node(args.fat_node, load["health_mb"])
        return

    workdir = Path(tempfile.mkdtemp(prefix="odla-hostile-"))
    procs = Procs(workdir)
    ports = {k: free_port() for k in ("fast_sim", "slow_sim", "operator", "honest", "slow", "fat")}
    op_url = f"http://127.0.0.1:{ports['operator']}"
    config = workdir / "config.json"
    config.write_text(json.dumps({"operator_url": op_url, "operator_host": "127.0.0.1", "node_host": "127.0.0.1",
                                  "join_token": TOKEN, "health_check_interval": 2, "prune_after": 10,
                                  "jobs_db": ":memory:", "log_level": "warning", "audit_rate": 0}))
    env = {"ODLA_CONFIG": str(config)}
    flag = ["--smoke"] if args.smoke else []
    try:
        procs.start("fast_sim", [PY, "sim/ollama_sim.py", "--port", str(ports["fast_sim"]), "--tokens", "20"])
        procs.start("slow_sim", [PY, "sim/ollama_sim.py", "--port", str(ports["slow_sim"]), "--models", "slow",
                                 "--tokens", "2000", "--delay", "0.5"])
        operator = procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(ports["operator"])})
        for name, sim in (("honest", "fast_sim"), ("slow", "slow_sim")):
            procs.start(name, [PY, "node.py"], {**env, "NODE_ID": name, "NODE_PORT": str(ports[name]),
                                                "OLLAMA_HOST": f"127.0.0.1:{ports[sim]}", "OLLAMA_NUM_PARALLEL": "4096"})
        procs.start("fat", [PY, __file__, "--fat-node", str(ports["fat"]), *flag])
        for port in ports.values():
            wait_port(port)
        wait_registered(ports["operator"], 2)
        with httpx.Client(base_url=op_url, timeout=60) as http:
            fat = {"node_id": "fat", "url": f"http://127.0.0.1:{ports['fat']}", "models": ["fat"]}
            join = {"X-ODLA-Join-Token": TOKEN}
            http.post("/register", json=fat, headers=join).raise_for_status()
            alone = [honest(http) for _ in range(20)]
            usual = statistics.median(alone)
            rss_before = rss_mb(operator.pid)
            attackers = subprocess.Popen([PY, __file__, "--attack", str(ports["operator"]), *flag], cwd=ROOT,
                                         stdout=subprocess.PIPE, text=True, preexec_fn=raise_fd_limit)
            procs.procs["attackers"] = attackers
            under, rss, last_heartbeat = [], [], 0.0
            while attackers.poll() is None:
                if time.monotonic() - last_heartbeat > 2:  # the hostile node keeps itself registered
                    http.post("/register", json=fat, headers=join)
                    last_heartbeat = time.monotonic()
                under.append(honest(http))
                rss.append(rss_mb(operator.pid))
                time.sleep(0.5)
            stats = json.loads(attackers.stdout.read() or "{}")
            after = honest(http)
        peak = peak_rss_mb([operator.pid])
    finally:
        procs.stop()
    stats["fat_health_answers"] = (workdir / "fat.log").read_text().count("GET /health")
    result = {
        "load": load, "attackers": stats,
        "honest_alone_s": {"median": round(usual, 4), "max": round(max(alone), 4)},
        "honest_under_attack_s": {"median": round(statistics.median(under), 4), "max": round(max(under), 4),
                                  "count": len(under)},
        "honest_after_s": round(after, 4),
        "operator_rss_mb": {"before": round(rss_before, 1), "max_sampled": round(max(rss), 1), "peak": round(peak, 1)},
        "targets": {"peak_rss_under_300_mb": peak < RSS_LIMIT_MB,
                    "honest_within_2_s": max(under) - usual <= SLOWER_BY_AT_MOST_S},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\nwritten: {out}")
    if not all(result["targets"].values()):
        sys.exit("hostile bench: a target was missed")


if __name__ == "__main__":
    main()
