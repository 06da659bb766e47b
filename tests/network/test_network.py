"""The whole network as real processes: faults it must survive, end to end.

Simulator, operator and nodes each run as ``python X.py``; every test stops every
process it started, by pid, even when it fails.
"""

import asyncio
import contextlib
import json
import re
import signal
import subprocess
import sys
import time

import httpx

from sim.ollama_sim import sim_tokens
from tests.helpers import FAST, ROOT, free_port, wait_for

def client(net, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "client.py", *args, "--operator", net.op_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_node_killed_mid_stream(net):
    """The node serving an answer dies: another node with the model finishes it, and the client
    reads one whole answer; ``--verbose`` says where it came from."""
    sim = net.sim("--tokens", "8")
    net.operator()
    net.node("n1", sim)
    net.node("n2", sim)
    net.wait_nodes("n1", "n2")
    httpx.post(f"{sim}/_sim/config", json={"hold_last": True})
    cli = subprocess.Popen([sys.executable, "client.py", "run", "llama3", "held", "--operator", net.op_url,
                            "--verbose"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(n["active_jobs"] for n in net.listing().values()))
        victim = next(k for k, n in net.listing().items() if n["active_jobs"])
        survivor = ({"n1", "n2"} - {victim}).pop()
        net.nodes[victim].send_signal(signal.SIGKILL)
        wait_for(lambda: net.listing()[survivor]["active_jobs"], timeout=10)  # the rest, on the survivor
        httpx.post(f"{sim}/_sim/config", json={"hold_last": False})
        httpx.post(f"{sim}/_sim/release")
        out, err = cli.communicate(timeout=15)
        assert cli.returncode == 0, err
        assert out.strip() == "".join(sim_tokens("held", 8)) and "Traceback" not in err
        legs = re.search(rf"resumed: +{victim} \((\d+) tokens\), then {survivor} \((\d+) tokens\)", err)
        assert legs and int(legs[1]) + int(legs[2]) == 8, err
    finally:
        cli.kill()
        cli.wait()
    assert net.listing()[victim]["healthy"] is False  # skipped at once...
    for _ in range(3):
        done = client(net, "after", "--model", "llama3")
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "".join(sim_tokens("after", 8))
    net.wait_nodes(survivor, timeout=10)  # ...and pruned after the TTL


def test_operator_restart_while_nodes_keep_running(net):
    sim = net.sim("--tokens", "5")
    operator = net.operator()
    net.node("n1", sim)
    net.node("n2", sim)
    net.wait_nodes("n1", "n2")
    pids = {k: p.pid for k, p in net.nodes.items()}
    operator.stop()
    net.operator()
    began = time.monotonic()
    net.wait_nodes("n1", "n2", timeout=5)
    assert time.monotonic() - began < 0.5 + 2  # one heartbeat interval, plus start-up slack
    assert client(net, "again", "--model", "llama3").returncode == 0
    assert all(p.proc.poll() is None for p in net.nodes.values())
    assert {k: p.pid for k, p in net.nodes.items()} == pids


def test_ollama_down_behind_one_node(net):
    sim = net.sim("--tokens", "5")
    net.operator()
    net.node("n1", sim)
    net.node("n2", f"http://127.0.0.1:{free_port()}")
    wait_for(lambda: net.listing().get("n2", {}).get("healthy") is False and "n1" in net.listing())
    for i in range(4):
        result = client(net, f"p{i}", "--model", "llama3")
        assert result.returncode == 0, result.stderr
    table = client(net, "nodes").stdout
    n2_row = next(line for line in table.splitlines() if line.startswith("n2"))
    assert "UNHEALTHY" in n2_row


def test_ollama_busy_behind_one_node(net):
    good, busy = net.sim("--tokens", "5"), net.sim("--busy")
    net.operator()
    net.node("n1", good)
    net.node("n2", busy)
    net.wait_nodes("n1", "n2")
    for i in range(4):
        result = client(net, f"p{i}", "--model", "llama3")
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "".join(sim_tokens(f"p{i}", 5))


def test_200_concurrent_streams_stay_whole_and_separate(net):
    sim = net.sim("--tokens", "20", "--delay", "0.002")
    net.operator()
    net.node("n1", sim, OLLAMA_NUM_PARALLEL="60")  # 120 slots for 200 streams: some wait their turn
    net.node("n2", sim, OLLAMA_NUM_PARALLEL="60")
    net.wait_nodes("n1", "n2")
    wait_for(lambda: all(n["slots"] == {"llama3:latest": 60} for n in net.listing().values()))

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, list[dict]]:
        prompt = f"request number {i}"
        async with http.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": prompt}) as r:
            assert r.status_code == 200
            return prompt, [json.loads(line) async for line in r.aiter_lines() if line]

    async def all_of_them():
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(timeout=60, limits=limits) as http:
            return await asyncio.gather(*(one(http, i) for i in range(200)))

    results = asyncio.run(all_of_them())
    for prompt, lines in results:
        finals = [line for line in lines if line.get("done")]
        assert finals == [{"done": True}] and lines[-1] == {"done": True}, (prompt, lines[-3:])
        places = [line["queued"] for line in lines if "queued" in line]
        assert places == sorted(places, reverse=True)  # a waiting job only moves forward
        assert [line["token"] for line in lines[:-1] if "token" in line] == sim_tokens(prompt, 20), prompt
    served = {n["node_id"]: n["jobs_total"] for n in net.listing().values()}
    assert sum(served.values()) == 200 and min(served.values()) >= 60, served  # both nodes filled
    stats = httpx.get(f"{sim}/_sim/stats").json()
    assert stats["completed"] == 200


def test_a_stopped_node_costs_a_client_at_most_connect_plus_health_timeout(net):
    """kill -STOP: the kernel still accepts connections, the process never answers."""
    sim = net.sim("--tokens", "3")
    net.operator()
    net.node("n1", sim)
    net.wait_nodes("n1")
    net.node("n2", sim)
    net.wait_nodes("n1", "n2")
    stopped = net.nodes["n1"]
    stopped.send_signal(signal.SIGSTOP)
    took = []
    try:
        for i in range(4):  # equal (cold, idle) nodes take turns: the first job goes to n1
            began = time.monotonic()  # timed in-process: a client program's own start-up is not the cost
            answer = httpx.post(f"{net.op_url}/inference", json={"prompt": f"p{i}", "model": "llama3"}, timeout=30)
            took.append(time.monotonic() - began)
            lines = [json.loads(line) for line in answer.text.splitlines()]
            assert answer.status_code == 200 and lines[-1] == {"done": True}, answer.text
            assert [line["token"] for line in lines[:-1]] == sim_tokens(f"p{i}", 3)
        assert max(took) < FAST["connect_timeout"] + FAST["health_check_timeout"] + 1.5
        assert took[0] > 0.9  # it did wait for the stopped node, once
        row = net.listing().get("n1")
        assert row is None or row["healthy"] is False  # out of rotation (or pruned already)
    finally:
        stopped.send_signal(signal.SIGCONT)  # so that it can be stopped by its pid


def test_a_second_node_with_a_taken_id_or_port_does_not_start_and_harms_nothing(net):
    sim = net.sim()
    net.operator()
    first = net.node("n1", sim)
    net.wait_nodes("n1")
    url = net.listing()["n1"]["url"]
    port = url.rsplit(":", 1)[1]
    same_id = net.start("node.py", NODE_ID="n1", NODE_PORT=str(free_port()), OLLAMA_HOST=sim)
    assert same_id.proc.wait(timeout=20) != 0
    assert "taken by a live node" in same_id.output()
    same_port = net.start("node.py", NODE_ID="n1", NODE_PORT=port, OLLAMA_HOST=sim)
    assert same_port.proc.wait(timeout=20) != 0
    assert f"cannot listen on 127.0.0.1:{port}" in same_port.output() and "listening" not in same_port.output()
    assert net.listing()["n1"]["url"] == url  # the running node's row, untouched
    assert client(net, "still here", "--model", "llama3").returncode == 0
    assert first.proc.poll() is None


def established_to(port: int) -> int:
    """Established TCP connections to 127.0.0.1:``port`` from this machine (the operator's, in these tests)."""
    count = 0
    with open("/proc/net/tcp") as table:
        for row in table.readlines()[1:]:
            remote, state = row.split()[2:4]
            count += state == "01" and int(remote.split(":")[1], 16) == port
    return count


def test_a_stopped_node_keeps_no_given_up_request_and_ends_its_stream(net):
    """Finding 10: requests that clients gave up on while a node was stopped (kill -STOP) leave no
    socket open to it, and a node stopped mid-stream ends the stream with one error line within a
    health check."""
    sim = net.sim("--tokens", "40", "--delay", "0.1")
    net.operator()
    net.node("n1", sim, OLLAMA_NUM_PARALLEL="100")  # every request reaches the node
    net.wait_nodes("n1")
    stopped = net.nodes["n1"]
    reached: list[int] = []
    node_port = int(net.listing()["n1"]["url"].rsplit(":", 1)[1])
    before = established_to(node_port)  # the health checks' keep-alive connection, if any
    httpx.post(f"{sim}/_sim/config", json={"delay": 0.02}).raise_for_status()  # long enough to overlap

    async def seen_answering_100() -> None:  # the operator gives a node the slots it has seen it use
        async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=None)) as http:
            await asyncio.gather(*(http.post(f"{net.op_url}/inference", json={"model": "llama3", "prompt": f"w{i}"})
                                   for i in range(100)))

    asyncio.run(seen_answering_100())
    httpx.post(f"{sim}/_sim/config", json={"delay": 0.1}).raise_for_status()

    async def during() -> None:  # the most connections to the node while the clients wait
        for _ in range(16):
            await asyncio.sleep(0.05)
            reached.append(established_to(node_port))

    async def give_up() -> None:  # before the operator itself would (grace 1 s, then a health check)
        async with httpx.AsyncClient(timeout=0.9, limits=httpx.Limits(max_connections=None)) as http:
            async def one(i: int) -> None:
                with contextlib.suppress(httpx.TimeoutException):
                    await http.post(f"{net.op_url}/inference", json={"model": "llama3", "prompt": f"p{i}"})
            await asyncio.gather(*(one(i) for i in range(100)), during())

    stopped.send_signal(signal.SIGSTOP)
    try:
        asyncio.run(give_up())
        assert max(reached) >= before + 90  # they did reach the stopped node
        # closed as the operator hears each client leave (a moment under load), not left open for ever
        wait_for(lambda: established_to(node_port) <= before + 1, timeout=5)
    finally:
        stopped.send_signal(signal.SIGCONT)
    # Back from its stop, the node has a hundred abandoned jobs to clear and may fail a health
    # check or two (its Ollama busy): a job is sent once the node takes jobs again.
    deadline = time.monotonic() + 15
    while True:
        with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": "p"},
                          timeout=30) as resp:
            lines = resp.iter_lines()
            first = json.loads(next(lines))
            if "token" not in first:
                assert "n1 unhealthy" in first["error"] and time.monotonic() < deadline, first
                time.sleep(0.2)
                continue
            stopped.send_signal(signal.SIGSTOP)
            try:
                began = time.monotonic()
                rest = [json.loads(line) for line in lines]
                took = time.monotonic() - began
            finally:
                stopped.send_signal(signal.SIGCONT)
            break
    assert rest[-1] == {"error": "node n1 failed mid-stream: connection lost", "done": True}, rest[-1]
    assert all("error" not in line for line in rest[:-1])
    assert took < FAST["health_check_interval"] + FAST["health_check_timeout"] + 1.5, took  # one failed check
