"""ODLA audits benchmark: how soon cheating nodes are caught, and that honest ones are not.

    make bench                (or: .venv/bin/python bench/audits_bench.py [--runs 20] [--smoke] [--out FILE])

Each run starts six simulated nodes behind one operator (``audit_rate`` 0.05): three honest nodes
whose GPUs drift (``--drift 0.005``: a token after the fourth differs with that probability), one
that answers with another model's tokens (``--cheat substitute``), one that counts more tokens than
it sends (``--cheat pad``) and one that stops at half and says it finished (``--cheat truncate``).
Six clients (one per slot) send mixed traffic (``/inference``, ``/api/generate`` streamed and whole,
``/api/chat``, ``/v1/chat/completions``) until every cheater is quarantined or 300 client jobs
have run. Runs differ by their seed (the operator's sampling and the traffic).

Reported per run and overall: the client jobs until each cheater was quarantined, honest nodes
quarantined (wrongly), the audits' share of the tokens, and the operator's CPU per client job (all
of its work: relaying, scheduling, receipts, audits). Targets: every cheater quarantined within
300 client jobs in 19 of 20 runs, ``pad`` on its first receipt, no honest node ever quarantined.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay_bench import PY, ROOT, Procs, cpu_ns, free_port, odla_config, wait_port, wait_registered  # noqa: E402

HONEST = ("honest-1", "honest-2", "honest-3")
CHEATS = {"substitute": "substitute", "pad": "pad", "truncate": "truncate"}
MAX_JOBS = 300
CLIENTS = 6
"Clients at once: as many as the nodes have slots, so that every node serves (an idle node earns nothing, cheat or not)."


def request(i: int, rng: random.Random) -> tuple[str, dict]:
    """One client job of the mix."""
    prompt = f"question {i} about {rng.choice(['nodes', 'tokens', 'clocks', 'rivers', 'stars'])}"
    kind = rng.random()
    if kind < 0.3:
        return "/inference", {"model": "llama3", "prompt": prompt}
    if kind < 0.5:
        return "/api/generate", {"model": "llama3", "prompt": prompt}
    if kind < 0.6:
        return "/api/generate", {"model": "llama3", "prompt": prompt, "stream": False}
    if kind < 0.8:
        return "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": prompt}]}
    return "/v1/chat/completions", {"model": "llama3", "stream": True, "messages": [{"role": "user", "content": prompt}]}


def one_run(seed: int, workdir: Path, max_jobs: int) -> dict:
    rng = random.Random(seed)
    procs = Procs(workdir)
    try:
        op_port = free_port()
        env = odla_config(workdir, op_port, heartbeat_interval=2, audit_rate=0.05,
                          jobs_db=str(workdir / f"jobs-{op_port}.db"))
        nodes = {name: [] for name in HONEST} | {f"cheat-{kind}": ["--cheat", kind] for kind in CHEATS}
        for i, (name, flags) in enumerate(nodes.items()):
            port = free_port()
            procs.start(f"sim-{name}", [PY, "sim/ollama_sim.py", "--port", str(port), "--seeded", "--tokens", "24",
                                        "--delay", "0.002", "--num-parallel", "1",
                                        *(["--drift", "0.005"] if not flags else []), *flags])
            nodes[name] = port
        operator = procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(op_port)})
        for i, (name, port) in enumerate(nodes.items()):
            procs.start(f"node-{name}", [PY, "node.py"], {**env, "NODE_ID": name, "NODE_PORT": str(free_port()),
                                                         "OLLAMA_HOST": f"127.0.0.1:{port}",
                                                         "NODE_PRIVATE_KEY": "0x%064x" % (seed * 100 + i + 1)})
        wait_port(op_port)
        url = f"http://127.0.0.1:{op_port}"
        wait_registered(op_port, len(nodes), timeout=60, procs=procs)
        caught: dict[str, int] = {}
        wrongly: set[str] = set()
        sent, failures = 0, 0
        began_cpu = cpu_ns([operator.pid])
        with httpx.Client(base_url=url, timeout=30) as http, concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            def ask(i: int) -> bool:
                path, body = request(i, rng)
                try:
                    with http.stream("POST", path, json=body) as resp:
                        resp.read()
                        return resp.status_code == 200
                except httpx.HTTPError:
                    return False

            while sent < max_jobs and len(caught) < len(CHEATS):
                results = list(pool.map(ask, range(sent, sent + CLIENTS)))
                sent += CLIENTS
                failures += results.count(False)
                rows = {n["node_id"]: n for n in http.get("/nodes").json()["nodes"]}
                for name, row in rows.items():
                    if row["quarantined"]:
                        if name.startswith("cheat-"):
                            caught.setdefault(name.removeprefix("cheat-"), sent)
                        else:
                            wrongly.add(name)
            time.sleep(2.5)  # the last receipts and audits come in
            rows = {n["node_id"]: n for n in http.get("/nodes").json()["nodes"]}
            wrongly |= {name for name, row in rows.items() if row["quarantined"] and not name.startswith("cheat-")}
            metrics = http.get("/metrics").text
            jobs = http.get("/jobs", params={"limit": 1000}).json()["jobs"]
        operator_cpu_us = (cpu_ns([operator.pid]) - began_cpu) / 1000
        client_tokens = sum(j["output_tokens"] or 0 for j in jobs)
        audit_tokens = _metric(metrics, "odla_audit_tokens_total")
        pad_first = min((j["started_at"] for j in jobs if j["node"] == "cheat-pad" and j["receipt"]), default=None)
        pad_disputed_first = any(j["node"] == "cheat-pad" and j["started_at"] == pad_first and j["disputed"]
                                 for j in jobs) if pad_first else None
        return {"seed": seed, "client_jobs": sent, "jobs_per_node": {n: r["jobs_total"] for n, r in rows.items()}, "failed_requests": failures, "caught_after": caught,
                "honest_quarantined": sorted(wrongly), "pad_caught_on_first_receipt": pad_disputed_first,
                "audits": {r: _metric(metrics, f'odla_audits_total{{result="{r}"}}')
                           for r in ("passed", "failed", "inconclusive", "skipped")},
                "audit_token_share": audit_tokens / max(1, client_tokens + audit_tokens),
                "operator_cpu_us_per_job": operator_cpu_us / max(1, sent)}
    finally:
        procs.stop()


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--first", type=int, default=1, help="the first run's seed")
    parser.add_argument("--smoke", action="store_true", help="one short run: that it runs, not its figures")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "audits.json"))
    args = parser.parse_args()
    runs, max_jobs = (1, 30) if args.smoke else (args.runs, MAX_JOBS)
    results = []
    for seed in range(args.first, args.first + runs):
        with tempfile.TemporaryDirectory(prefix="odla-audits-") as folder:
            result = one_run(seed, Path(folder), max_jobs)
        results.append(result)
        caught = ", ".join(f"{k} {v}" for k, v in sorted(result["caught_after"].items())) or "none"
        print(f"run {seed:2}: caught after (client jobs) {caught}; honest quarantined "
              f"{result['honest_quarantined'] or 'none'}; audits {result['audits']}; audit share "
              f"{result['audit_token_share']:.1%}; operator CPU {result['operator_cpu_us_per_job']:.0f} us/job",
              flush=True)
    all_caught = sum(len(r["caught_after"]) == len(CHEATS) and max(r["caught_after"].values()) <= MAX_JOBS
                     for r in results)
    honest_ok = all(not r["honest_quarantined"] for r in results)
    pad_first = sum(bool(r["pad_caught_on_first_receipt"]) for r in results)
    need = max(1, round(runs * 19 / 20))
    print(f"every cheater quarantined within {MAX_JOBS} client jobs: {all_caught} of {runs} runs "
          f"(target {need}) {'met' if all_caught >= need else 'NOT MET'}")
    print(f"pad disputed on its first receipt: {pad_first} of {runs} runs")
    print(f"honest nodes quarantined: {sum(len(r['honest_quarantined']) for r in results)} "
          f"(target 0) {'met' if honest_ok else 'NOT MET'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"runs": results, "all_caught_runs": all_caught, "honest_ok": honest_ok,
                                          "pad_first_receipt_runs": pad_first}, indent=2))


if __name__ == "__main__":
    main()
