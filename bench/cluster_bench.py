"""ODLA cluster benchmark: how well jobs are placed on unequal nodes, against nginx and a router told the truth.

    .venv/bin/python bench/cluster_bench.py [--cluster default|second] [--runs 3] [--smoke]

Two clusters of simulated Ollamas (``CLUSTERS``; loading a model takes 1.5 s; each node starts with
its first model loaded):

    default (issue 12's)                                  second (none of us tuned for it)
    A  8 ms a token, 4 slots, 2 in memory  llama3 mistral  E 10 ms, 3 slots, 2 in memory  llama3 mistral qwen
    B 20 ms a token, 2 slots, 1 in memory  llama3 mistral  F 25 ms, 2 slots, 1 in memory  qwen llama3
    C 45 ms a token, 1 slot,  1 in memory  llama3 mistral  G 40 ms, 1 slot,  2 in memory  mistral qwen
    D 45 ms a token, 1 slot,  1 in memory  llama3          H 60 ms, 2 slots, 1 in memory  llama3 mistral
                                                          I 15 ms, 1 slot,  1 in memory  qwen llama3
    80 % llama3, 20 % mistral; 30-150 tokens              50 % llama3, 30 % qwen, 20 % mistral; 20-120 tokens
    20 s at 60 %, 10 s at 150 %; give up after 25 s       8 s at 60 %, 4 s at 150 %; give up after 12 s

Open-loop Poisson arrivals (the rate a share of the cluster's slot throughput), each asking for its
output length (Ollama's ``options.num_predict``). The same arrivals (same seed) go to:

    round-robin   nginx, per model (the seed's round-robin: only nodes with the model)
    least_conn    nginx ``least_conn``, per model
    odla          the operator's Ollama door (``/api/generate``), one node in front of each simulator,
                  the operator started afresh for each run: it learns the nodes' speeds and load
                  times from its jobs
    truth         a router told the truth, in the driver itself: it knows each simulator's speed,
                  slots, load time and memory, and every job's length, tracks what each has loaded
                  and running, and sends each job at once to the one that would finish it first

ODLA and the router told the truth run ``--runs`` times each (nginx once), on fresh simulators
each time. Reported per run: completed, errors and give-ups seen by clients, p50/p95/p99
end-to-end latency and time to first token, tokens/s, each node's share, and model loads; then
ODLA's p95 and loads against the truth's, the issue's targets (at most 1.25× and 1.5×, every
request completed, in every run). Results go to bench/results/cluster-<name>.json.
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
from relay_bench import (NGINX_CONF, PY, ROOT, Procs, free_port, nginx_location, odla_config, pct,  # noqa: E402
                         wait_port, wait_registered)

LOAD_MS = 1500


@dataclass(frozen=True)
class Cluster:
    nodes: dict[str, tuple[float, int, int, str]]
    "name: (seconds per token, slots, models in memory at most, models: the first loaded at start)."
    mix: dict[str, float]
    "Share of the requests per model."
    tokens: tuple[int, int]
    "Output length of a request: uniform in this range."
    low_s: float
    "Seconds at 60 % of capacity, then ``high_s`` at 150 %."
    high_s: float
    give_up_s: float

    @property
    def mean_tokens(self) -> float:
        return sum(self.tokens) / 2


CLUSTERS = {
    "default": Cluster({"A": (0.008, 4, 2, "llama3,mistral"), "B": (0.020, 2, 1, "llama3,mistral"),
                        "C": (0.045, 1, 1, "llama3,mistral"), "D": (0.045, 1, 1, "llama3")},
                       {"llama3": 0.8, "mistral": 0.2}, (30, 150), 20, 10, 25.0),
    "second": Cluster({"E": (0.010, 3, 2, "llama3,mistral,qwen"), "F": (0.025, 2, 1, "qwen,llama3"),
                       "G": (0.040, 1, 2, "mistral,qwen"), "H": (0.060, 2, 1, "llama3,mistral"),
                       "I": (0.015, 1, 1, "qwen,llama3")},
                      {"llama3": 0.5, "qwen": 0.3, "mistral": 0.2}, (20, 120), 8, 4, 12.0),
}
P95_TARGET, LOADS_TARGET = 1.25, 1.5
"ODLA against the router told the truth: p95 end-to-end and model loads at most these multiples."



@dataclass
class Result:
    latency: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: int = 0
    gave_up: int = 0
    sent: int = 0


def arrivals(cluster: Cluster, low_s: float, high_s: float, pace: float = 1.0,
             seed: int = 7) -> list[tuple[float, str, int]]:
    """(when, model, tokens) for every request: the same list for every router."""
    capacity = sum(slots / (per_token * pace) for per_token, slots, _, _ in cluster.nodes.values()) / cluster.mean_tokens
    models, weights = list(cluster.mix), list(cluster.mix.values())
    rng, out, t = random.Random(seed), [], 0.0
    for rate, until in ((0.6 * capacity, low_s), (1.5 * capacity, low_s + high_s)):
        while True:
            t += rng.expovariate(rate)
            if t >= until:
                t = until
                break
            out.append((t, rng.choices(models, weights)[0], rng.randint(*cluster.tokens)))
    return out


async def one(http: httpx.AsyncClient, route, model: str, tokens: int, result: Result, give_up_s: float) -> None:
    began = time.perf_counter()
    body = {"model": model, "prompt": f"job {random.random()}", "options": {"num_predict": tokens}}
    url, done = route(model, tokens)
    try:
        async with asyncio.timeout(give_up_s) if hasattr(asyncio, "timeout") else _Timeout(give_up_s):
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
    finally:
        done()


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


async def drive(route, plan: list[tuple[float, str, int]], give_up_s: float) -> tuple[Result, float]:
    """Send ``plan`` through ``route(model, tokens) -> (url, done)``; ``done()`` is called when the request ends."""
    result = Result()
    async with httpx.AsyncClient(timeout=httpx.Timeout(give_up_s + 5), limits=httpx.Limits(max_connections=None)) as http:
        start, tasks = time.perf_counter(), []
        for at, model, tokens in plan:
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            result.sent += 1
            tasks.append(asyncio.ensure_future(one(http, route, model, tokens, result, give_up_s)))
        await asyncio.gather(*tasks)
        return result, time.perf_counter() - start


class Truth:
    """A router told the truth: each simulator's speed, slots, load time and memory, every job's
    length. It tracks what each has loaded (least recently used first out, as the simulator evicts)
    and the end of every job it sent there, and sends a job at once to the node that would finish
    it first; the simulator queues it behind its slots as Ollama does."""

    def __init__(self, cluster: Cluster, ports: dict[str, int], pace: float) -> None:
        self.cluster, self.ports, self.pace = cluster, ports, pace
        self.ends: dict[str, list[tuple[float, str]]] = {name: [] for name in cluster.nodes}
        "Per node: (predicted end, model) of every job sent there and not yet ended."
        self.loaded: dict[str, dict[str, float]] = {
            name: {spec[3].split(",")[0]: 0.0} for name, spec in cluster.nodes.items()}
        "Per node: model -> when it was last used (the least recently used goes first)."

    def route(self, model: str, tokens: int):
        now = time.perf_counter()
        best = None
        for name, (per_token, slots, max_loaded, models) in self.cluster.nodes.items():
            if model not in models.split(","):
                continue
            ends = sorted(end for end, _ in self.ends[name])
            start = now if len(ends) < slots else ends[len(ends) - slots]
            load = 0.0
            if model not in self.loaded[name]:
                load = LOAD_MS / 1000 * self.pace
                if len(self.loaded[name]) >= max_loaded:  # a model must go: once one is idle
                    idle_at = [max((e for e, m in self.ends[name] if m == other), default=now)
                               for other in self.loaded[name]]
                    start = max(start, min(idle_at))
            finish = max(start, now) + load + tokens * per_token * self.pace
            if best is None or finish < best[0]:
                best = (finish, name, load > 0)
        finish, name, loads = best
        loaded = self.loaded[name]
        if loads and len(loaded) >= self.cluster.nodes[name][2]:
            del loaded[min(loaded, key=loaded.get)]
        loaded[model] = finish
        entry = (finish, model)
        self.ends[name].append(entry)
        return f"http://127.0.0.1:{self.ports[name]}/api/generate", lambda: self.ends[name].remove(entry)


def start_sims(procs: Procs, cluster: Cluster, ports: dict[str, int], tag: str, pace: float = 1.0) -> None:
    """The simulators; ``pace`` < 1 runs the same cluster faster (tokens and loads alike)."""
    for name, (per_token, slots, max_loaded, models) in cluster.nodes.items():
        procs.start(f"sim-{name}-{tag}", [PY, "sim/ollama_sim.py", "--port", str(ports[name]), "--models", models,
                                          "--tokens", str(cluster.tokens[1]), "--delay", str(per_token * pace),
                                          "--parallel", str(slots), "--max-loaded", str(max_loaded),
                                          "--load-ms", str(LOAD_MS * pace), "--preload", models.split(",")[0]])
    for port in ports.values():
        wait_port(port)


def stop(procs: Procs, prefix: str) -> None:
    for name in [n for n in procs.procs if n.startswith(prefix)]:
        proc = procs.procs.pop(name)
        proc.terminate()
        proc.wait(timeout=10)


def cold_picks(op_url: str) -> list[dict]:
    """ODLA's jobs whose first pick was predicted to load the model: when, where, and its prediction."""
    jobs = httpx.get(f"{op_url}/jobs", params={"limit": 1000}, timeout=30).json()["jobs"]
    return [{"at": j["started_at"], "model": j["model"], **j["prediction"]} for j in reversed(jobs)
            if (j.get("prediction") or {}).get("load_s")]


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
        "model_loads": sum(s["loads"] for s in stats.values()),  # the preloads are not counted
        "loaded": {name: s.get("loaded", []) for name, s in stats.items() if s.get("loaded")},  # which, where
    }


