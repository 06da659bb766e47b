"""ODLA cluster benchmark: how well jobs are placed on unequal nodes, against nginx in the same run.

    .venv/bin/python bench/cluster_bench.py [--low 20 --high 10] [--smoke]

Four simulated Ollamas, as issue 12 describes them (1.5 s to load a model; llama3 loaded at start):

    A  8 ms a token, 4 slots, 2 models in memory at most     llama3, mistral
    B  20 ms a token, 2 slots, 1 model in memory             llama3, mistral
    C  45 ms a token, 1 slot, 1 model in memory              llama3, mistral
    D  45 ms a token, 1 slot, 1 model in memory              llama3

Open-loop Poisson arrivals, 80 % llama3 and 20 % mistral, 30-150 output tokens each (Ollama's
``options.num_predict``), at 60 % of the cluster's slot throughput for ``--low`` seconds, then
150 % for ``--high`` seconds; a client gives up after 25 s. The same arrivals (same seed) go to:

    round-robin   nginx, per model (the seed's round-robin: only nodes with the model)
    least_conn    nginx ``least_conn``, per model
    odla          the operator's Ollama door (``/api/generate``), four nodes in front of the four
    odla-told     the same operator and nodes again, on fresh simulators: now it knows each node's
                  speed, slots and loaded models, so it stands for the router that is told the truth

Each router gets freshly started simulators. Reported: completed, errors and give-ups seen by
clients, p50/p95/p99 end-to-end latency and time to first token, tokens/s, each node's share,
and model loads. Results also go to bench/results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import (NGINX_CONF, PY, ROOT, Procs, free_port, nginx_location, pct,  # noqa: E402
                         wait_port, wait_registered)

NODES = {  # name: (seconds per token, slots, models in memory at most, models)
    "A": (0.008, 4, 2, "llama3,mistral"),
    "B": (0.020, 2, 1, "llama3,mistral"),
    "C": (0.045, 1, 1, "llama3,mistral"),
    "D": (0.045, 1, 1, "llama3"),
}
LOAD_MS = 1500
GIVE_UP_S = 25.0
MEAN_TOKENS = 90  # 30-150, uniform



@dataclass
class Result:
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    gave_up: int = 0
    sent: int = 0


def arrivals(low_s: float, high_s: float, pace: float = 1.0, seed: int = 7) -> list[tuple[float, str, int]]:
    """(when, model, tokens) for every request: the same list for every router."""
    capacity = sum(slots / (per_token * pace) for per_token, slots, _, _ in NODES.values()) / MEAN_TOKENS  # jobs/s
    rng, out, t = random.Random(seed), [], 0.0
    for rate, until in ((0.6 * capacity, low_s), (1.5 * capacity, low_s + high_s)):
        while True:
            t += rng.expovariate(rate)
            if t >= until:
                t = until
                break
            out.append((t, "llama3" if rng.random() < 0.8 else "mistral", rng.randint(30, 150)))
    return out


async def one(http: httpx.AsyncClient, url: str, model: str, tokens: int, result: Result) -> None:
    began = time.perf_counter()
    body = {"model": model, "prompt": f"job {random.random()}", "options": {"num_predict": tokens}}
    try:
        async with asyncio.timeout(GIVE_UP_S) if hasattr(asyncio, "timeout") else _Timeout(GIVE_UP_S):
            async with http.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    result.errors += 1
                    return
                first, count = None, 0
                async for line in resp.aiter_lines():
                    if not line:
                        continue
                    part = json.loads(line)
                    if "error" in part:
                        result.errors += 1
                        return
                    if first is None:
                        first = time.perf_counter() - began
                    count += 1 if part.get("response") else 0
                    if part.get("done"):
                        result.latency.append(time.perf_counter() - began)
                        result.ttft.append(first)
                        result.tokens += count
                        return
                result.errors += 1  # ended without its final message
    except (TimeoutError, asyncio.TimeoutError):
        result.gave_up += 1
    except httpx.HTTPError:
        result.errors += 1


class _Timeout:
    """asyncio.timeout for Python 3.10."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def __aenter__(self) -> None:
        self.task = asyncio.current_task()
        self.handle = asyncio.get_running_loop().call_later(self.seconds, self.task.cancel)

    async def __aexit__(self, kind, exc, tb) -> bool:
        self.handle.cancel()
        if kind is asyncio.CancelledError:
            raise asyncio.TimeoutError
        return False


