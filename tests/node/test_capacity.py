"""A node whose Ollama's parallelism is not configured learns it from its jobs (odla/node/capacity.py)."""

import threading
import time

import httpx
import pytest

from odla.core.usage import Usage
from odla.node.capacity import RAISE_AFTER, RETRY_S, Learning
from tests.helpers import wait_for

# --- the rule alone --------------------------------------------------------------------------------


def test_slots_grow_while_every_slot_runs_well_and_fall_back_where_ollama_queued():
    learning = Learning()
    for slots in range(1, 4):  # each level: RAISE_AFTER jobs that ran with every slot busy, none queued
        assert learning.slots == slots
        for i in range(RAISE_AFTER):
            changed = learning.judge(slots, queued=False, speed=10.0, max_slots=16, now=0.0)
        assert changed
    assert learning.slots == 4
    assert not learning.judge(2, queued=False, speed=10.0, max_slots=16, now=0.0)  # a slot was free: no news
    assert learning.judge(4, queued=True, speed=10.0, max_slots=16, now=1.0)  # Ollama queued the 4th
    assert learning.slots == 3 and learning.ceiling == 4
    for _ in range(5 * RAISE_AFTER):  # 3 runs well, but 4 is not tried again before RETRY_S
        learning.judge(3, queued=False, speed=10.0, max_slots=16, now=2.0)
    assert learning.slots == 3
    for _ in range(RAISE_AFTER):
        learning.judge(3, queued=False, speed=10.0, max_slots=16, now=2.0 + RETRY_S)
    assert learning.slots == 4  # tried again, once the wait is over


def test_a_job_more_that_adds_no_output_is_a_slot_too_many_and_max_slots_caps():
    learning = Learning(slots=2)
    learning.judge(1, queued=False, speed=30.0, max_slots=16, now=0.0)  # alone: 30 tok/s
    assert learning.judge(2, queued=False, speed=14.0, max_slots=16, now=0.0)  # two: 28 in all, less
    assert learning.slots == 1
    capped = Learning(slots=2)
    for _ in range(4 * RAISE_AFTER):
        capped.judge(2, queued=False, speed=10.0, max_slots=2, now=0.0)
    assert capped.slots == 2
    assert not Learning().judge(1, queued=None, speed=10.0, max_slots=16, now=0.0)  # a cold load says nothing


# --- a node in front of Ollamas of 8 and of 1 -------------------------------------------------------

def load(url: str, stop: threading.Event, clients: int) -> list[threading.Thread]:
    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            with httpx.stream("POST", f"{url}/inference", json={"model": "llama3", "prompt": f"c{i} {n}"},
                              timeout=60) as resp:
                for _ in resp.iter_lines():
                    pass
    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads


def slots_of(net) -> tuple[int, bool]:
    row = net.listing()["n1"]
    return row["slots"].get("llama3:latest", 0), row["slots_learned"]


@pytest.mark.solo  # timed: it learns from waits, which a busy machine blurs
def test_a_node_left_at_its_default_learns_an_ollama_of_8_within_30_s(net):
    sim = net.sim("--tokens", "20", "--delay", "0.02", "--num-parallel", "8")
    net.operator()
    net.node("n1", sim, OLLAMA_NUM_PARALLEL="")
    net.wait_nodes("n1")
    assert slots_of(net) == (1, True)
    stop = threading.Event()
    threads = load(net.op_url, stop, 12)
    try:
        began = time.monotonic()
        wait_for(lambda: slots_of(net)[0] >= 7, timeout=30)
        learned_in = time.monotonic() - began
        waited_then = httpx.get(f"{sim}/_sim/stats").json()["queue_s"]
        time.sleep(3)  # at 8, and probing 9 now and then
        queue_length = (httpx.get(f"{sim}/_sim/stats").json()["queue_s"] - waited_then) / 3
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert learned_in < 30 and 7 <= slots_of(net)[0] <= 16, slots_of(net)  # (noise may cost or add one)
    assert queue_length <= 1, queue_length  # once learned, Ollama's queue holds one job at most, on average


@pytest.mark.solo  # timed: it learns from waits, which a busy machine blurs
def test_a_node_in_front_of_an_ollama_of_1_stays_at_1(net):
    sim = net.sim("--tokens", "20", "--delay", "0.02", "--num-parallel", "1")
    net.operator()
    net.node("n1", sim, OLLAMA_NUM_PARALLEL="")
    net.wait_nodes("n1")
    stop = threading.Event()
    threads = load(net.op_url, stop, 4)
    try:
        time.sleep(3)  # it tries 2 once, and Ollama queues
        waited = httpx.get(f"{sim}/_sim/stats").json()["queue_s"]
        time.sleep(3)
        waited_since = httpx.get(f"{sim}/_sim/stats").json()["queue_s"] - waited
    finally:
        stop.set()
        for thread in threads:
            thread.join(30)
    assert slots_of(net) == (1, True)
    assert waited_since < 0.1, waited_since  # and not again (for RETRY_S)


def test_configured_slots_are_not_learned():
    from odla.node.capacity import Capacity, Running

    capacity = Capacity(api=None, parallel=3)  # as num_parallel() gives it when configured
    assert capacity.slots_for("llama3:latest") == 3 and not capacity.learned
    for _ in range(4 * RAISE_AFTER):  # jobs that would teach a learning node more slots
        job = capacity.started("llama3")
        job.running = 3
        assert not capacity.ended(job, Usage(output_tokens=10, load_duration=1_000, eval_duration=100_000_000))
    assert capacity.slots_for("llama3:latest") == 3 and isinstance(job, Running)
