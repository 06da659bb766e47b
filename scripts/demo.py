"""make demo: the whole network on this machine, a prompt through it, and everything stopped after.

Uses the Ollama at OLLAMA_HOST when one answers (and a model it has); otherwise starts
the simulator (sim/ollama_sim.py) in its place and says so.
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

import httpx

ROOT = Path(__file__).resolve().parent.parent
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


def run_demo() -> int:
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
                                      "ODLA_JOBS_DB": str(receipts)})
    wait_until(lambda: httpx.get(f"{operator}/health", timeout=1).status_code == 200, "the operator")

    for node_id in ("node1", "node2"):
        port = free_port()
        start(node_id, ["node.py"], {"NODE_ID": node_id, "NODE_PORT": str(port), "NODE_HOST": "127.0.0.1",
                                     "COORDINATOR_URL": operator, "OLLAMA_HOST": ollama_host})
    wait_until(lambda: len(httpx.get(f"{operator}/nodes", timeout=1).json()["nodes"]) == 2,
               "both nodes to register")

    cli = [sys.executable, "client.py"]
    say(f"The dashboard, while the demo runs: {operator}/dashboard")
    say(f'python client.py "{PROMPT}" --model {model} --operator {operator} --verbose')
    first = subprocess.call([*cli, PROMPT, "--model", model, "--operator", operator, "--verbose"], cwd=ROOT)
    say("Two prompts at once: each node starts with one slot per model (it learns how many its Ollama "
        "runs at once as jobs run), so the scheduler gives one to each")
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
        code = run_demo()
    except KeyboardInterrupt:
        code = 130
    finally:
        say("Stopping every process the demo started")
        stop_all()
    say("Demo finished" if code == 0 else f"Demo failed (exit {code})")
    sys.exit(code)


if __name__ == "__main__":
    main()