async def drive(url_of, plan: list[tuple[float, str, int]]) -> tuple[Result, float]:
    result = Result()
    async with httpx.AsyncClient(timeout=httpx.Timeout(GIVE_UP_S + 5), limits=httpx.Limits(max_connections=None)) as http:
        start, tasks = time.perf_counter(), []
        for at, model, tokens in plan:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.sent += 1
            tasks.append(asyncio.ensure_future(one(http, url_of(model), model, tokens, result)))
        await asyncio.gather(*tasks)
        return result, time.perf_counter() - start


def start_sims(procs: Procs, ports: dict[str, int], tag: str, pace: float = 1.0) -> None:
    """The four simulators; ``pace`` < 1 runs the same cluster faster (tokens and loads alike)."""
    for name, (per_token, slots, max_loaded, models) in NODES.items():
        procs.start(f"sim-{name}-{tag}", [PY, "sim/ollama_sim.py", "--port", str(ports[name]), "--models", models,
                                          "--tokens", "150", "--delay", str(per_token * pace),
                                          "--parallel", str(slots), "--max-loaded", str(max_loaded),
                                          "--load-ms", str(LOAD_MS * pace), "--preload", "llama3"])
    for port in ports.values():
        wait_port(port)


def stop(procs: Procs, prefix: str) -> None:
    for name in [n for n in procs.procs if n.startswith(prefix)]:
        proc = procs.procs.pop(name)
        proc.terminate()
        proc.wait(timeout=10)


def sim_stats(ports: dict[str, int]) -> dict[str, dict]:
    return {name: httpx.get(f"http://127.0.0.1:{port}/_sim/stats").json() for name, port in ports.items()}


def summary(result: Result, seconds: float, stats: dict[str, dict]) -> dict:
    done = len(result.latency)
    return {
        "sent": result.sent, "completed": done, "errors": result.errors, "gave_up": result.gave_up,
        "latency_p50_s": pct(result.latency, 50), "latency_p95_s": pct(result.latency, 95),
        "latency_p99_s": pct(result.latency, 99), "ttft_p50_s": pct(result.ttft, 50),
        "ttft_p95_s": pct(result.ttft, 95), "tokens_per_s": result.tokens / seconds,
        "share": {name: s["requests"] for name, s in stats.items()},
        "model_loads": sum(s["loads"] for s in stats.values()),  # llama3's preloads are not counted
    }


