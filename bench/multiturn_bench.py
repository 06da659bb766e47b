"""Conversations on several nodes: does the next turn go where its history is cached?

    .venv/bin/python bench/multiturn_bench.py [--smoke]

Four simulated Ollamas, each running 10 requests at once (``--parallel``), 10 ms a token, and a
prompt cache per slot as Ollama's runner keeps one: reading a prompt token the slot has not cached
costs 1 ms (``--prompt-ms-per-token``), and a request takes the free slot sharing the longest prefix
with its prompt. 40 conversations of 8 turns each go through ODLA's ``/api/chat``: each has its own
system prompt of 300 words, each turn a user message of 250 words and an answer of 60 tokens, so a
history grows to about 2,800 tokens; between turns a conversation's user thinks for a random time
(2.5 s on average), which keeps the slots about 70 % busy. The same conversations run twice, on
fresh processes: with the operator's ``affinity`` on (its default) and off. Reported: time to first
token and end-to-end latency (p50, p95), and the share of prompt tokens the simulators found cached.
Writes bench/results/multiturn.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import PY, ROOT, Procs, free_port, odla_config, pct, wait_port, wait_registered  # noqa: E402

FULL = {"conversations": 40, "turns": 8, "system_words": 300, "user_words": 250, "answer": 60, "think_s": 2.5,
        "nodes": 4, "parallel": 10, "delay": 0.01, "prompt_ms": 1.0}
SMOKE = {"conversations": 6, "turns": 3, "system_words": 60, "user_words": 40, "answer": 8, "think_s": 0.2,
         "nodes": 2, "parallel": 3, "delay": 0.002, "prompt_ms": 1.0}
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


async def conversation(http: httpx.AsyncClient, url: str, k: int, plan: dict, out: dict) -> None:
    rng = random.Random(k)
    messages = [{"role": "system", "content": f"conversation {k}: " + words(rng, plan["system_words"])}]
    await asyncio.sleep(rng.uniform(0, plan["think_s"] * 2))  # they do not all begin at once
    for turn in range(plan["turns"]):
        messages.append({"role": "user", "content": words(rng, plan["user_words"])})
        began, first, answer = time.monotonic(), None, []
        body = {"model": "llama3", "messages": messages, "options": {"num_predict": plan["answer"]}}
        async with http.stream("POST", url, json=body) as resp:
            async for line in resp.aiter_lines():
                if not line:
                    continue
                part = json.loads(line)
                if "error" in part:
                    out["errors"] += 1
                    return
                if first is None:
                    first = time.monotonic() - began
                answer.append(part.get("message", {}).get("content", ""))
        out["ttft"].append(first)
        out["e2e"].append(time.monotonic() - began)
        messages.append({"role": "assistant", "content": "".join(answer)})
        await asyncio.sleep(rng.expovariate(1 / plan["think_s"]))


def run(affinity: bool, plan: dict) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="odla-multiturn-"))
    procs = Procs(workdir)
    sims = [free_port() for _ in range(plan["nodes"])]
    op_port = free_port()
    try:
        for i, port in enumerate(sims):
            procs.start(f"sim-{i}", [PY, "sim/ollama_sim.py", "--port", str(port), "--models", "llama3",
                                     "--preload", "llama3", "--parallel", str(plan["parallel"]),
                                     "--tokens", str(plan["answer"]), "--delay", str(plan["delay"]),
                                     "--prompt-ms-per-token", str(plan["prompt_ms"])])
        for port in sims:
            wait_port(port)
        env = odla_config(workdir, op_port, heartbeat_interval=2, affinity=affinity, audit_rate=0,
                          jobs_db=str(workdir / "jobs.db"))
        procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(op_port)})
        for i, port in enumerate(sims):
            procs.start(f"node-{i}", [PY, "node.py"], {**env, "NODE_ID": f"n{i}", "NODE_PORT": str(free_port()),
                                                       "OLLAMA_HOST": f"127.0.0.1:{port}",
                                                       "OLLAMA_NUM_PARALLEL": str(plan["parallel"])})
        wait_port(op_port)
        wait_registered(op_port, plan["nodes"])
        out: dict = {"ttft": [], "e2e": [], "errors": 0}

        async def drive() -> None:
            async with httpx.AsyncClient(timeout=httpx.Timeout(120), limits=httpx.Limits(max_connections=None)) as http:
                url = f"http://127.0.0.1:{op_port}/api/chat"
                await asyncio.gather(*(conversation(http, url, k, plan, out) for k in range(plan["conversations"])))

        began = time.monotonic()
        asyncio.run(drive())
        seconds = time.monotonic() - began
        stats = [httpx.get(f"http://127.0.0.1:{port}/_sim/stats").json() for port in sims]
        prompt = sum(s["prompt_tokens"] for s in stats)
        return {"turns": len(out["ttft"]), "errors": out["errors"], "seconds": seconds,
                "ttft_p50_s": pct(out["ttft"], 50), "ttft_p95_s": pct(out["ttft"], 95),
                "e2e_p50_s": pct(out["e2e"], 50), "e2e_p95_s": pct(out["e2e"], 95),
                "cached_share": sum(s["cached_tokens"] for s in stats) / prompt if prompt else 0.0,
                "requests_per_node": [s["requests"] for s in stats]}
    finally:
        procs.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a few short conversations: checks that it runs")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "multiturn.json"))
    args = parser.parse_args()
    plan = SMOKE if args.smoke else FULL
    print(f"multi-turn bench: {plan['conversations']} conversations of {plan['turns']} turns on {plan['nodes']} nodes",
          flush=True)
    results = {}
    for name, affinity in (("affinity", True), ("no affinity", False)):
        results[name] = run(affinity, plan)
        print(f"  {name}: done", flush=True)
    on, off = results["affinity"], results["no affinity"]
    ratio = off["ttft_p50_s"] / on["ttft_p50_s"] if on["ttft_p50_s"] else float("inf")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"plan": plan, "results": results, "ttft_p50_ratio": ratio}, indent=2))
    print("run         | turns | errors | ttft p50 s | p95 s | e2e p50 s | p95 s | prompt cached | per node")
    for name, r in results.items():
        print(f"{name:<11} | {r['turns']:>5} | {r['errors']:>6} | {r['ttft_p50_s']:>10.2f} | {r['ttft_p95_s']:>5.2f} | "
              f"{r['e2e_p50_s']:>9.2f} | {r['e2e_p95_s']:>5.2f} | {r['cached_share']:>12.0%} | {r['requests_per_node']}")
    print(f"\ntime to first token p50: {ratio:.1f}× lower with affinity (target: at least 2×)")
    print(f"written: {out}")


if __name__ == "__main__":
    main()