def nginx_conf(cluster: Cluster, workdir: Path, port: int, sim_ports: dict[str, int], balance: str) -> str:
    upstreams, locations = [], []
    for model in cluster.mix:
        servers = "".join(f"    server 127.0.0.1:{sim_ports[n]};\n" for n, spec in cluster.nodes.items()
                          if model in spec[3].split(","))
        upstreams.append(f"  upstream {model} {{\n    {balance}\n{servers}    keepalive 64;\n  }}")
        locations.append(nginx_location(f"/{model}/", model))
    return NGINX_CONF.format(dir=workdir, port=port, upstreams="\n".join(upstreams), locations="\n".join(locations))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cluster", choices=sorted(CLUSTERS), default="default")
    parser.add_argument("--runs", type=int, default=3, help="runs of ODLA and of the router told the truth")
    parser.add_argument("--smoke", action="store_true", help="seconds, ten times faster, one run: checks that it runs")
    parser.add_argument("--out", default=None, help="default: bench/results/cluster-<cluster>.json")
    args = parser.parse_args()
    cluster = CLUSTERS[args.cluster]
    runs = 1 if args.smoke else args.runs
    low, high, pace = (0.5, 0.1, 0.1) if args.smoke else (cluster.low_s, cluster.high_s, 1.0)
    give_up = cluster.give_up_s * (0.5 if args.smoke else 1.0)
    plan = arrivals(cluster, low, high, pace)
    workdir = Path(tempfile.mkdtemp(prefix="odla-cluster-"))
    procs = Procs(workdir)
    sim_ports = {name: free_port() for name in cluster.nodes}
    results: dict[str, dict] = {}
    nginx = ["least_conn"] if args.smoke else ["round-robin", "least_conn"]  # (the smoke run checks the harness)
    routers = (nginx if shutil.which("nginx") else []) + [f"{r}{'' if runs == 1 else f' #{i}'}"
                                                        for i in range(1, runs + 1) for r in ("odla", "truth")]
    print(f"cluster bench ({args.cluster}): {len(plan)} requests over {low + high:g}s; "
          f"routers: {', '.join(routers)}", flush=True)
    try:
        for router in routers:
            start_sims(procs, cluster, sim_ports, router.replace(" #", "-"), pace)
            kind = router.split(" ")[0]
            if kind == "odla":
                route = start_odla(procs, cluster, workdir, sim_ports)
            elif kind == "truth":
                route = Truth(cluster, sim_ports, pace).route
            else:
                port = free_port()
                conf = workdir / f"nginx-{router}.conf"
                conf.write_text(nginx_conf(cluster, workdir, port, sim_ports,
                                           "least_conn;" if router == "least_conn" else ""))
                procs.start(f"nginx-{router}", ["nginx", "-c", str(conf), "-p", str(workdir), "-g", "daemon off;"])
                wait_port(port)
                route = lambda model, tokens, port=port: (f"http://127.0.0.1:{port}/{model}/api/generate",  # noqa: E731
                                                          lambda: None)
            result, seconds = asyncio.run(drive(route, plan, give_up))
            results[router] = summary(result, seconds, sim_stats(sim_ports))
            if kind == "odla":  # the jobs it sent where it took the model not to be loaded, and why
                results[router]["cold_picks"] = cold_picks(route("", 0)[0].rsplit("/api/", 1)[0])
            for prefix in ("sim-", "nginx-", "operator", "node-"):
                stop(procs, prefix)
            print(f"  {router}: done", flush=True)
    finally:
        procs.stop()
    verdict = judge(results)
    out = Path(args.out or ROOT / "bench" / "results" / f"cluster-{args.cluster}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    cost = {str(n): scheduling_cost(n) for n in (len(cluster.nodes), 100)}
    out.write_text(json.dumps({"cluster": args.cluster, "requests": len(plan), "results": results,
                               "against_truth": verdict, "scheduling_us_per_job": cost}, indent=2))
    print(table(cluster, results))
    for run, v in verdict["runs"].items():
        print(f"\n{run}: p95 {v['p95_ratio']:.2f}× the truth's (target <= {P95_TARGET}), "
              f"model loads {v['loads_ratio']:.2f}× (target <= {LOADS_TARGET}), "
              f"{'every request completed' if v['all_completed'] else 'NOT every request completed'}")
    print(f"targets {'held' if verdict['held'] else 'NOT held'} in every run")
    print("\nscheduling: " + ", ".join(f"{us:.1f} µs of CPU per job with {n} nodes" for n, us in cost.items())
          + " (claim, release and the speed learned; the median of 5 runs)")
    print(f"\nwritten: {out}")


def judge(results: dict[str, dict]) -> dict:
    """ODLA's run against the truth's run of the same number: p95 and loads as multiples of the truth's."""
    runs = {}
    for name, odla in results.items():
        if not name.startswith("odla"):
            continue
        truth = results[name.replace("odla", "truth")]
        runs[name] = {
            "p95_ratio": odla["latency_p95_s"] / truth["latency_p95_s"] if truth["latency_p95_s"] else float("inf"),
            "loads_ratio": odla["model_loads"] / max(truth["model_loads"], 1),
            "all_completed": odla["completed"] == odla["sent"],
        }
    held = all(v["p95_ratio"] <= P95_TARGET and v["loads_ratio"] <= LOADS_TARGET and v["all_completed"]
               for v in runs.values())
    return {"runs": runs, "held": held}


def start_odla(procs: Procs, cluster: Cluster, workdir: Path, sim_ports: dict[str, int]):
    op_port = free_port()
    env = odla_config(workdir, op_port, heartbeat_interval=2, audit_rate=0, jobs_db=str(workdir / f"jobs-{op_port}.db"))
    procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(op_port)})
    for name, (_, slots, max_loaded, _) in cluster.nodes.items():  # each told its Ollama's settings, as its owner would
        procs.start(f"node-{name}", [PY, "node.py"], {**env, "NODE_ID": name, "NODE_PORT": str(free_port()),
                                                      "OLLAMA_HOST": f"127.0.0.1:{sim_ports[name]}",
                                                      "OLLAMA_NUM_PARALLEL": str(slots),
                                                      "OLLAMA_MAX_LOADED_MODELS": str(max_loaded)})
    wait_port(op_port)
    wait_registered(op_port, len(cluster.nodes))
    url = f"http://127.0.0.1:{op_port}/api/generate"
    return lambda model, tokens: (url, lambda: None)


