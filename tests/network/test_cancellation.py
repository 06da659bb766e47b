"""A client that leaves at any moment stops the work at Ollama within 1 s, on every door.

The chain is real (simulator -> node -> operator, each on its own socket). The
simulator counts cancellations before the first token (``cancelled_early``): a request
waiting in Ollama's queue, one whose model is loading, one asked with ``"stream": false``.
"""

import httpx
import pytest

from tests.helpers import Sim, node_ids, wait_for

DOORS = [
    ("/inference", {"prompt": "q"}),
    ("/api/generate", {"prompt": "q"}),
    ("/api/generate", {"prompt": "q", "stream": False}),
    ("/api/chat", {"messages": [{"role": "user", "content": "q"}]}),
    ("/api/chat", {"messages": [{"role": "user", "content": "q"}], "stream": False}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}], "stream": True}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "q"}]}),
    ("/v1/completions", {"prompt": "q"}),
]


@pytest.fixture
def chain(operator, node):
    with Sim(models=["llama3"], tokens=4) as sim:
        op = operator()
        node(op.url, sim.url, "n1", num_parallel=2)  # says 2 slots; the queued test gives Ollama 1
        wait_for(lambda: node_ids(op.url) == {"n1"})
        yield sim, op


def leave_after(url: str, body: dict, seconds: float) -> None:
    """Send a request and give up on it after ``seconds`` (the connection is closed)."""
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url, json={"model": "llama3", **body}, timeout=httpx.Timeout(10, read=seconds))


@pytest.mark.parametrize("path, body", DOORS, ids=[f"{p} {b.get('stream', 'default')}" for p, b in DOORS])
def test_leaving_while_the_model_loads(chain, path, body):
    sim, op = chain
    sim.configure(load_delay=4)
    leave_after(op.url + path, body, 0.5)
    wait_for(lambda: sim.stats()["cancelled_early"] == 1, timeout=1)
    assert sim.stats()["completed"] == 0


@pytest.mark.parametrize("path, body", DOORS[:2] + DOORS[5:6])
def test_leaving_while_queued_at_ollama(chain, path, body):
    sim, op = chain
    sim.configure(num_parallel=1, hold_last=True)
    with httpx.stream("POST", f"{op.url}/inference", json={"model": "llama3", "prompt": "first"}, timeout=10) as busy:
        lines = busy.iter_lines()  # kept: a dropped iterator closes the connection
        next(lines)  # the first request holds Ollama's only slot
        leave_after(op.url + path, body, 0.5)
        wait_for(lambda: sim.stats()["cancelled_early"] == 1, timeout=1)
        sim.release()
    assert sim.stats()["completed"] == 1  # the first one, and nothing for the one that left


def test_leaving_with_stream_false_while_it_generates(chain):
    sim, op = chain
    sim.configure(delay=1)  # 4 tokens: the whole answer would take 4 s
    leave_after(f"{op.url}/api/chat", {"messages": [{"role": "user", "content": "q"}], "stream": False}, 0.5)
    wait_for(lambda: sim.stats()["cancelled_early"] == 1, timeout=1)


def test_leaving_the_operators_queue_leaves_no_trace(chain):
    sim, op = chain
    sim.configure(hold_last=True)
    streams = [httpx.stream("POST", f"{op.url}/inference", json={"model": "llama3", "prompt": f"p{i}"}, timeout=10)
               for i in range(2)]
    try:
        held = [s.__enter__() for s in streams]
        lines = [r.iter_lines() for r in held]  # kept: a dropped iterator closes the connection
        for it in lines:
            next(it)  # both of the node's slots are busy
        with httpx.stream("POST", f"{op.url}/inference", json={"model": "llama3", "prompt": "third"},
                          timeout=10) as queued:
            assert next(queued.iter_lines()) == '{"queued": 1, "done": false}'
        sim.release()
    finally:
        for s in streams:
            s.__exit__(None, None, None)
    assert sim.stats()["requests"] == 2  # the one that left never reached Ollama
    wait_for(lambda: httpx.get(f"{op.url}/nodes").json()["nodes"][0]["active_jobs"] == 0)
