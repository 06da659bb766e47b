"""ODLA relay benchmark: what the operator and node add on top of Ollama.

    make bench                      (or: .venv/bin/python bench/relay_bench.py [--quick] [--nodes 2])

Starts the Ollama simulator, one operator and one (or two) nodes, and, where nginx is
installed, an nginx reverse proxy in front of the simulator as the floor of what any
relay costs. Each load shape runs straight at the simulator (direct), through nginx and
through ODLA, interleaved A B C A B C... so that noise falls on all of them; one request at a
time (serial) also runs straight at the node's ``/run``, to show what each hop adds. Prints a
table and writes bench/results/latest.json.

Measured per shape and path: time to first token p50/p99, aggregate tokens/s, failures
(a request without exactly one final line, or with an empty error); per process (sim,
operator, node, nginx): CPU time per relayed token and per request from
/proc/<pid>/task/*/schedstat over the measured windows, and peak RSS (VmHWM). The shapes: serial
(one at a time), paced-100, saturation-50, open-1000 and burst-100 (100 one-token requests at
once: what a request costs alone).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# --- a small HTTP/1.1 client: cheap, so the load generator does not drown what it measures ----------

class Conn:
    """One keep-alive HTTP/1.1 connection that POSTs and reads a chunked JSON-lines stream."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def post_stream(self, path: str, body: bytes) -> tuple[float, int, bytes]:
        """Returns (seconds to the first token line, lines before the last, the last line); places in
        ODLA's queue (``{"queued": n}``) are neither."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port, limit=1 << 20)
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        began = time.perf_counter()
        self.writer.write(head + body)
        status = await self.reader.readline()
        chunked, length, keep = False, None, True
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            chunked |= name == "transfer-encoding" and "chunked" in value
            length = int(value) if name == "content-length" else length
            keep &= not (name == "connection" and value == "close")
        if not status.startswith(b"HTTP/1.1 200"):
            data = await self.reader.readexactly(length) if length else b""
            return 0.0, 0, data or status
        first, lines, last, pending = None, 0, b"", b""
        async for data in self._body(chunked, length):
            pending += data
            if b"\n" not in pending:
                continue
            parts = pending.split(b"\n")
            pending = parts.pop()
            for part in parts:
                if not part or part.startswith(b'{"queued"'):  # a place in ODLA's queue: no token yet
                    continue
                if first is None:
                    first = time.perf_counter() - began
                if last:
                    lines += 1
                last = part
        if not keep:
            self.close()
        return first or 0.0, lines, last

    async def _body(self, chunked: bool, length: Optional[int]):
        if not chunked:
            yield await self.reader.readexactly(length or 0)
            return
        while True:
            size = int((await self.reader.readline()).split(b";")[0], 16)
            if size == 0:
                await self.reader.readline()
                return
            data = await self.reader.readexactly(size + 2)
            yield data[:-2]

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


# --- processes ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Procs:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, name: str, args: list[str], env: Optional[dict] = None) -> subprocess.Popen:
        log = open(self.workdir / f"{name}.log", "w")
        proc = subprocess.Popen(args, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, preexec_fn=raise_fd_limit)
        self.procs[name] = proc
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_port(port: int, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"bench: nothing listening on port {port}")


def pids_of(proc: subprocess.Popen) -> list[int]:
    """The process and its direct children (nginx's workers)."""
    pids = [proc.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == proc.pid:
                pids.append(int(entry.name))
    return pids


def cpu_ns(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


def peak_rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
        except OSError:
            pass
    return total / 1024


NGINX_CONF = """
worker_processes 1;
error_log {dir}/nginx-error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
{upstreams}
  server {{
    listen 127.0.0.1:{port};
{locations}
  }}
}}
"""


def nginx_location(prefix: str, upstream: str) -> str:
    """A streaming reverse proxy to ``upstream``: no buffering, keep-alive upstream connections."""
    return (f"    location {prefix} {{\n      proxy_pass http://{upstream}{'/' if prefix != '/' else ''};\n"
            f"      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n      proxy_buffering off;\n"
            f"      proxy_read_timeout 600s;\n    }}")



# --- load shapes --------------------------------------------------------------------------------

@dataclass
class Shape:
    name: str
    concurrency: int
    requests: int
    tokens: int
    delay: float
    rounds: int


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    failures: int = 0
    seconds: float = 0.0
    cpu: dict[str, int] = field(default_factory=dict)


async def drive(port: int, path: str, shape: Shape, tag: str, extra: Optional[dict] = None,
                model: str = "llama3") -> Run:
    run = Run()
    queue = list(range(shape.requests))

    async def worker() -> None:
        conn = Conn(port)
        try:
            while queue:
                i = queue.pop()
                body = json.dumps({**(extra or {}), "model": model, "prompt": f"{tag} request {i}"}).encode()
                try:
                    first, lines, last = await conn.post_stream(path, body)
                    final = json.loads(last)
                except (OSError, ValueError, asyncio.IncompleteReadError):
                    run.failures += 1
                    conn.close()
                    continue
                ok = final.get("done") is True and "error" not in final and lines == shape.tokens
                if not ok:
                    run.failures += 1
                    continue
                run.ttft.append(first)
                run.tokens += lines
        finally:
            conn.close()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(shape.concurrency)))
    run.seconds = time.perf_counter() - began
    return run


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def summarise(runs: list[Run]) -> dict:
    ttft = [t for r in runs for t in r.ttft]
    tokens = sum(r.tokens for r in runs)
    seconds = sum(r.seconds for r in runs)
    out = {"requests_ok": len(ttft), "failures": sum(r.failures for r in runs), "tokens": tokens,
           "ttft_p50_ms": pct(ttft, 50) * 1000, "ttft_p99_ms": pct(ttft, 99) * 1000,
           "tokens_per_s": tokens / seconds if seconds else 0.0}
    for name in runs[0].cpu if runs else ():
        spent = sum(r.cpu.get(name, 0) for r in runs)
        out[f"cpu_us_per_token_{name}"] = spent / 1000 / tokens if tokens else float("nan")
        out[f"cpu_us_per_request_{name}"] = spent / 1000 / len(ttft) if ttft else float("nan")
    return out


async def measure(path_name: str, port: int, path: str, shape: Shape, watch: dict[str, list[int]],
                  round_no: int, model: str) -> Run:
    before = {name: cpu_ns(pids) for name, pids in watch.items()}
    extra = {"job_id": f"bench-{round_no}"} if path == "/run" else None
    run = await drive(port, path, shape, f"{shape.name}-{path_name}-{round_no}", extra, model)
    run.cpu = {name: cpu_ns(pids) - before[name] for name, pids in watch.items()}
    return run


async def set_sim(port: int, **values) -> None:
    conn = Conn(port)
    try:
        await conn.post_stream("/_sim/config", json.dumps(values).encode())
    finally:
        conn.close()


async def bench(shapes: list[Shape], ports: dict, watch: dict, have_nginx: bool) -> dict:
    results = {}
    direct = {"sim": watch["sim"]}
    paths = [("direct", ports["sim"], "/api/generate", direct, "llama3")]
    if have_nginx:
        paths.append(("nginx", ports["nginx"], "/api/generate", {**direct, "nginx": watch["nginx"]}, "llama3"))
    paths.append(("odla", ports["operator"], "/inference",
                  {**direct, "operator": watch["operator"], "node": watch["node"]}, "llama3"))
    # The same through a node that dialled in (link: dial), with a simulator of its own ("dialled").
    paths.append(("odla-dial", ports["operator"], "/inference",
                  {"sim": watch["sim_dial"], "operator": watch["operator"], "node": watch["node_dial"]}, "dialled"))
    if "operator_redis" in watch:  # the same through an operator on a Redis registry (with its own node)
        paths.append(("odla-redis", ports["operator_redis"], "/inference",
                      {**direct, "operator": watch["operator_redis"], "node": watch["node_redis"],
                       "redis": watch["redis"]}, "llama3"))
    # One request at a time, also straight at the node: what each hop adds, the node's and the operator's.
    node_path = ("node", ports["node"], "/run", {**direct, "node": watch["node"][:1]}, "llama3")
    for shape in shapes:
        shape_paths = [*paths[:2 if have_nginx else 1], node_path, *paths[2 if have_nginx else 1:]] \
            if shape.name == "serial" else paths
        for sim in ("sim", "sim_dial"):
            await set_sim(ports[sim], tokens=shape.tokens, delay=shape.delay)
        # Warmed at the shape's concurrency: the operator gives a node the slots it has seen it answer
        # with (odla.operator.registry.Node.slots_for), so each shape measures the steady state.
        warm = Shape(shape.name, shape.concurrency, shape.concurrency, shape.tokens, 0, 1)
        for name, port, path, _, model in shape_paths:
            await drive(port, path, warm, "warm-" + name, {"job_id": "warm"} if path == "/run" else None, model)
        runs: dict[str, list[Run]] = {name: [] for name, *_ in shape_paths}
        for round_no in range(shape.rounds):
            for name, port, path, w, model in shape_paths:
                runs[name].append(await measure(name, port, path, shape, w, round_no, model))
        results[shape.name] = {name: summarise(r) for name, r in runs.items()}
        results[shape.name]["shape"] = asdict(shape)
        print(f"  {shape.name}: done", flush=True)
    rss = {name: peak_rss_mb(pids) for name, pids in watch.items()}
    return {"shapes": results, "peak_rss_mb": rss}


def shapes_for(quick: bool, smoke: bool = False) -> list[Shape]:
    if smoke:  # seconds, for the test suite: proves the benchmark runs, measures nothing
        return [Shape("serial", 1, 10, 20, 0.0, 1), Shape("paced-100", 10, 10, 10, 0.01, 1),
                Shape("saturation-50", 5, 20, 20, 0.0, 1), Shape("open-1000", 50, 50, 5, 0.05, 1),
                Shape("burst-100", 10, 10, 1, 0.0, 1)]
    k = 0.25 if quick else 1.0
    return [
        Shape("serial", 1, int(200 * k), 50, 0.0, 3),
        Shape("paced-100", 100, 100, 50, 0.02, max(1, int(3 * k))),
        Shape("saturation-50", 50, int(1000 * k), 50, 0.0, 3),
        Shape("open-1000", 1000, 1000, 10, 0.5, 1),
        Shape("burst-100", 100, 100, 1, 0.0, max(1, int(10 * k))),  # a request's own cost: one token each
    ]


def table(result: dict) -> str:
    rows = [("shape", "path", "ttft p50 ms", "ttft p99 ms", "added p50", "added p99", "tok/s", "x direct",
             "CPU µs/tok relay", "CPU µs/req relay", "fail")]
    for shape, per_path in result["shapes"].items():
        direct = per_path["direct"]
        for name in ("direct", "nginx", "node", "odla", "odla-dial", "odla-redis"):
            r = per_path.get(name)
            if r is None:
                continue
            relay, per_request = [
                f"op {r[f'{of}_operator']:.1f} + node {r[f'{of}_node']:.1f}" if name.startswith("odla") else
                f"{r[f'{of}_nginx']:.1f}" if name == "nginx" else
                f"node {r[f'{of}_node']:.1f}" if name == "node" else "-"
                for of in ("cpu_us_per_token", "cpu_us_per_request")]
            added = (r["ttft_p50_ms"] - direct["ttft_p50_ms"], r["ttft_p99_ms"] - direct["ttft_p99_ms"])
            rows.append((shape, name, f"{r['ttft_p50_ms']:.2f}", f"{r['ttft_p99_ms']:.2f}",
                         "-" if name == "direct" else f"{added[0]:+.2f}",
                         "-" if name == "direct" else f"{added[1]:+.2f}",
                         f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / direct['tokens_per_s']:.2f}",
                         relay, per_request, str(r["failures"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    rss = ", ".join(f"{k} {v:.0f} MB" for k, v in result["peak_rss_mb"].items())
    out = "\n".join(lines) + f"\n\npeak RSS: {rss}"
    for path, what in (("odla-dial", "dial link / http link"), ("odla-redis", "Redis registry / in-memory")):
        ratios = ", ".join(f"{shape} {ratio:.2f}x" for shape, ratio in ratios_to_odla(result, path).items())
        out += f"\noperator CPU per token, {what}: {ratios or 'not run'}"
    return out


def ratios_to_odla(result: dict, path: str) -> dict[str, float]:
    """Per shape: the operator's CPU per token on ``path`` over that on the plain ``odla`` path."""
    return {shape: p[path]["cpu_us_per_token_operator"] / p["odla"]["cpu_us_per_token_operator"]
            for shape, p in result["shapes"].items() if path in p}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests")
    parser.add_argument("--smoke", action="store_true", help="tiny loads: checks that it runs (tests)")
    parser.add_argument("--nodes", type=int, default=1, choices=(1, 2))
    parser.add_argument("--only", help="comma-separated shape names")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "latest.json"))
    args = parser.parse_args()
    raise_fd_limit()

    workdir = Path(tempfile.mkdtemp(prefix="odla-bench-"))
    procs = Procs(workdir)
    have_redis = shutil.which("redis-server") is not None
    ports = {k: free_port() for k in ("sim", "sim_dial", "operator", "nginx", "redis", "operator_redis")}
    node_ports = [free_port() for _ in range(args.nodes)]
    have_nginx = shutil.which("nginx") is not None
    try:
        procs.start("sim", [PY, "sim/ollama_sim.py", "--port", str(ports["sim"]), "--models", "llama3"])
        procs.start("sim_dial", [PY, "sim/ollama_sim.py", "--port", str(ports["sim_dial"]), "--models", "dialled"])
        config = workdir / "config.json"
        config.write_text(json.dumps({"operator_url": f"http://127.0.0.1:{ports['operator']}",
                                      "operator_host": "127.0.0.1", "node_host": "127.0.0.1",
                                      "log_level": "warning", "audit_rate": 0}))
        env = {"ODLA_CONFIG": str(config)}
        procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(ports["operator"])})
        for i, port in enumerate(node_ports):
            # the simulator runs any number of requests at once; the node says so, or the operator queues
            procs.start(f"node{i + 1}", [PY, "node.py"], {**env, "NODE_ID": f"node{i + 1}", "NODE_PORT": str(port),
                                                          "OLLAMA_HOST": f"127.0.0.1:{ports['sim']}",
                                                          "OLLAMA_NUM_PARALLEL": "4096"})
        procs.start("node_dial", [PY, "node.py"], {**env, "NODE_ID": "dialled", "NODE_LINK": "dial",
                                                   "OLLAMA_HOST": f"127.0.0.1:{ports['sim_dial']}",
                                                   "OLLAMA_NUM_PARALLEL": "4096"})
        if have_redis:  # a second operator, alone on a Redis, with a node of its own on the same simulator
            procs.start("redis", ["redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"]), "--save", "",
                                  "--appendonly", "no"])
            wait_port(ports["redis"])
            procs.start("operator_redis", [PY, "server.py"], {**env, "operator_port": str(ports["operator_redis"]),
                                                              "ODLA_REDIS_URL": f"redis://127.0.0.1:{ports['redis']}/0"})
            procs.start("node_redis", [PY, "node.py"], {
                **env, "NODE_ID": "node-redis", "NODE_PORT": str(free_port()), "OLLAMA_NUM_PARALLEL": "4096",
                "OLLAMA_HOST": f"127.0.0.1:{ports['sim']}",
                "ODLA_OPERATOR_URL": f"http://127.0.0.1:{ports['operator_redis']}"})
        if have_nginx:
            upstream = f"  upstream ollama {{ server 127.0.0.1:{ports['sim']}; keepalive 1024; }}"
            (workdir / "nginx.conf").write_text(NGINX_CONF.format(dir=workdir, port=ports["nginx"], upstreams=upstream,
                                                                  locations=nginx_location("/", "ollama")))
            procs.start("nginx", ["nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir),
                                  "-g", "daemon off;"])
        skip = {"nginx"} if not have_nginx else set()
        skip |= {"redis", "operator_redis"} if not have_redis else set()
        for port in [*(p for k, p in ports.items() if k not in skip), *node_ports]:
            wait_port(port)
        wait_registered(ports["operator"], args.nodes + 1)
        if have_redis:
            wait_registered(ports["operator_redis"], 1)
        ports["node"] = node_ports[0]
        watch = {"sim": [procs.procs["sim"].pid], "operator": [procs.procs["operator"].pid],
                 "node": [procs.procs[f"node{i + 1}"].pid for i in range(args.nodes)],
                 "sim_dial": [procs.procs["sim_dial"].pid], "node_dial": [procs.procs["node_dial"].pid]}
        if have_nginx:
            watch["nginx"] = pids_of(procs.procs["nginx"])
        if have_redis:
            watch |= {"operator_redis": [procs.procs["operator_redis"].pid], "node_redis": [procs.procs["node_redis"].pid],
                      "redis": [procs.procs["redis"].pid]}
        shapes = shapes_for(args.quick, args.smoke)
        if args.only:
            shapes = [s for s in shapes if s.name in args.only.split(",")]
        print(f"bench: {len(shapes)} shapes, {args.nodes} node(s), nginx {'yes' if have_nginx else 'not installed'}",
              flush=True)
        result = asyncio.run(bench(shapes, ports, watch, have_nginx))
    finally:
        procs.stop()
    result["machine"] = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "nodes": args.nodes,
                         "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten: {out}")


def odla_config(workdir: Path, op_port: int, **settings: object) -> dict[str, str]:
    """A config.json in ``workdir`` for an operator on ``op_port`` and its nodes, on loopback and quiet
    (``settings`` added); the environment that points a process at it."""
    config = workdir / "config.json"
    config.write_text(json.dumps({"operator_url": f"http://127.0.0.1:{op_port}", "operator_host": "127.0.0.1",
                                  "node_host": "127.0.0.1", "log_level": "warning", **settings}))
    return {"ODLA_CONFIG": str(config)}


def wait_registered(port: int, count: int, timeout: float = 30, procs: Optional[Procs] = None) -> None:
    """Until ``count`` nodes are listed; if not in time, which of ``procs`` stopped, and what they said."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"GET /nodes HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            if data.count(b'"node_id"') >= count:
                return
        except OSError:
            pass
        time.sleep(0.1)
    dead = [name for name, proc in (procs.procs.items() if procs else ()) if proc.poll() is not None]
    said = {name: (procs.workdir / f"{name}.log").read_text()[-600:] for name in dead} if procs else {}
    raise SystemExit(f"bench: nodes did not register{f'; stopped: {said}' if said else ''}")


if __name__ == "__main__":
    main()
