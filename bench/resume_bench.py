"""Resume run: streamed answers on four nodes of one model while three of them fail mid-answer.

    .venv/bin/python bench/resume_bench.py [--smoke] [--jobs N]

Starts four simulators (one per node, the same model and answers) and four nodes over HTTP, and
an operator with ``stall_timeout`` 2 s. Then sends ``--jobs`` streamed jobs, ``--concurrency`` at
a time, in turn over ``/inference``, ``/api/generate``, ``/api/chat``, ``/v1/chat/completions``
and ``/v1/completions``. While they run, in turn: one node is SIGKILLed (its connections close at
once), one is SIGSTOPped (silent: found by ``stall_timeout`` or a failed health check), and one
node's Ollama starts ending every answer with an error line after a few tokens; the fourth stays
well. Each fault lasts until the run ends.

It reports, and checks against the targets:

- **whole**: jobs whose client read exactly the answer an unbroken run gives (every token once,
  in order) and one final line; the target is every job;
- **lost / repeated**: tokens missing from, or extra in, what the clients read (target 0);
- **gap**: at each resume, the longest pause the client saw between two tokens of that answer, p50
  and p95; the target for p95 is the failure's detection time plus 1 s (a lost connection or an
  error line: at once; a silent node: ``stall_timeout``). An answer whose resume failed too (sent
  to a node stopped a moment before, not yet found silent) is counted apart, each against the sum
  of its failures' detection times plus 1 s.

Prints a table and writes bench/results/resume.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import PY, ROOT, Procs, free_port, pct, raise_fd_limit, wait_port, wait_registered  # noqa: E402

sys.path.insert(0, str(ROOT))
from odla.operator.resume import KINDS, content_of, decoded  # noqa: E402
from sim.ollama_sim import sim_tokens  # noqa: E402

FULL = {"jobs": 200, "concurrency": 16, "tokens": 40, "delay": 0.02}
SMOKE = {"jobs": 40, "concurrency": 10, "tokens": 20, "delay": 0.02}
"(The smoke run's faults come 0.4 s apart, over each other: its gaps are not held to the targets.)"
STALL_S = 2.0
NODES = ["n1", "n2", "n3", "n4"]
DOORS = ["/inference", "/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"]
FAULTS = [("n1", "kill"), ("n2", "stop"), ("n3", "error")]
DETECT_S = {"kill": 0.0, "error": 0.0, "stop": STALL_S}


@dataclass
class Answer:
    door: str
    prompt: str
    job: str = ""
    node: str = ""
    text: str = ""
    final: bool = False
    error: Optional[str] = None
    gap: float = 0.0
    "The longest pause between two of its tokens (s)."
    legs: list = field(default_factory=list)


def request_of(door: str, prompt: str) -> dict:
    if door in ("/api/chat", "/v1/chat/completions"):
        body: dict = {"messages": [{"role": "user", "content": prompt}]}
    else:
        body = {"prompt": prompt}
    return {"model": "llama3", **body, **({"stream": True} if door.startswith("/v1/") else {})}


async def one(http: httpx.AsyncClient, url: str, i: int) -> Answer:
    door = DOORS[i % len(DOORS)]
    answer = Answer(door, f"resume bench job {i}")
    kind = KINDS[door]
    last = None
    try:
        async with http.stream("POST", url + door, json=request_of(door, answer.prompt)) as resp:
            answer.job, answer.node = resp.headers.get("x-odla-job", ""), resp.headers.get("x-odla-node", "")
            if resp.status_code != 200:
                answer.error = f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}"
                return answer
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                if line.strip() == "data: [DONE]":
                    answer.final = True
                    continue
                part = decoded(line.encode())
                if part is None:
                    continue
                if "error" in part:
                    answer.error = str(part["error"])[:200]
                    break
                piece = content_of(kind, part)
                if piece:
                    now = time.monotonic()
                    if last is not None:
                        answer.gap = max(answer.gap, now - last)
                    last = now
                    answer.text += piece
                if part.get("done") is True:
                    answer.final = True
    except httpx.HTTPError as exc:
        answer.error = f"{type(exc).__name__}: {exc}"
    return answer


class Faults:
    """One fault every ``every`` seconds, in turn, each lasting to the end of the run."""

    def __init__(self, procs: Procs, sims: dict[str, str], every: float) -> None:
        self.procs, self.sims, self.every = procs, sims, every
        self.done: list[tuple[float, str, str]] = []

    async def run(self, began: float) -> None:
        for node, fault in FAULTS:
            await asyncio.sleep(self.every)
            if fault == "kill":
                self.procs.procs[node].send_signal(signal.SIGKILL)
            elif fault == "stop":
                self.procs.procs[node].send_signal(signal.SIGSTOP)
            else:
                async with httpx.AsyncClient() as http:
                    await http.post(f"{self.sims[node]}/_sim/config", json={"error_after": 4})
            self.done.append((round(time.monotonic() - began, 2), node, fault))

    def resume(self) -> None:
        """A stopped node goes on (so that it can be stopped cleanly)."""
        for node, fault in FAULTS:
            if fault == "stop" and self.procs.procs[node].poll() is None:
                self.procs.procs[node].send_signal(signal.SIGCONT)


async def load(url: str, plan: dict, faults: Faults) -> list[Answer]:
    room = asyncio.Semaphore(plan["concurrency"])
    began = time.monotonic()

    async def run(i: int) -> Answer:
        async with room:
            return await one(http, url, i)

    limits = httpx.Limits(max_connections=plan["concurrency"] * 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=5), limits=limits) as http:
        chaos = asyncio.ensure_future(faults.run(began))
        answers = await asyncio.gather(*(run(i) for i in range(plan["jobs"])))
        chaos.cancel()
        for answer in answers:
            if answer.job:
                resp = await http.get(f"{url}/jobs/{answer.job}")
                if resp.status_code == 200:
                    answer.legs = resp.json().get("legs") or []
    return answers


def judge(answers: list[Answer], plan: dict, metrics: dict) -> dict:
    lost = repeated = whole = 0
    for answer in answers:
        expected = sim_tokens(answer.prompt, plan["tokens"])
        got = answer.text.split(" ")
        want = "".join(expected).split(" ")
        counted_want, counted_got = Counter(want), Counter(got)
        lost += sum((counted_want - counted_got).values())
        repeated += sum((counted_got - counted_want).values())
        whole += answer.text == "".join(expected) and answer.final and answer.error is None
    resumed = [a for a in answers if len(a.legs) > 1]
    fault_of = dict(FAULTS)
    by_fault: dict[str, list[float]] = {}
    several_over = 0
    for answer in resumed:
        failed = [fault_of.get(leg["node"], "other") for leg in answer.legs[:-1]]
        if len(failed) == 1:
            by_fault.setdefault(failed[0], []).append(answer.gap)
        else:  # its resume failed too (a node stopped, not yet found so): each failure's detection in turn
            by_fault.setdefault("several", []).append(answer.gap)
            several_over += answer.gap > sum(DETECT_S.get(f, STALL_S) for f in failed) + 1.0
    gaps = {fault: {"resumes": len(values), "p50_s": round(pct(values, 50), 3), "p95_s": round(pct(values, 95), 3),
                    "target_p95_s": DETECT_S.get(fault, STALL_S) + 1.0} for fault, values in by_fault.items()
            if fault != "several"}
    if "several" in by_fault:
        values = by_fault["several"]
        gaps["several"] = {"resumes": len(values), "p50_s": round(pct(values, 50), 3),
                           "p95_s": round(pct(values, 95), 3), "over_target": several_over}
    return {"jobs": len(answers), "whole": whole, "lost": lost, "repeated": repeated, "resumed": len(resumed),
            "errors": Counter(a.error for a in answers if a.error), "gaps": gaps, "resumes_total": metrics,
            "doors": dict(Counter(a.door for a in answers if a.text and a.error is None and a.final))}


def targets(result: dict) -> dict[str, bool]:
    gaps = result["gaps"]
    return {"every job whole": result["whole"] == result["jobs"],
            "0 tokens lost or repeated": result["lost"] == 0 and result["repeated"] == 0,
            "every fault resumed": all(fault in gaps for _, fault in FAULTS),
            "gap p95 within detection + 1 s": all(g["p95_s"] <= g["target_p95_s"] for k, g in gaps.items()
                                                  if k != "several") and not gaps.get("several", {}).get("over_target")}


def table(result: dict) -> str:
    lines = [f"resume: {result['jobs']} jobs, {result['whole']} whole, {result['resumed']} resumed, "
             f"{result['lost']} tokens lost, {result['repeated']} repeated ({result['seconds']} s)",
             "fault   resumes   gap p50   gap p95   target p95"]
    for fault, g in sorted(result["gaps"].items()):
        target = f"{g['target_p95_s']:>8.1f}s" if "target_p95_s" in g else f"each: the sum of its detections + 1 s ({g['over_target']} over)"
        lines.append(f"{fault:<7} {g['resumes']:>7}   {g['p50_s']:>6.3f}s   {g['p95_s']:>6.3f}s   {target}")
    if result["errors"]:
        lines.append(f"errors: {dict(result['errors'])}")
    lines.append("resumes by outcome (odla_resumes_total): " + json.dumps(result["resumes_total"]))
    lines += [f"{'PASS' if ok else 'FAIL'}  {name}" for name, ok in result["targets"].items()]
    return "\n".join(lines)


def resumes_metric(url: str) -> dict:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines()
            if line.startswith("odla_resumes_total{")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a short run: checks that it runs (tests)")
    parser.add_argument("--jobs", type=int)
    parser.add_argument("--concurrency", type=int)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "resume.json"))
    args = parser.parse_args()
    plan = {**(SMOKE if args.smoke else FULL), **{k: v for k, v in vars(args).items() if k in FULL and v is not None}}
    # a job lasts tokens x delay; the faults come in its first half, so that each finds jobs under way
    every = 0.4 if args.smoke else 2.0
    raise_fd_limit()
    workdir = Path(tempfile.mkdtemp(prefix="odla-resume-"))
    procs = Procs(workdir)
    op_port = free_port()
    url = f"http://127.0.0.1:{op_port}"
    config = workdir / "config.json"
    config.write_text(json.dumps({"operator_url": url, "operator_host": "127.0.0.1", "node_host": "127.0.0.1",
                                  "log_level": "warning", "health_check_interval": 1, "health_check_timeout": 1,
                                  "heartbeat_interval": 0.5, "prune_after": 30, "connect_timeout": 1, "audit_rate": 0,
                                  "stall_timeout": STALL_S, "jobs_db": str(workdir / "jobs.db")}))
    env = {"ODLA_CONFIG": str(config)}
    sims: dict[str, str] = {}
    faults = Faults(procs, sims, every)
    try:
        procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(op_port)})
        for node in NODES:
            port = free_port()
            procs.start(f"sim-{node}", [PY, "sim/ollama_sim.py", "--port", str(port), "--models", "llama3",
                                        "--tokens", str(plan["tokens"]), "--delay", str(plan["delay"])])
            sims[node] = f"http://127.0.0.1:{port}"
        for node in NODES:
            wait_port(int(sims[node].rsplit(":", 1)[1]))
            procs.start(node, [PY, "node.py"], {**env, "NODE_ID": node, "OLLAMA_HOST": sims[node],
                                                 "NODE_PORT": str(free_port()), "OLLAMA_NUM_PARALLEL": "16"})
        wait_port(op_port)
        wait_registered(op_port, len(NODES), procs=procs)
        print(f"resume: {plan['jobs']} jobs, {plan['concurrency']} at a time; a node killed, stopped and erroring, "
              f"{every:g} s apart", flush=True)
        began = time.monotonic()
        answers = asyncio.run(load(url, plan, faults))
        seconds = round(time.monotonic() - began, 1)
        metrics = resumes_metric(url)
    finally:
        faults.resume()
        procs.stop()
    result = judge(answers, plan, metrics) | {"seconds": seconds, "plan": plan, "faults": faults.done}
    result["targets"] = targets(result)
    result["failures"] = [asdict(a) for a in answers if a.error or not a.final][:20]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str))
    print(table(result))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
