"""Stopping and refusing, as real processes: Ctrl-C mid-answer ends every stream with a last line
and the process within 2 s; a node that cannot join says why in one line and stops."""

import re
import signal
import threading
import time

import httpx
import pytest

from tests.helpers import free_port, wait_for

DOORS = {
    "inference": ("/inference", {"model": "llama3", "prompt": "p"}),
    "ollama": ("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "q"}]}),
    "openai": ("/v1/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": "q"}],
                                        "stream": True}),
}


def read_all(url: str, doors: dict) -> tuple[dict[str, list[str]], list[threading.Thread]]:
    """Start one streamed request per door; their lines land in the dict as each ends."""
    got: dict[str, list[str]] = {}

    def read(name: str, path: str, body: dict) -> None:
        lines = got[name] = []
        try:
            with httpx.stream("POST", f"{url}{path}", json=body, timeout=30) as resp:
                lines.extend(line for line in resp.iter_lines() if line)  # as they come
        except httpx.HTTPError as exc:
            lines.append(f"broken: {exc!r}")

    threads = [threading.Thread(target=read, args=(name, *door)) for name, door in doors.items()]
    for thread in threads:
        thread.start()
    return got, threads


def ended_with(lines: list[str], message: str) -> bool:
    """The stream's last line is an error saying ``message``, in its API's shape."""
    return bool(lines) and message in lines[-1] and '"error"' in lines[-1]


def stop_mid_answer(proc, got: dict, threads: list[threading.Thread], streaming) -> float:
    wait_for(streaming, timeout=10)
    began = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.proc.wait(timeout=10)
    took = time.monotonic() - began
    for thread in threads:
        thread.join(10)
    return took


@pytest.mark.parametrize("link", ["http", "dial"])
def test_ctrl_c_on_a_node_mid_answer_ends_every_stream_with_a_last_line(net, link):
    sim = net.sim("--tokens", "400", "--delay", "0.02")
    net.operator()
    node = net.node("n1", sim, OLLAMA_NUM_PARALLEL="4", NODE_LINK=link)
    net.wait_nodes("n1")
    got, threads = read_all(net.op_url, DOORS)
    took = stop_mid_answer(node, got, threads, lambda: all(len(got.get(door, ())) > 1 for door in DOORS))
    assert took < 2, (took, node.output()[-3000:])
    for door, lines in got.items():
        assert len(lines) > 2 and ended_with(lines, "the node is shutting down"), (door, lines[-2:])
    assert "n1" not in net.listing()  # it left the network on its way out
    assert "Traceback" not in node.output()


def test_ctrl_c_on_the_operator_ends_running_and_queued_answers_with_a_last_line(net):
    sim = net.sim("--tokens", "400", "--delay", "0.02")
    operator = net.operator()
    net.node("n1", sim, OLLAMA_NUM_PARALLEL="1")
    net.wait_nodes("n1")
    got, threads = read_all(net.op_url, {"running": DOORS["inference"]})
    wait_for(lambda: net.listing()["n1"]["active_jobs"] == 1, timeout=10)
    more, more_threads = read_all(net.op_url, {"queued": DOORS["inference"], **DOORS})  # one slot: these wait
    time.sleep(0.5)
    took = stop_mid_answer(operator, got, threads + more_threads, lambda: True)
    assert took < 2, took
    got |= more
    assert len(got["running"]) > 2 and ended_with(got["running"], "the operator is shutting down"), got["running"]
    for door in ("queued", *DOORS):  # waiting: a place line, then the error (or a 503 before any line)
        assert ended_with(got[door], "the operator is shutting down"), (door, got[door])
    assert "Traceback" not in operator.output()


def test_a_node_with_a_wrong_join_token_stops_and_says_why_in_one_line(net):
    sim = net.sim()
    net.operator(join_token="the-operators-token")
    node = net.node("n1", sim, ODLA_JOIN_TOKEN="a-wrong-token-here")
    assert node.proc.wait(timeout=15) == 1
    printed = node.output()
    assert "refused this node: missing or wrong join token" in printed and "ODLA_JOIN_TOKEN" in printed
    assert "Traceback" not in printed and "retrying" not in printed


def test_a_node_started_before_an_operator_that_refuses_it_stops_too(net):
    """The operator comes up after the node: the heartbeat that meets the refusal stops the node."""
    sim = net.sim()
    node = net.node("n1", sim, ODLA_JOIN_TOKEN="a-wrong-token-here")
    time.sleep(1.0)  # retrying: nothing listens yet
    assert node.proc.poll() is None
    net.operator(join_token="the-operators-token")
    assert node.proc.wait(timeout=15) == 1
    printed = node.output()
    assert "refused this node" in printed and "not retrying" in printed and "Traceback" not in printed


def test_a_taken_node_id_is_one_line_without_a_traceback(net):
    sim = net.sim()
    net.operator()
    net.node("n1", sim)
    net.wait_nodes("n1")
    second = net.start("node.py", NODE_ID="n1", NODE_PORT=str(free_port()), OLLAMA_HOST=sim)
    assert second.proc.wait(timeout=20) == 1
    printed = second.output()
    assert "node: node id 'n1' is taken by a live node at http://127.0.0.1:" in printed
    assert "Traceback" not in printed and "startup failed" not in printed
    assert re.search(r"\b409\b", printed) is None  # (a port such as 34097 may hold the digits)
