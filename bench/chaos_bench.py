"""Chaos run: requests over every door while nodes, links and Redis fail under them.

    .venv/bin/python bench/chaos_bench.py [--smoke] [--requests N]

Starts a redis-server behind a TCP proxy that can be made slow, two operators sharing it, four
simulators (each one node's Ollama: two requests at once, streams cut at random places now and
then, as an Ollama that crashes) and four nodes: three over HTTP and one that dials both
operators, its link to the first through a proxy that can cut it. Then sends ``--requests``
streamed requests, ``--concurrency`` at a time, spread over both operators and over
``/inference``, ``/api/generate``, ``/api/chat``, ``/v1/chat/completions`` (half with
``include_usage``) and ``/v1/completions``; some clients leave at a random moment. Meanwhile,
one fault every ``--every`` seconds, in turn: a node SIGKILLed (and started again), a node
SIGSTOPped for a while, Redis answering 1.3 s late for 3 s, Redis killed and restarted empty, the
dial link cut.

At the end it reports, and checks against the targets:

- **slots held**: jobs each operator still counts on its nodes once every client is done;
- **over-bookings**: requests a simulator had to queue because it was sent more than it runs;
- **tokens lost**: tokens a simulator sent before a break that the client never received (a
  break in Ollama's stream; what a killed, stopped or cut-off node held when it went, and what a
  node whose answer another node finished sent after its last token that arrived, are counted
  apart: no relay can deliver them, and a resumed answer has them from the other node);
- **counts**: per job, the receipt's output tokens against what the client received and the
  simulator sent; and the sum of receipts against the operators' ``odla_output_tokens_total``;
- **final lines**: streams that ended without one (the client did not leave).

Prints a table and writes bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import signal
import sqlite3
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import PY, ROOT, Procs, free_port, raise_fd_limit, wait_port, wait_registered  # noqa: E402

sys.path.insert(0, str(ROOT))
from tests.fakes import Cutter  # noqa: E402  (a TCP forwarder that can be slowed or cut)

FULL = {"requests": 10_000, "concurrency": 24, "every": 3.0}
SMOKE = {"requests": 160, "concurrency": 12, "every": 1.0}
TOKENS, DELAY = 8, 0.004  # per answer; seconds between tokens
CRASH_RATE = 0.02  # the share of Ollama's streams cut mid-answer
LEAVE_RATE = 0.08  # the share of clients that leave at a random moment
NODES = ["n1", "n2", "n3", "d1"]  # d1 dials out
DOORS = ["inference", "generate", "chat", "openai-chat", "openai-completions"]
FAULTS = ["kill", "stop", "slow-redis", "restart-redis", "cut-link"]
MID_STREAM = re.compile(r"node (\S+) failed mid-stream")


@dataclass
class Outcome:
    door: str
    operator: int
    prompt: str
    left: bool = False
    status: int = 0
    job: str = ""
    tokens: int = 0
    final: Optional[str] = None  # "done", or the error it ended with; None: no final line
    extra: int = 0  # lines after the final one
    began: float = 0.0
    ended: float = 0.0


def request_of(door: str, prompt: str, i: int) -> tuple[str, dict]:
    user = [{"role": "user", "content": prompt}]
    return {
        "inference": ("/inference", {"model": "llama3", "prompt": prompt}),
        "generate": ("/api/generate", {"model": "llama3", "prompt": prompt}),
        "chat": ("/api/chat", {"model": "llama3", "messages": user}),
        "openai-chat": ("/v1/chat/completions", {"model": "llama3", "messages": user, "stream": True,
                                                 "stream_options": {"include_usage": i % 2 == 0}}),
        "openai-completions": ("/v1/completions", {"model": "llama3", "prompt": prompt, "stream": True}),
    }[door]


def read_line(door: str, line: str, out: Outcome) -> None:
    """One line of an answer: a token, the final line, an error (which is final too)."""
    if not line:
        return
    if out.final is not None:
        out.extra += 1
        return
    if door.startswith("openai"):
        if not line.startswith("data: "):
            return
        data = line[len("data: "):]
        if data == "[DONE]":
            out.final = out.final or "done"
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            out.final = str(error.get("message") if isinstance(error, dict) else error)
            return
        for choice in event.get("choices") or []:
            out.tokens += bool((choice.get("delta") or {}).get("content") or choice.get("text"))
        return
    obj = json.loads(line)
    if "error" in obj:
        out.final = str(obj["error"])
    elif obj.get("done"):
        out.final = "done"
    elif "token" in obj or obj.get("response") or (obj.get("message") or {}).get("content"):
        out.tokens += 1


async def one(http: httpx.AsyncClient, operators: list[str], i: int, rng: random.Random) -> Outcome:
    door = DOORS[i % len(DOORS)]
    out = Outcome(door=door, operator=(i // len(DOORS)) % len(operators), prompt=f"chaos {i}")
    path, body = request_of(door, out.prompt, i)

    async def run() -> None:
        async with http.stream("POST", operators[out.operator] + path, json=body) as resp:
            out.status, out.job = resp.status_code, resp.headers.get("x-odla-job", "")
            async for line in resp.aiter_lines():
                read_line(door, line, out)
            if resp.status_code != 200 and out.final is None:
                out.final = f"status {resp.status_code}"

    out.began = time.monotonic()
    leave_after = rng.uniform(0.0, 0.06) if rng.random() < LEAVE_RATE else None
    try:
        await asyncio.wait_for(run(), leave_after or 120)
    except asyncio.TimeoutError:
        out.left = leave_after is not None
        if not out.left:
            out.final = out.final or "client timeout (120 s)"
    except httpx.HTTPError as exc:
        out.final = out.final or f"client: {type(exc).__name__}"
    out.ended = time.monotonic()
    return out


class Chaos:
    """The faults, one at a time, in turn."""

    def __init__(self, procs: Procs, node_env: dict[str, dict], redis: dict, redis_proxy: Cutter,
                 link: Cutter, every: float) -> None:
        self.procs, self.node_env, self.redis = procs, node_env, redis
        self.redis_proxy, self.link, self.every = redis_proxy, link, every
        self.done: list[tuple[float, str, str]] = []
        self.over_booked: list[tuple] = []  # (when, node, how many, the last fault before)
        self.touched: dict[str, list[tuple[float, float]]] = {}  # node -> when it was killed, stopped or cut off

    def touch(self, node: str, began: float) -> None:
        """What ``node`` held from ``began`` until now (and a moment after) went with it."""
        self.touched.setdefault(node, []).append((began, time.monotonic() + 1.0))

    def faulted(self, node: str, out: Outcome) -> bool:
        return any(began <= out.ended and out.began <= until for began, until in self.touched.get(node, ()))

    async def run(self, stop: asyncio.Event) -> None:
        began, turn = time.monotonic(), 0
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every)
                return
            except asyncio.TimeoutError:
                pass
            fault = FAULTS[turn % len(FAULTS)]
            node = ["n1", "n2", "n3"][(turn // len(FAULTS)) % 3]
            turn += 1
            self.done.append((round(time.monotonic() - began, 2), fault, node if fault in ("kill", "stop") else ""))
            await getattr(self, fault.replace("-", "_"))(node)

    async def kill(self, node: str) -> None:
        began = time.monotonic()
        proc = self.procs.procs[node]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        await asyncio.sleep(1.0)
        self.procs.start(node, [PY, "node.py"], self.node_env[node])
        self.touch(node, began)

    async def stop(self, node: str) -> None:
        began = time.monotonic()
        proc = self.procs.procs[node]
        proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(2.5)
        finally:
            proc.send_signal(signal.SIGCONT)
            self.touch(node, began)

    async def slow_redis(self, _: str) -> None:
        self.redis_proxy.delay = 1.3
        try:
            await asyncio.sleep(3.0)
        finally:
            self.redis_proxy.delay = 0.0

    async def restart_redis(self, _: str) -> None:
        proc = self.procs.procs["redis"]
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        self.redis_proxy.cut()
        await asyncio.sleep(0.5)
        self.procs.start("redis", self.redis["args"])
        await asyncio.to_thread(wait_port, self.redis["port"])

    async def cut_link(self, _: str) -> None:
        began = time.monotonic()
        self.link.cut()
        self.touch("d1", began)


async def watch_queues(http: httpx.AsyncClient, sims: dict[str, str], chaos: Chaos, stop: asyncio.Event) -> None:
    """When a simulator had to queue (an over-booking), and the fault that came last before it."""
    seen = dict.fromkeys(sims, 0)
    began = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.25)
        for node, url in sims.items():
            with contextlib.suppress(httpx.HTTPError):
                queued = (await http.get(f"{url}/_sim/stats")).json()["queued"]
                if queued > seen[node]:
                    last = chaos.done[-1] if chaos.done else None
                    chaos.over_booked.append((round(time.monotonic() - began, 2), node, queued - seen[node], last))
                    seen[node] = queued


async def load(operators: list[str], sims: dict[str, str], count: int, concurrency: int,
               chaos: Chaos) -> list[Outcome]:
    rng = random.Random(23)
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=concurrency * 2, max_keepalive_connections=concurrency * 2)
    stop = asyncio.Event()
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5), limits=limits) as http:
        faults = asyncio.gather(chaos.run(stop), watch_queues(http, sims, chaos, stop))
        queue = iter(range(count))

        async def worker() -> None:
            for i in queue:
                outcomes.append(await one(http, operators, i, rng))
                if len(outcomes) % 1000 == 0:
                    print(f"  {len(outcomes)} of {count}", flush=True)

        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            stop.set()
            await faults
    return outcomes


def nodes_of(url: str) -> dict:
    return {n["node_id"]: n for n in httpx.get(f"{url}/nodes", timeout=10).json()["nodes"]}


def settle(operators: list[str], timeout: float = 20) -> dict[str, int]:
    """Jobs each operator still counts on its nodes, once they have had ``timeout`` to go to 0."""
    deadline = time.monotonic() + timeout
    while True:
        held = {url: sum(n.get("active_jobs", 0) for n in nodes_of(url).values()) for url in operators}
        if not any(held.values()) or time.monotonic() > deadline:
            return held
        time.sleep(0.25)


def metric_total(url: str, name: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")))


def receipts(dbs: list[Path]) -> dict[str, dict]:
    rows: dict[str, dict] = {}
    for db in dbs:
        with sqlite3.connect(db) as conn:
            conn.row_factory = sqlite3.Row
            # (a resumed answer's later legs are records of their own, part_of their job: counted in its row)
            for row in conn.execute("SELECT id, node, door, outcome, error, output_tokens, legs FROM jobs "
                                    "WHERE part_of IS NULL"):
                rows[row["id"]] = {**dict(row), "legs": json.loads(row["legs"]) if row["legs"] else None}
    return rows


def judge(outcomes: list[Outcome], sent_by: dict[str, Counter], jobs: dict[str, dict], metrics: int, held: dict,
          queued: int, chaos: Chaos) -> dict:
    """Per request: what the client received against what the simulator of the node that served it
    sent, and against the job's receipt. Tokens another node's simulator sent for the same prompt
    (the job failed over before anything reached the client) were in flight on a node that failed."""
    sent = sum(sent_by.values(), Counter())
    lost = lost_on_faulted = 0
    no_final = extra = receipt_mismatch = sim_mismatch = missing_receipts = 0
    finals: Counter = Counter()
    examples: list[dict] = []
    for out in outcomes:
        receipt = jobs.get(out.job) if out.job else None
        if out.job and receipt is None:
            missing_receipts += 1
        if out.left:
            finals["client left"] += 1
            if receipt is not None and receipt["output_tokens"] is not None and not (
                    out.tokens <= receipt["output_tokens"] <= sent[out.prompt]):
                receipt_mismatch += 1
            continue
        extra += out.extra
        if out.final is None:
            no_final += 1
            examples.append(asdict(out))
            continue
        broken = MID_STREAM.search(out.final)
        finals["ok" if out.final == "done" else ("node fault" if broken else out.final.split(":")[0][:60])] += 1
        served_by = broken.group(1) if broken else (receipt or {}).get("node")
        # a resumed answer: each node gave its part (the receipt's legs, a node that broke among them)
        legs = (receipt or {}).get("legs") or []
        parts = {n: t for n, t in legs} or {served_by: out.tokens}
        # what a node that failed mid-answer sent after the last token that reached the operator was in
        # flight when it failed (another node sent the answer from there on)
        failed = {n for n, _ in legs[:-1]} | ({legs[-1][0]} if legs and broken else set())
        for node, by_node in sent_by.items():
            gap = by_node[out.prompt] - parts.get(node, 0)
            if gap > 0 and (chaos.faulted(node, out) and (node not in parts or broken) or node in failed):
                lost_on_faulted += gap
            elif gap:
                lost += max(gap, 0)
                sim_mismatch += 1
                if len(examples) < 10:
                    examples.append({**asdict(out), "node": node, "served_by": served_by, "sent": by_node[out.prompt]})
        if receipt is not None and (receipt["output_tokens"] or 0) != out.tokens:
            receipt_mismatch += 1
            if len(examples) < 10:
                examples.append({**asdict(out), "receipt": receipt})
    receipt_total = sum(r["output_tokens"] or 0 for r in jobs.values())
    return {
        "requests": len(outcomes), "finals": dict(finals), "slots_held": held, "over_bookings": queued,
        "tokens_lost": lost, "tokens_in_flight_on_faulted_nodes": lost_on_faulted,
        "no_final_line": no_final, "lines_after_final": extra, "receipts_missing": missing_receipts,
        "receipt_vs_client_mismatches": receipt_mismatch, "client_vs_simulator_mismatches": sim_mismatch,
        "receipts_output_tokens": receipt_total, "metrics_output_tokens": metrics,
        "tokens_received": sum(o.tokens for o in outcomes), "tokens_sent_by_simulators": sum(sent.values()),
        "examples": examples,
    }


def targets(result: dict) -> dict[str, bool]:
    return {
        "0 slots held": not any(result["slots_held"].values()),
        "0 over-bookings": result["over_bookings"] == 0,
        "0 tokens lost": result["tokens_lost"] == 0,
        "receipts = metrics": result["receipts_output_tokens"] == result["metrics_output_tokens"],
        "receipts = clients = simulators per job": result["receipt_vs_client_mismatches"] == 0
        and result["client_vs_simulator_mismatches"] == 0 and result["receipts_missing"] == 0,
        "every stream ends with one final line": result["no_final_line"] == 0 and result["lines_after_final"] == 0,
    }


def table(result: dict) -> str:
    rows = [("requests", result["requests"]), ("seconds", result["seconds"]),
            ("faults", ", ".join(f"{k} {v}" for k, v in result["fault_counts"].items())),
            ("endings", ", ".join(f"{k} {v}" for k, v in sorted(result["finals"].items(), key=lambda kv: -kv[1]))),
            ("slots held at the end", sum(result["slots_held"].values())),
            ("over-bookings (Ollama queued)", result["over_bookings"]),
            ("tokens lost", result["tokens_lost"]),
            ("tokens in flight on failed/killed/stopped/cut nodes", result["tokens_in_flight_on_faulted_nodes"]),
            ("streams without a final line", result["no_final_line"]),
            ("receipts / metrics output tokens", f"{result['receipts_output_tokens']} / {result['metrics_output_tokens']}"),
            ("receipt != client (jobs)", result["receipt_vs_client_mismatches"]),
            ("client != simulator (jobs)", result["client_vs_simulator_mismatches"])]
    width = max(len(str(k)) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines += [f"target {name}: {'met' if ok else 'MISSED'}" for name, ok in result["targets"].items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a short run: checks that it runs (tests)")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--every", type=float, help="seconds between faults")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "chaos.json"))
    args = parser.parse_args()
    plan = {**(SMOKE if args.smoke else FULL),
            **{k: v for k, v in vars(args).items() if k in FULL and v is not None}}
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="odla-chaos-"))
    procs = Procs(workdir)
    ports = {k: free_port() for k in ("redis", "a", "b")}
    operators = [f"http://127.0.0.1:{ports['a']}", f"http://127.0.0.1:{ports['b']}"]
    redis = {"port": ports["redis"], "args": ["redis-server", "--bind", "127.0.0.1", "--port", str(ports["redis"]),
                                              "--save", "", "--appendonly", "no"]}
    sims: dict[str, str] = {}
    with Cutter(ports["redis"]) as redis_proxy, Cutter(ports["a"]) as link:
        try:
            procs.start("redis", redis["args"])
            wait_port(ports["redis"])
            common = {"operator_host": "127.0.0.1", "node_host": "127.0.0.1", "log_level": "warning",
                      "health_check_interval": 0.5, "health_check_timeout": 1, "heartbeat_interval": 0.5,
                      "prune_after": 3, "connect_timeout": 1, "lease_seconds": 3, "audit_rate": 0,
                      "redis_url": f"redis://127.0.0.1:{redis_proxy.url.rsplit(':', 1)[1]}/0"}
            for name, port in (("a", ports["a"]), ("b", ports["b"])):
                config = workdir / f"{name}.json"
                config.write_text(json.dumps({**common, "operator_url": operators[0],
                                              "jobs_db": str(workdir / f"{name}.db")}))
                procs.start(f"operator-{name}", [PY, "server.py"], {"ODLA_CONFIG": str(config),
                                                                    "operator_port": str(port)})
            node_config = workdir / "node.json"
            node_config.write_text(json.dumps({k: v for k, v in common.items() if k not in ("redis_url", "lease_seconds")}
                                              | {"operator_url": operators}))
            env_of: dict[str, dict] = {}
            for node in NODES:
                port = free_port()
                procs.start(f"sim-{node}", [PY, "sim/ollama_sim.py", "--port", str(port), "--models", "llama3",
                                            "--tokens", str(TOKENS), "--delay", str(DELAY), "--num-parallel", "2"])
                sims[node] = f"http://127.0.0.1:{port}"
                env_of[node] = {"ODLA_CONFIG": str(node_config), "NODE_ID": node, "OLLAMA_HOST": sims[node],
                                "OLLAMA_NUM_PARALLEL": "2", "NODE_PORT": str(free_port())}
            env_of["d1"] |= {"NODE_LINK": "dial", "ODLA_OPERATOR_URL": f"{link.url},{operators[1]}"}
            for node in NODES:
                wait_port(int(sims[node].rsplit(":", 1)[1]))
                httpx.post(f"{sims[node]}/_sim/config", json={"crash_rate": CRASH_RATE, "record": True})
                procs.start(node, [PY, "node.py"], env_of[node])
            for port in (ports["a"], ports["b"]):
                wait_port(port)
                wait_registered(port, len(NODES))
            print(f"chaos: {plan['requests']} requests, {plan['concurrency']} at a time, a fault every "
                  f"{plan['every']} s", flush=True)
            chaos = Chaos(procs, env_of, redis, redis_proxy, link, plan["every"])
            began = time.monotonic()
            outcomes = asyncio.run(load(operators, sims, plan["requests"], plan["concurrency"], chaos))
            seconds = round(time.monotonic() - began, 1)
            held = settle(operators)
            sent_by: dict[str, Counter] = {}
            queued = 0
            for node, url in sims.items():
                sent_by[node] = Counter(httpx.get(f"{url}/_sim/sent", timeout=10).json())
                queued += httpx.get(f"{url}/_sim/stats", timeout=10).json()["queued"]
            metrics = sum(metric_total(url, "odla_output_tokens_total") for url in operators)
        finally:
            procs.stop()
        jobs = receipts([workdir / "a.db", workdir / "b.db"])
    result = judge(outcomes, sent_by, jobs, metrics, held, queued, chaos)
    result |= {"seconds": seconds, "plan": plan, "faults": chaos.done, "over_booked": chaos.over_booked,
               "fault_counts": dict(Counter(fault for _, fault, _ in chaos.done))}
    result["targets"] = targets(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
