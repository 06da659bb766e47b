"""make demo: the whole network on this machine, a prompt through it, and everything stopped after.

Uses the Ollama at OLLAMA_HOST when one answers (and a model it has); otherwise starts
the simulator (sim/ollama_sim.py) in its place and says so.

make demo-settle (``--settle``): the same network paid through a local chain (anvil, from
contracts/node_modules; never a public chain): the escrow deployed, a wallet signing in and
depositing, jobs charged in the ledger, an epoch settled on chain and a node claiming its earnings.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import json

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from odla.settlement.anvil import ANVIL, ANVIL_KEYS  # noqa: E402  (a path and constants: nothing heavy)
PROMPT = "Write a haiku about distributed computing"
procs: list[subprocess.Popen] = []


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    log = open(ROOT / ".venv" / f"demo-{name}.log", "w")
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    procs.append(proc)
    say(f"started {name} (pid {proc.pid}), log in .venv/demo-{name}.log")
    return proc


def stop_all() -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in reversed(procs):
        try:
            proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def real_ollama(host: str) -> Optional[str]:
    """The first model of the Ollama at ``host``, or None when none answers."""
    url = host if "://" in host else f"http://{host}"
    try:
        if "Ollama is running" not in httpx.get(url, timeout=2).text:
            return None
        models = httpx.get(f"{url}/api/tags", timeout=5).json()["models"]
    except (httpx.HTTPError, ValueError, KeyError):
        return None
    return models[0]["model"] if models else None


def wait_until(check, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except httpx.HTTPError:
            pass
        for proc in procs:
            if proc.poll() is not None:
                raise SystemExit(f"demo: a process exited early (code {proc.returncode}); see .venv/demo-*.log")
        time.sleep(0.1)
    raise SystemExit(f"demo: timed out waiting for {what}; see .venv/demo-*.log")


settle_env: dict[str, str] = {}
"With --settle: the environment every process gets (the demo's config file, the wallet)."


def start_chain() -> str:
    """A local chain and the escrow on it; the config every process reads. Nothing public."""
    if not ANVIL.exists():
        raise SystemExit("demo: anvil is missing: make demo-settle installs it (npm ci in contracts/)")
    port = free_port()
    say(f"Starting a local chain (anvil) on 127.0.0.1:{port}: test ETH, nothing public")
    log = open(ROOT / ".venv" / "demo-anvil.log", "w")
    procs.append(subprocess.Popen([str(ANVIL), "--host", "127.0.0.1", "--port", str(port)], stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True))
    rpc = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.post(rpc, json={"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []},
                                  timeout=1).status_code == 200, "the chain")
    config = ROOT / ".venv" / "demo-settle.json"
    config.write_text(json.dumps({"chain_rpc_url": rpc, "chain_id": 31337, "log_level": "warning",
                                  "prices": {"*": {"prompt": 2_000_000, "output": 5_000_000}},
                                  "operator_fee_bps": 500, "epoch_seconds": 3, "chain_poll": 2}))
    settle_env.update({"ODLA_CONFIG": str(config), "OPERATOR_PRIVATE_KEY": ANVIL_KEYS[0],
                       "ODLA_WALLET_KEY": ANVIL_KEYS[3], "XDG_CONFIG_HOME": str(ROOT / ".venv" / "demo-xdg")})
    say("python scripts/escrow.py deploy --withdraw-delay 60")
    deployed = subprocess.run([sys.executable, "scripts/escrow.py", "deploy", "--withdraw-delay", "60"], cwd=ROOT,
                              env={**os.environ, **settle_env}, capture_output=True, text=True)
    print(deployed.stdout + deployed.stderr, end="")
    if deployed.returncode != 0:
        raise SystemExit("demo: the escrow was not deployed")
    address = deployed.stdout.strip().splitlines()[-1].split()[-1]
    config.write_text(json.dumps({**json.loads(config.read_text()), "settlement": "evm", "escrow_address": address}))
    return rpc


def show_settlement(cli: list[str], operator: str, model: str) -> int:
    """Sign in, deposit, run jobs, see the ledger, wait for the epoch on chain, let a node claim."""
    def step(*args: str, **env: str) -> int:
        say("python " + " ".join(args))
        return subprocess.call([sys.executable, *args], cwd=ROOT, env={**os.environ, **settle_env, **env})

    codes = [step("client.py", "login", "--operator", operator)]
    say("A job before any deposit is refused with 402:")
    codes.append(0 if step("client.py", "infer", "hello", "--model", model, "--operator", operator) == 1 else 1)
    codes.append(step("client.py", "deposit", "1000000000000000"))
    say("A deposit alone allows nothing: the client signs off what the operator may charge it")
    codes.append(step("client.py", "allow", "100000000000000", "--operator", operator))
    for prompt in ("What is a ledger?", "Why settle per epoch?"):
        codes.append(step("client.py", "infer", prompt, "--model", model, "--operator", operator))
    say("Waiting for the nodes' receipts and an epoch to be settled on chain")
    wait_until(lambda: httpx.get(f"{operator}/settlement/claims/{node_address(1)}", timeout=2).status_code == 200
               or httpx.get(f"{operator}/settlement/claims/{node_address(2)}", timeout=2).status_code == 200,
               "an epoch settled on chain", timeout=60)
    codes.append(step("client.py", "balance", "--operator", operator))
    claimed = [step("node.py", "claim", NODE_PRIVATE_KEY=ANVIL_KEYS[i], COORDINATOR_URL=operator) for i in (1, 2)]
    codes.append(min(claimed))  # one node may have served no job yet: nothing to claim is not a failure
    return max(codes)


def node_address(i: int) -> str:
    from odla.proofs.identity import Identity
    return Identity(bytes.fromhex(ANVIL_KEYS[i][2:])).address


def run_demo(settle: bool = False) -> int:
    if settle:
        start_chain()
    ollama_host = os.environ.get("OLLAMA_HOST", "http://localhost:11434")
    model = real_ollama(ollama_host)
    if model:
        say(f"Using the real Ollama at {ollama_host}, model {model}")
    else:
        sim_port, model = free_port(), "llama3"
        ollama_host = f"http://127.0.0.1:{sim_port}"
        say(f"No Ollama answers at {os.environ.get('OLLAMA_HOST', 'http://localhost:11434')}: "
            f"starting the Ollama SIMULATOR on {ollama_host} in its place (tokens are made up)")
        start("simulator", ["sim/ollama_sim.py", "--port", str(sim_port), "--models", "llama3,mistral",
                            "--tokens", "24", "--delay", "0.08"], {})
        wait_until(lambda: httpx.get(ollama_host, timeout=1).status_code == 200, "the simulator")

    receipts = ROOT / ".venv" / "demo-jobs.db"
    for stale in (receipts, *receipts.parent.glob("demo-jobs.db-*")):  # this demo's jobs only
        stale.unlink(missing_ok=True)
    op_port = free_port()
    operator = f"http://127.0.0.1:{op_port}"
    say(f"Starting the operator on {operator}")
    start("operator", ["server.py"], {"operator_port": str(op_port), "OPERATOR_HOST": "127.0.0.1",
                                      "ODLA_JOBS_DB": str(receipts), **settle_env})
    wait_until(lambda: httpx.get(f"{operator}/health", timeout=1).status_code == 200, "the operator")

    for i, node_id in enumerate(("node1", "node2"), start=1):
        port = free_port()
        key = {"NODE_PRIVATE_KEY": ANVIL_KEYS[i]} if settle else {  # each node its own key, as on two machines
            "ODLA_NODE_KEY_FILE": str(ROOT / ".venv" / f"demo-{node_id}.key")}
        start(node_id, ["node.py"], {"NODE_ID": node_id, "NODE_PORT": str(port), "NODE_HOST": "127.0.0.1",
                                     "COORDINATOR_URL": operator, "OLLAMA_HOST": ollama_host, **settle_env, **key})
    wait_until(lambda: len(httpx.get(f"{operator}/nodes", timeout=1).json()["nodes"]) == 2,
               "both nodes to register")

    cli = [sys.executable, "client.py"]
    if settle:
        return show_settlement(cli, operator, model)
    say(f"The dashboard, while the demo runs: {operator}/dashboard")
    say(f'python client.py "{PROMPT}" --model {model} --operator {operator} --verbose')
    first = subprocess.call([*cli, PROMPT, "--model", model, "--operator", operator, "--verbose"], cwd=ROOT)
    say("Two prompts at once: each goes to the node predicted to finish it first (a node with the model "
        "loaded may beat an idle one that must load it first); --show-node says which")
    for prompt in ("Explain distributed systems", "What is a quorum?"):
        say(f'python client.py "{prompt}" --model {model} --operator {operator} --show-node &')
    both = [subprocess.Popen([*cli, prompt, "--model", model, "--operator", operator, "--show-node"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for prompt in ("Explain distributed systems", "What is a quorum?")]
    for proc in both:  # printed one after the other, not interleaved
        out, err = proc.communicate(timeout=300)
        sys.stderr.write(err)
        sys.stdout.write(out)
        sys.stdout.flush()
    second = max(proc.returncode for proc in both)
    say(f"python client.py nodes --operator {operator}")
    listed = subprocess.call([*cli, "nodes", "--operator", operator], cwd=ROOT)
    say(f"python client.py jobs --operator {operator}")
    jobs = subprocess.call([*cli, "jobs", "--operator", operator], cwd=ROOT)
    return first or second or listed or jobs


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    code = 1
    try:
        code = run_demo(settle="--settle" in sys.argv[1:])
    except KeyboardInterrupt:
        code = 130
    finally:
        say("Stopping every process the demo started")
        stop_all()
    say("Demo finished" if code == 0 else f"Demo failed (exit {code})")
    sys.exit(code)


if __name__ == "__main__":
    main()
