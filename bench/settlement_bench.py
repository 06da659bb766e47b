"""ODLA settlement benchmark: after many jobs, do the ledger, the chain and the receipts agree to
the wei, and what does the settlement path cost the operator?

    make bench                (or: .venv/bin/python bench/settlement_bench.py [--jobs 10000] [--smoke] [--out FILE])

A local chain (anvil), the escrow deployed on it, one operator settling on it (``settlement``
"evm", epochs every 5 s) and four simulated nodes, each with its own key. Three wallets sign in
deposit and sign off what they deposited; they send ``--jobs`` jobs between them, eight at a time, on every door, and about
2 % of them leave mid-answer. Halfway, one node is killed (SIGKILL) while it streams. Then every
node and the operator claim what they earned.

Checked, to the wei:
- the ledger sums to zero, and every charge entry is the price of its job's countersigned,
  undisputed receipt (its prompt, and its output up to what the operator relayed);
- each wallet's charge on chain is what the ledger says it spent; each payee's claim is what
  the ledger credited it; everything charged was paid out;
- what the leaving clients were charged for is what they were sent (the operator's count of the
  tokens it relayed, against the lines each client read before it left).

The cost: the same traffic is run again without prices (no ledger, no holds, no chain) and the
operator's CPU per job compared, in alternated pairs with the operator's default epoch (an hour)
and deposit reading (every 10 s), as it would run (target: the settlement path adds at most
200 us); and the in-process parts of the path, timed alone: a job's hold and release, its
charge, its three ledger entries. The books' run (epochs every 5 s, deposits read every second,
so that everything settles within it) reports its CPU per job too: that is with 720 times the
epochs an hour would post.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audits_bench import request  # noqa: E402  (the same mix of doors)
from relay_bench import PY, ROOT, Procs, cpu_ns, free_port, odla_config, wait_port, wait_registered  # noqa: E402

sys.path.insert(0, str(ROOT))
from odla.proofs.identity import Identity  # noqa: E402
from odla.settlement.anvil import ANVIL, ANVIL_KEYS  # noqa: E402
from odla.settlement.chain import Escrow  # noqa: E402
from odla.settlement.signin import SignIn  # noqa: E402
from odla.settlement.vouchers import Voucher  # noqa: E402

OPERATOR = Identity(bytes.fromhex(ANVIL_KEYS[0][2:]))
NODE_KEYS = {f"n{i + 1}": k for i, k in enumerate(ANVIL_KEYS[1:3] + ANVIL_KEYS[6:8])}
NODES = {name: Identity(bytes.fromhex(k[2:])) for name, k in NODE_KEYS.items()}
CLIENTS = [Identity(bytes.fromhex(k[2:])) for k in ANVIL_KEYS[3:6]]
PRICES = {"llama3": {"prompt": 2_000_000, "output": 7_000_000}}
FEE_BPS = 250
AT_ONCE = 8
KILLED = "n4"
"The node killed (SIGKILL) halfway, while it streams if it can be caught at it."
DEPART = 0.02
TARGET_US = 200.0


async def drive(url: str, tokens: list[str], jobs: int, seed: int, kill: Any) -> dict[str, Any]:
    """``jobs`` jobs, ``AT_ONCE`` at a time, round the wallets; some leave mid-answer. ``kill()``
    runs halfway."""
    rng = random.Random(seed)
    plan = [(i, *request(i, rng), rng.random() < DEPART, i % len(tokens)) for i in range(jobs)]
    done = {"ok": 0, "errors": 0, "departed": 0, "refused": 0, "hung": 0}
    hung: list[str] = []
    seen: list[str] = []  # every job id the clients were given
    left: dict[str, int] = {}  # job id -> token lines the client read before it left
    running: dict[str, tuple[float, bytearray]] = {}  # job id -> when its headers came, what it read so far
    stuck: dict[str, Any] = {}  # a job running for 20 s: what the operator says of it then
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    killed = False

    async def worker(http: aiohttp.ClientSession) -> None:
        nonlocal killed
        while not queue.empty():
            i, path, body, depart, who = queue.get_nowait()
            if i >= jobs // 2 and not killed:
                killed = True
                kill()
            headers = {"authorization": f"Bearer {tokens[who]}"} if tokens[who] else {}
            job_id = "?"
            try:
                async with http.post(url + path, json=body, headers=headers) as resp:
                    job_id = resp.headers.get("x-odla-job", "?")
                    seen.append(job_id)
                    read = running[job_id] = (time.monotonic(), bytearray())
                    if resp.status != 200:
                        done["refused"] += 1
                        await resp.read()
                        continue
                    if depart:
                        lines = 0
                        for _ in range(2):
                            if await resp.content.readline():
                                lines += 1
                        left[resp.headers["x-odla-job"]] = lines
                        resp.close()  # the client leaves mid-answer
                        done["departed"] += 1
                        continue
                    async for chunk in resp.content.iter_any():
                        read[1].extend(chunk)
                    data = bytes(read[1])
                    failed = data.rstrip().endswith(b'"done": true}') and b'{"error": ' in data[-400:] \
                        or b'"error":{' in data[-400:]
                    done["errors" if failed else "ok"] += 1
                    if failed and "error_sample" not in done:
                        done["error_sample"] = data[-400:].decode("utf-8", "replace")  # type: ignore[assignment]
            except aiohttp.ClientError as exc:  # the connection itself failed: an answer with no last line
                done["errors"] += 1
                done.setdefault("error_sample", f"{path} job {job_id}: {type(exc).__name__}: {exc}")  # type: ignore
            except asyncio.TimeoutError:  # no answer, or no end to it, within a minute: a defect to look into
                done["hung"] += 1
                hung.append(f"{path} job {job_id}")
            finally:
                running.pop(job_id, None)

    async def watch(http: aiohttp.ClientSession) -> None:
        """What the operator says of a job that has run for 20 s (they take milliseconds)."""
        while True:
            await asyncio.sleep(2)
            for job_id, (began, read) in list(running.items()):
                if time.monotonic() - began > 20 and job_id not in stuck:
                    async with http.get(f"{url}/jobs/{job_id}", headers=admin) as resp:
                        stuck[job_id] = {"receipt": await resp.json(), "read": bytes(read[-300:]).decode("utf-8", "replace")}
                    async with http.get(f"{url}/nodes", headers=admin) as resp:
                        stuck[job_id]["nodes"] = [{k: n.get(k) for k in ("node_id", "healthy", "active_jobs", "slots")}
                                                  for n in (await resp.json())["nodes"]]

    admin = {"authorization": f"Bearer {tokens[0]}"} if tokens[0] else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        watcher = asyncio.create_task(watch(http))
        await asyncio.gather(*(worker(http) for _ in range(AT_ONCE)))
        watcher.cancel()
    return {**done, "hung_jobs": hung, "stuck": stuck, "left_lines": left, "seen": seen}


def sign_in(url: str, wallet: Identity) -> str:
    import httpx

    message = SignIn.to(url, wallet.address, httpx.get(f"{url}/auth/nonce").json(), time.time())
    answer = httpx.post(f"{url}/auth/verify", json={"message": message.text(), "signature": message.sign(wallet)})
    answer.raise_for_status()
    return answer.json()["token"]


def one_run(workdir: Path, jobs: int, settle: bool, seed: int, quick_epochs: bool = True,
            epoch_seconds: float = 5) -> dict[str, Any]:
    """``quick_epochs``: an epoch every ``epoch_seconds`` and deposits read every second, so that the
    books settle within the run; without, the operator's defaults (an epoch an hour, a deposit read
    every 10 s)."""
    import httpx

    procs = Procs(workdir)
    try:
        chain_port, op_port = free_port(), free_port()
        settings: dict[str, Any] = {"heartbeat_interval": 1, "audit_rate": 0, "jobs_db": str(workdir / "jobs.db"),
                                    "operator_private_key": ANVIL_KEYS[0]}
        if quick_epochs:
            settings |= {"epoch_seconds": epoch_seconds, "chain_poll": 1}
        escrow = None
        if settle:
            procs.start("anvil", [str(ANVIL), "--host", "127.0.0.1", "--port", str(chain_port), "--silent"])
            wait_port(chain_port)
            escrow = Escrow(f"http://127.0.0.1:{chain_port}", 31337, timeout=30)
            escrow.deploy(OPERATOR, OPERATOR.address, 3600)
            for wallet in CLIENTS:
                escrow.deposit(wallet, 10 ** 15)
            settings |= {"settlement": "evm", "prices": PRICES, "operator_fee_bps": FEE_BPS,
                         "chain_rpc_url": escrow.rpc_url, "chain_id": 31337, "escrow_address": escrow.address}
        env = odla_config(workdir, op_port, **settings)
        operator = procs.start("operator", [PY, "server.py"], {**env, "operator_port": str(op_port)})
        nodes = {}
        for name in NODES:
            sim_port = free_port()
            procs.start(f"sim-{name}", [PY, "sim/ollama_sim.py", "--port", str(sim_port), "--tokens", "12",
                                        "--delay", "0.002", "--num-parallel", "2"])
            nodes[name] = procs.start(f"node-{name}", [PY, "node.py"], {
                **env, "NODE_ID": name, "NODE_PORT": str(free_port()), "OLLAMA_HOST": f"127.0.0.1:{sim_port}",
                "NODE_PRIVATE_KEY": NODE_KEYS[name]})
        wait_port(op_port)
        url = f"http://127.0.0.1:{op_port}"
        wait_registered(op_port, len(NODES), timeout=60, procs=procs)
        tokens = [sign_in(url, wallet) for wallet in CLIENTS] if settle else ["", "", ""]
        if settle:
            assert escrow is not None
            for wallet, token in zip(CLIENTS, tokens):  # each signs off all it deposited
                signature = Voucher(wallet.address, 10 ** 15).sign(wallet, 31337, escrow.address)
                httpx.post(f"{url}/accounts/me/allowance", json={"cumulative": 10 ** 15, "signature": signature},
                           headers={"authorization": f"Bearer {token}"}).raise_for_status()
        began, cpu = time.monotonic(), cpu_ns([operator.pid])
        def kill() -> None:  # while it streams: what was delivered is what is paid
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                rows = httpx.get(f"{url}/nodes", timeout=5).json()["nodes"]
                if any(n["node_id"] == KILLED and n["active_jobs"] for n in rows):
                    break
            nodes[KILLED].send_signal(signal.SIGKILL)

        driven = asyncio.run(drive(url, tokens, jobs, seed, kill))
        seconds, cpu_us = time.monotonic() - began, (cpu_ns([operator.pid]) - cpu) / 1000
        result = {"jobs": jobs, "seconds": seconds, "operator_cpu_us_per_job": cpu_us / jobs,
                  **{k: v for k, v in driven.items() if k not in ("left_lines", "seen")}}
        if settle and quick_epochs:  # the books can be checked only once an epoch has settled them
            assert escrow is not None
            result |= settle_and_check(url, escrow, tokens, workdir / "jobs.db", driven["left_lines"],
                                       epoch_seconds + 2)
            result["jobs_unrecorded"] = unrecorded(workdir / "jobs.db", driven["seen"])
        return result
    finally:
        procs.stop()


def settle_and_check(url: str, escrow: Escrow, tokens: list[str], db_path: Path, left: dict[str, int],
                     settled_for: float) -> dict:
    import httpx

    admin = {"authorization": f"Bearer {tokens[0]}"}  # no api_keys: any caller reads any account
    accounts = [w.address for w in CLIENTS] + [n.address for n in NODES.values()] + [OPERATOR.address]

    def statements() -> dict[str, dict]:
        return {a: httpx.get(f"{url}/accounts/{a}", headers=admin, params={"limit": 1}, timeout=30).json()
                for a in accounts}

    # the last receipts come, an epoch closes, its settlement is posted: until the chain says what the
    # ledger says, twice, an epoch and two heartbeats apart (a killed node's jobs stay held: no receipt comes)
    deadline, agreed = time.monotonic() + 120, None
    while True:
        books = statements()
        now = {w.address: (books[w.address]["chain"]["charged_on_chain"], -books[w.address]["balance"]) for w in CLIENTS}
        if all(chain == spent for chain, spent in now.values()):
            if agreed is not None and agreed[0] == now and time.monotonic() - agreed[1] >= settled_for:
                break
            agreed = (now, time.monotonic()) if agreed is None or agreed[0] != now else agreed
        else:
            agreed = None
        if time.monotonic() > deadline:
            break
        time.sleep(1)
    claimed = {}
    for payee in [*NODES.values(), OPERATOR]:
        found = httpx.get(f"{url}/settlement/claims/{payee.address}", timeout=30)
        if found.status_code == 200:
            escrow.claim(payee, found.json()["owed"], found.json()["proof"])
        claimed[payee.address] = escrow.standing(payee.address).claimed
    db = sqlite3.connect(db_path)
    problems = []
    if sum(books[a]["balance"] for a in accounts) != 0:
        problems.append("the balances do not sum to zero")
    for wallet in CLIENTS:
        on_chain = escrow.standing(wallet.address).charged
        if on_chain != -books[wallet.address]["balance"]:
            problems.append(f"{wallet.address}: charged {on_chain} on chain, spent {-books[wallet.address]['balance']}")
    for payee in [*NODES.values(), OPERATOR]:
        if claimed[payee.address] != books[payee.address]["balance"]:
            problems.append(f"{payee.address}: claimed {claimed[payee.address]}, earned {books[payee.address]['balance']}")
    total_charged = escrow.contract.functions.totalCharged().call()
    total_claimed = escrow.contract.functions.totalClaimed().call()
    if total_charged != total_claimed:
        problems.append(f"charged {total_charged} on chain, paid out {total_claimed}")
    # every charge is its receipt's price: prompt, and output up to what was relayed from that node (an
    # answer resumed on another node: the job's row holds its first node's receipt, whose tokens are its
    # first leg's; each later leg's row, part_of the job, is charged for its output only)
    rows = db.execute("SELECT l.amount, j.receipt, j.disputed, j.output_tokens, j.legs, j.part_of FROM ledger l "
                      "JOIN jobs j ON j.id = l.job_id WHERE l.role = 'client' AND l.kind = 'charge'").fetchall()
    wrong = 0
    for amount, receipt, disputed, relayed, legs, part_of in rows:
        message = json.loads(receipt)
        relayed = json.loads(legs)[0][1] if legs else relayed
        output = min(message["outputTokens"], relayed if relayed is not None else message["outputTokens"])
        prompt = 0 if part_of is not None else message["promptTokens"]
        price = PRICES["llama3"]
        if disputed is not None or -amount != (prompt * price["prompt"] + output * price["output"]) // 1_000_000:
            wrong += 1
    if wrong:
        problems.append(f"{wrong} charge(s) are not their receipt's price")
    receipts = db.execute("SELECT COUNT(*) FROM jobs WHERE receipt IS NOT NULL AND disputed IS NULL").fetchone()[0]
    # a job without a receipt is one whose (first) node was killed before it reported it: its receipts wait
    # for the node's next report, and die with it. From a node that was not killed, one is a lost receipt.
    unreceipted_by: dict[str, int] = {}
    for node, legs in db.execute("SELECT node, legs FROM jobs WHERE receipt IS NULL AND door != 'audit'"):
        first = json.loads(legs)[0][0] if legs else node
        unreceipted_by[first] = unreceipted_by.get(first, 0) + 1
    unreceipted = sum(unreceipted_by.values())
    if set(unreceipted_by) - {KILLED}:
        problems.append(f"jobs without a receipt from nodes that were not killed: {unreceipted_by}")
    resumed = db.execute("SELECT COUNT(*) FROM jobs WHERE part_of IS NOT NULL").fetchone()[0]
    # what a leaving client was charged for, against the token lines it read
    charged_left = dict(db.execute(
        "SELECT j.id, json_extract(j.receipt, '$.outputTokens') FROM jobs j WHERE j.id IN (%s)"
        % ",".join("?" * len(left)), list(left)).fetchall()) if left else {}
    sent_left = dict(db.execute("SELECT id, output_tokens FROM jobs WHERE id IN (%s)" % ",".join("?" * len(left)),
                                list(left)).fetchall()) if left else {}
    db.close()
    return {"agree": not problems, "problems": problems, "charges": len(rows), "receipts": receipts,
            "jobs_without_receipt": unreceipted, "without_receipt_by_first_node": unreceipted_by,
            "resumed_legs": resumed, "charged_on_chain": total_charged,
            "paid_out": total_claimed,
            "left": {"jobs": len(left), "lines_read": sum(left.values()),
                     "tokens_relayed": sum(v or 0 for v in sent_left.values()),
                     "node_claimed": sum(v or 0 for v in charged_left.values() if v is not None)}}


def unrecorded(db_path: Path, seen: list[str]) -> list[str]:
    """Jobs a client was given an id for that the operator has no record of (each must have one)."""
    db = sqlite3.connect(db_path)
    known = {job_id for (job_id,) in db.execute("SELECT id FROM jobs")}
    db.close()
    return [job_id for job_id in seen if job_id not in known]


def micro(n: int) -> dict[str, float]:
    """The settlement path's in-process parts, per job, in microseconds."""
    import timeit

    from odla.core.config import Price
    from odla.operator.receipts import connect
    from odla.serving.jobs import Job
    from odla.settlement import ledger
    from odla.settlement.ledger import Charge
    from odla.settlement.prices import Prices
    from odla.settlement.purse import Purse
    from odla.settlement.chain import Standing

    prices = Prices({"llama3": Price(**PRICES["llama3"])}, FEE_BPS)
    client = CLIENTS[0].address
    purse = Purse(prices, escrow=None, max_job_tokens=4096, poll_s=1e9)  # type: ignore[arg-type]
    purse.chain[client] = (Standing(10 ** 18, 0, 0, 0), time.monotonic())
    purse.vouchers[client] = (10 ** 18, "0x")
    jobs = [Job(door="ollama", model="llama3:latest", caller=client, node_address=OPERATOR.address) for _ in range(n)]

    async def holds() -> None:
        for job in jobs:
            await purse.hold(job, "llama3", 40, None)
            job.outcome, job.delivered = "ok", 12
            purse.ended(job)
            job.charge = Charge(job.id, client, OPERATOR.address, OPERATOR.address, 100, 2, 40, 12)
            purse.charged(job)

    began = time.perf_counter()
    asyncio.run(holds())
    hold_us = (time.perf_counter() - began) / n * 1e6
    cost_us = timeit.timeit(lambda: prices.split(prices.cost("llama3", 40, 12)), number=n) / n * 1e6
    db = connect(str(Path(tempfile.mkdtemp()) / "ledger.db"))
    charges = [Charge(f"j{i}", client, OPERATOR.address, OPERATOR.address, 100, 2, 40, 12) for i in range(n)]
    began = time.perf_counter()
    for start in range(0, n, 500):  # as the receipts' writer does: a batch a transaction
        with db:
            for charge in charges[start:start + 500]:
                ledger.post(db, charge, 0.0)
    post_us = (time.perf_counter() - began) / n * 1e6
    return {"hold_and_release_us": hold_us, "price_us": cost_us, "ledger_entries_us": post_us,
            "total_us": hold_us + cost_us + post_us}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs of the run whose books are checked")
    parser.add_argument("--pairs", type=int, default=3, help="runs without and with settlement, for the CPU figure")
    parser.add_argument("--pair-jobs", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="short runs: that it runs, not its figures")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "settlement.json"))
    args = parser.parse_args()
    jobs, pairs, pair_jobs = (200, 0, 0) if args.smoke else (args.jobs, args.pairs, args.pair_jobs)
    parts = micro(2000 if args.smoke else 20_000)
    print("in process, per job (us): " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)

    def run(settle: bool, count: int, seed: int, quick_epochs: bool = False) -> dict:
        with tempfile.TemporaryDirectory(prefix="odla-settle-") as folder:  # a smoke run's epochs are shorter
            result = one_run(Path(folder), count, settle, seed, quick_epochs, 2 if args.smoke else 5)
        print(f"{'settled' if settle else 'free':8} {count} jobs in {result['seconds']:.0f} s: ok {result['ok']}, "
              f"errors {result['errors']}, departed {result['departed']}, refused {result['refused']}, hung "
              f"{result['hung']} {result['hung_jobs'][:5]}; operator CPU "
              f"{result['operator_cpu_us_per_job']:.0f} us/job", flush=True)
        return result

    added = []
    for pair in range(pairs):  # alternated, so that the machine's drift falls on both
        free, settled = run(False, pair_jobs, args.seed + pair), run(True, pair_jobs, args.seed + pair)
        added.append(settled["operator_cpu_us_per_job"] - free["operator_cpu_us_per_job"])
    books = run(True, jobs, args.seed, quick_epochs=True)
    median = statistics.median(added) if added else float("nan")
    print(f"ledger, chain and receipts agree after {jobs} jobs: "
          f"{'yes' if books['agree'] else 'NO: ' + '; '.join(books['problems'])} ({books['charges']} charges, "
          f"{books['receipts']} receipts, {books['jobs_without_receipt']} jobs without one, by their first node "
          f"{books['without_receipt_by_first_node']} ({KILLED} was killed); legs of answers resumed on another "
          f"node: {books['resumed_legs']}, "
          f"{books['charged_on_chain']} wei charged on chain, {books['paid_out']} paid out)")
    print(f"clients that left mid-answer: {books['left']}")
    if added:
        print(f"settlement path, operator CPU per job: +{median:.0f} us end to end, median of {pairs} pair(s) "
              f"{[round(a) for a in added]} (target {TARGET_US:.0f}) {'met' if median <= TARGET_US else 'NOT MET'}; "
              f"its parts in process {parts['total_us']:.0f} us")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"micro": parts, "added_us_per_job": added,
                                          "added_median_us": median if added else None,
                                          "books": books}, indent=2))


if __name__ == "__main__":
    main()
