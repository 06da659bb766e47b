"""Audits over real processes: a node that answers with another model's tokens under the name it
claims is caught by re-running sampled jobs on its peers, and quarantined; honest nodes are not
(issue 26)."""

import concurrent.futures
import re

import httpx

from tests.helpers import wait_for


def test_a_node_that_substitutes_another_model_is_caught_by_audits_and_gets_no_more_jobs(net):
    slow = ("--seeded", "--num-parallel", "1", "--delay", "0.02")  # one job at a time each: load spreads
    honest = [net.sim(*slow), net.sim(*slow)]
    cheat = net.sim(*slow, "--cheat", "substitute")
    operator = net.operator(audit_rate=1.0)
    for name, sim in (("a", honest[0]), ("b", honest[1]), ("cheat", cheat)):
        net.node(name, sim)
    net.wait_nodes("a", "b", "cheat")
    sent = 0

    def ask(i: int) -> None:
        httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": f"question {i}", "stream": False},
                   timeout=20).raise_for_status()

    def caught() -> bool:  # three clients at once, so that every node serves some
        nonlocal sent
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            list(pool.map(ask, range(sent, sent + 3)))
        sent += 3
        return net.listing()["cheat"]["quarantined"]

    wait_for(caught, timeout=30, interval=0.2)
    rows = net.listing()
    assert rows["cheat"]["audits"]["failed"] >= 1 and rows["cheat"]["reputation"] < 0.5
    for name in ("a", "b"):
        assert not rows[name]["quarantined"] and rows[name]["audits"]["failed"] == 0, rows[name]
    assert rows["a"]["audits"]["passed"] + rows["b"]["audits"]["passed"] >= 1
    metrics = httpx.get(f"{net.op_url}/metrics").text
    assert 'odla_audits_total{result="failed"}' in metrics and "odla_audit_tokens_total" in metrics
    # quarantined: no more jobs for it, while the others serve on
    before = httpx.get(f"{cheat}/_sim/stats").json()["requests"]
    for i in range(6):
        httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": f"after {i}", "stream": False},
                   timeout=10).raise_for_status()
    assert httpx.get(f"{cheat}/_sim/stats").json()["requests"] == before
    # what was found is kept: a restarted operator does not take the cheat back
    operator.stop()
    net.operator(audit_rate=1.0)
    wait_for(lambda: len(net.listing()) == 3, timeout=15)
    rows = net.listing()
    assert rows["cheat"]["quarantined"] and rows["cheat"]["audits"]["failed"] >= 1 and not rows["a"]["quarantined"]


def test_a_node_left_without_peers_is_held_to_the_answers_two_other_nodes_gave_before(net):
    """Canaries are requests two other nodes answered alike: never one the audited node saw (it could
    know it again and answer it honestly alone)."""
    slow = ("--seeded", "--num-parallel", "1", "--delay", "0.02")
    sims = {"a": net.sim(*slow), "b": net.sim(*slow), "c": net.sim(*slow)}
    net.operator(audit_rate=1.0)
    for name in ("b", "c"):
        net.node(name, sims[name])
    net.wait_nodes("b", "c")

    def ask(i: int) -> None:
        httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": f"canary {i}", "stream": False},
                   timeout=20).raise_for_status()

    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # audits pass: their answers become canaries
        list(pool.map(ask, range(6)))
    wait_for(lambda: net.listing()["b"]["audits"]["passed"] + net.listing()["c"]["audits"]["passed"] >= 2)
    net.node("a", sims["a"])
    net.wait_nodes("a", "b", "c")
    for name in ("b", "c"):  # a is alone with its model now, and has seen none of the canaries
        net.nodes[name].stop()
    wait_for(lambda: all(name not in net.listing() or not net.listing()[name]["healthy"] for name in "bc"),
             timeout=15)
    httpx.post(f"{sims['a']}/_sim/config", json={"cheat": "substitute"}).raise_for_status()
    sent = 100

    def caught() -> bool:  # (once it is quarantined no node can take the job: look first)
        nonlocal sent
        if net.listing()["a"]["quarantined"]:
            return True
        sent += 1
        ask(sent)
        return net.listing()["a"]["quarantined"]

    wait_for(caught, timeout=30, interval=0.3)
    assert net.listing()["a"]["audits"]["failed"] >= 1
    failed = re.search(r'odla_audits_total\{result="failed"\} (\S+)', httpx.get(f"{net.op_url}/metrics").text)
    assert failed and float(failed[1]) >= 1