def scheduling_cost(nodes: int, rounds: int = 2000, repeats: int = 5) -> float:
    """Microseconds of operator CPU one job's scheduling takes: its claim, its release, and the
    node's speed learned from its answer (which keeps the nodes in order of speed), with ``nodes``
    nodes of 10-59 tokens/s, 1-4 slots, two models, two in three warm, and a third of the slots
    busy (taken at random); the median of ``repeats`` runs (this machine is shared)."""
    sys.path.insert(0, str(ROOT))
    from odla.core.protocol import LoadedModel
    from odla.operator.registry import Registry
    from odla.operator.scheduler import Scheduler

    key = "llama3:latest"
    costs = []
    for repeat in range(repeats):
        registry = Registry(prune_after=60)
        for i in range(nodes):
            names = ["llama3", "mistral"]
            node = registry.register(f"n{i}", f"http://n{i}", names, slots={m: 1 + i % 4 for m in names},
                                     loaded=[LoadedModel(name="llama3")] if i % 3 else [])
            node.saw(key, 101, 100 / (10 + i % 50))
        scheduler = Scheduler(registry)
        busy = sum(1 + i % 4 for i in range(nodes)) // 3
        slots = [node for node in registry.nodes() for _ in range(node.slots_for(key))]
        held = [scheduler.hold(node, key, tokens=100) for node in random.Random(repeat).sample(slots, busy)]
        began = time.process_time()
        for _ in range(rounds):
            claim = scheduler.try_claim("llama3", tokens=100)
            if claim is not None:
                claim.release()
                claim.node.saw(key, 101, 100 / claim.node.seen_speed[key])  # the same speed: it keeps its place
        costs.append((time.process_time() - began) / rounds * 1e6)
        for claim in held:
            claim.release()
    return sorted(costs)[len(costs) // 2]


def table(cluster: Cluster, results: dict[str, dict]) -> str:
    names = "/".join(cluster.nodes)
    rows = [("router", "done/sent", "errors", "gave up", "e2e p50 s", "p95 s", "p99 s", "ttft p50 s", "p95 s",
             "tok/s", f"share {names}", "loads")]
    for router, r in results.items():
        rows.append((router, f"{r['completed']}/{r['sent']}", str(r["errors"]), str(r["gave_up"]),
                     f"{r['latency_p50_s']:.2f}", f"{r['latency_p95_s']:.2f}", f"{r['latency_p99_s']:.2f}",
                     f"{r['ttft_p50_s']:.2f}", f"{r['ttft_p95_s']:.2f}", f"{r['tokens_per_s']:.0f}",
                     "/".join(str(r["share"][n]) for n in cluster.nodes), str(r["model_loads"])))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "-|-".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
