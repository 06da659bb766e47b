"""Pulling a model onto nodes through the operator, as real processes: a node killed mid-pull is
replaced, and the operator holds none of the model's bytes."""

import json
import signal
import time
from pathlib import Path

import httpx

from tests.helpers import wait_for

MISTRAL = 4113301824
RATE = 1.5e9  # bytes a second: a pull of mistral takes its simulator some 2.7 s


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


def test_a_node_killed_mid_pull_is_replaced_and_the_operator_holds_no_model_bytes(net):
    operator = net.operator()
    for i in range(4):
        net.node(f"n{i}", net.sim("--pull-rate", str(RATE)))
    net.wait_nodes("n0", "n1", "n2", "n3")
    wait_for(lambda: all(n["healthy"] for n in net.listing().values()))
    before = rss_mb(operator.pid)
    began = time.monotonic()
    peak = before
    with httpx.stream("POST", f"{net.op_url}/api/pull", json={"model": "mistral"},
                      headers={"X-ODLA-Replicas": "3"}, timeout=60) as resp:
        targets = resp.headers["x-odla-nodes"].split(",")
        lines = resp.iter_lines()
        progress = [json.loads(next(lines)) for _ in range(3)]
        victim = targets[0]
        net.nodes[victim].send_signal(signal.SIGKILL)
        for line in lines:
            progress.append(json.loads(line))
            peak = max(peak, rss_mb(operator.pid))
    took = time.monotonic() - began
    one_pull = MISTRAL / RATE
    assert progress[-1] == {"status": "success"}, progress[-3:]
    failed = [p["status"] for p in progress if "failed" in p.get("status", "")]
    assert len(failed) == 1 and failed[0].startswith(f"node {victim} failed: connection lost")
    spare = failed[0].rsplit("pulling on ", 1)[1].split()[0]
    having = json.loads(httpx.get(f"{net.op_url}/api/tags", timeout=10).text)["models"]
    nodes = next(m["nodes"] for m in having if m["name"] == "mistral:latest")
    assert sorted(nodes) == sorted([*targets[1:], spare]) and victim not in nodes
    assert took < 2 * one_pull + 3, (took, one_pull)  # within the time of one more pull
    assert peak - before < 15, (before, peak)  # progress lines only: 3 × 4.1 GB went to the nodes, not through here