def nginx_conf(workdir: Path, port: int, sim_ports: dict[str, int], balance: str) -> str:
    upstreams, locations = [], []
    for model in ("llama3", "mistral"):
        servers = "".join(f"    server 127.0.0.1:{sim_ports[n]};\n" for n, spec in NODES.items() if model in spec[3])
        upstreams.append(f"  upstream {model} {{\n    {balance}\n{servers}    keepalive 64;\n  }}")
        locations.append(nginx_location(f"/{model}/", model))
    return NGINX_CONF.format(dir=workdir, port=port, upstreams="\n".join(upstreams), locations="\n".join(locations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--low", type=float, default=20, help="seconds at 60 %% of capacity")
    parser.add_argument("--high", type=float, default=10, help="seconds at 150 %% of capacity")
    parser.add_argument("--smoke", action="store_true", help="seconds, ten times faster: checks that it runs (tests)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "cluster.json"))
    args = parser.parse_args()
    low, high, pace = (0.5, 0.1, 0.1) if args.smoke else (args.low, args.high, 1.0)
    plan = arrivals(low, high, pace)
    workdir = Path(tempfile.mkdtemp(prefix="odla-cluster-"))
    procs = Procs(workdir)
    sim_ports = {name: free_port() for name in NODES}
    results: dict[str, dict] = {}
    nginx = ["least_conn"] if args.smoke else ["round-robin", "least_conn"]  # (the smoke run checks the harness)
    routers = (nginx if shutil.which("nginx") else []) + ["odla", "odla-told"]
    print(f"cluster bench: {len(plan)} requests over {low + high:g}s; routers: {', '.join(routers)}", flush=True)
    try:
        for router in routers:
            start_sims(procs, sim_ports, router, pace)
            if router == "odla":
                url_of = start_odla(procs, workdir, sim_ports)
            elif router == "odla-told":  # the same operator and nodes: they know every node's speed now
                time.sleep(3)  # a heartbeat: what the fresh simulators hold in memory
            else:
                port = free_port()
                conf = workdir / f"nginx-{router}.conf"
                conf.write_text(nginx_conf(workdir, port, sim_ports, "least_conn;" if router == "least_conn" else ""))
                procs.start(f"nginx-{router}", ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"])
                wait_port(port)
                url_of = lambda model, port=port: f"http://127.0.0.1:{port}/{model}/api/generate"  # noqa: E731
            result, seconds = asyncio.run(drive(url_of, plan))
            results[router] = summary(result, seconds, sim_stats(sim_ports))
            stop(procs, "sim-")
            stop(procs, "nginx-")
            print(f"  {router}: done", flush=True)
    finally:
        procs.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cost = scheduling_cost()
    out.write_text(json.dumps({"requests": len(plan), "results": results, "scheduling_us_per_job": cost}, indent=2))
    print(table(results))
    print(f"\nscheduling: {cost:.1f} µs of CPU per job (claim and release, four nodes)")
    print(f"\nwritten: {out}")


def start_odla(procs: Procs, workdir: Path, sim_ports: dict[str, int]):
    op_port = free_port()
    config = workdir / "config.json"
    config.write_text(json.dumps({"operator_url": f"http://127.0.0.1:{op_port}", "operator_host": "127.0.0.1",
                                  "node_host": "127.0.0.1", "log_level": "warning", "heartbeat_interval": 2}))
    env = {"ODLA_CONFIG": str(config)}
    procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(op_port)})
    for name, (_, slots, _, _) in NODES.items():
        procs.start(f"node-{name}", [PY, "node.py"], {**env, "NODE_ID": name, "NODE_PORT": str(free_port()),
                                                      "OLLAMA_HOST": f"127.0.0.1:{sim_ports[name]}",
                                                      "OLLAMA_NUM_PARALLEL": str(slots)})
    wait_port(op_port)
    wait_registered(op_port, len(NODES))
    return lambda model: f"http://127.0.0.1:{op_port}/api/generate"


def scheduling_cost(rounds: int = 20000) -> float:
    """Microseconds of operator CPU one job's scheduling takes (claim and release), on this cluster."""
    sys.path.insert(0, str(ROOT))
    from odla.core.protocol import LoadedModel
    from odla.operator.registry import Registry
    from odla.operator.scheduler import Scheduler

    registry = Registry(prune_after=60)
    for name, (per_token, slots, _, models) in NODES.items():
        names = models.split(",")
        registry.register(name, f"http://{name}", names, slots={m: slots for m in names},
                          loaded=[LoadedModel(name="llama3")], tokens_per_s={m: 1 / per_token for m in names})
    scheduler = Scheduler(registry)
    held = [scheduler.try_claim("llama3") for _ in range(3)]  # a busy cluster, not an idle one
    began = time.process_time()
    for _ in range(rounds):
        scheduler.try_claim("llama3").release()
    spent = time.process_time() - began
    for claim in held:
        claim.release()
    return spent / rounds * 1e6


def table(results: dict[str, dict]) -> str:
    rows = [("router", "done/sent", "errors", "gave up", "e2e p50 s", "p95 s", "p99 s", "ttft p50 s", "p95 s",
             "tok/s", "share A/B/C/D", "loads")]
    for router, r in results.items():
        rows.append((router, f"{r['completed']}/{r['sent']}", str(r["errors"]), str(r["gave_up"]),
                     f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}", f"{r['latency_p99_s']:.2f}",
                     f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p95_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                     "/".join(str(r["share"][n]) for n in NODES), str(r["model_loads"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
