"""A node left at its default slots in front of an Ollama that runs 8 at once: does it learn?

    .venv/bin/python bench/capacity_bench.py [--smoke]

Starts a simulator that runs ``--parallel`` (8) requests per model at once, an operator, and a node
that is not told (no ``OLLAMA_NUM_PARALLEL``); then, on fresh processes, the same with the node told
the truth (``OLLAMA_NUM_PARALLEL=8``; not in a ``--smoke`` run). Each gets ``--requests`` streamed requests of 50 tokens from
``--clients`` clients at once, who give up after ``--patience`` seconds. Reports time to first token,
how many gave up, when the learning node reached 7 slots, and the mean length of Ollama's queue
(the simulator's ``queue_s`` over the run). Writes bench/results/capacity.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import PY, ROOT, Procs, free_port, pct, raise_fd_limit, wait_port, wait_registered  # noqa: E402

FULL = {"requests": 400, "clients": 100, "patience": 30.0}
SMOKE = {"requests": 10, "clients": 4, "patience": 30.0}


async def drive(url: str, plan: dict, slots_seen: list[tuple[float, int]]) -> dict:
    began = time.monotonic()
    ttfts: list[float] = []
    gave_up = errors = 0
    queue = iter(range(plan["requests"]))

    async with httpx.AsyncClient(timeout=httpx.Timeout(plan["patience"], connect=5),
                                 limits=httpx.Limits(max_connections=plan["clients"] + 10)) as http:
        async def one(i: int) -> None:
            nonlocal errors
            sent, first = time.monotonic(), True
            async with http.stream("POST", f"{url}/inference", json={"model": "llama3", "prompt": f"p{i}"}) as resp:
                async for line in resp.aiter_lines():
                    if first and '"token"' in line:
                        ttfts.append(time.monotonic() - sent)
                        first = False
                    errors += '"error"' in line

        async def client() -> None:
            nonlocal gave_up
            for i in queue:
                try:
                    await asyncio.wait_for(one(i), plan["patience"])
                except (asyncio.TimeoutError, httpx.TimeoutException):
                    gave_up += 1

        async def watch() -> None:
            while True:
                row = (await http.get(f"{url}/nodes")).json()["nodes"]
                slots = row[0]["slots"].get("llama3:latest", 0) if row else 0
                if not slots_seen or slots_seen[-1][1] != slots:
                    slots_seen.append((round(time.monotonic() - began, 2), slots))
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        await asyncio.gather(*(client() for _ in range(plan["clients"])))
        watcher.cancel()
    return {"seconds": round(time.monotonic() - began, 1), "ttft_p50_s": round(pct(ttfts, 50), 3),
            "ttft_p95_s": round(pct(ttfts, 95), 3), "answered": len(ttfts), "gave_up": gave_up, "errors": errors}


def run(name: str, told: bool, parallel: int, plan: dict) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix=f"odla-capacity-{name}-"))
    procs = Procs(workdir)
    ports = {k: free_port() for k in ("sim", "operator", "node")}
    config = workdir / "config.json"
    config.write_text(json.dumps({"operator_url": f"http://127.0.0.1:{ports['operator']}", "log_level": "warning",
                                  "operator_host": "127.0.0.1", "node_host": "127.0.0.1", "jobs_db": ":memory:",
                                  "audit_rate": 0}))
    try:
        procs.start("sim", [PY, "sim/ollama_sim.py", "--port", str(ports["sim"]), "--models", "llama3",
                            "--tokens", "50", "--delay", "0.02", "--num-parallel", str(parallel), "--preload", "llama3"])
        procs.start("operator", [PY, "server.py"], {"ODLA_CONFIG": str(config), "operator_port": str(ports["operator"])})
        procs.start("node", [PY, "node.py"], {"ODLA_CONFIG": str(config), "NODE_ID": "n1", "NODE_PORT": str(ports["node"]),
                                              "OLLAMA_HOST": f"127.0.0.1:{ports['sim']}",
                                              "OLLAMA_NUM_PARALLEL": str(parallel) if told else ""})
        for port in ports.values():
            wait_port(port)
        wait_registered(ports["operator"], 1)
        slots: list[tuple[float, int]] = []
        result = asyncio.run(drive(f"http://127.0.0.1:{ports['operator']}", plan, slots))
        stats = httpx.get(f"http://127.0.0.1:{ports['sim']}/_sim/stats").json()
    finally:
        procs.stop()
    reached = next((t for t, n in slots if n >= parallel - 1), None)
    return {**result, "slots_over_time": slots, f"reached_{parallel - 1}_slots_s": reached,
            "ollama_mean_queue": round(stats["queue_s"] / max(result["seconds"], 1e-9), 2), "ollama_queued": stats["queued"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a short run: checks that it runs (tests)")
    parser.add_argument("--parallel", type=int, default=8, help="requests the simulator runs at once")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "capacity.json"))
    args = parser.parse_args()
    raise_fd_limit()
    plan = SMOKE if args.smoke else FULL
    runs = (("learned", False),) if args.smoke else (("learned", False), ("told", True))  # smoke: the learning only
    results = {name: run(name, told, args.parallel, plan) for name, told in runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plan": plan, "parallel": args.parallel, "results": results}, indent=2))
    print(f"{'node':<8} | answered | gave up | ttft p50 s | p95 s | reached {args.parallel - 1} slots | Ollama's mean queue")
    for name, r in results.items():
        print(f"{name:<8} | {r['answered']:>8} | {r['gave_up']:>7} | {r['ttft_p50_s']:>10} | {r['ttft_p95_s']:>5} | "
              f"{str(r[f'reached_{args.parallel - 1}_slots_s']) + ' s':>15} | {r['ollama_mean_queue']}")
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
