"""odla.operator.scheduler alone: which node gets a job, claims, and the fair queue (no sockets: no I/O here)."""

import asyncio

import pytest

from odla.core.protocol import LoadedModel
from odla.operator.registry import Registry
from odla.core.errors import QueueFull, QueueTimeout
from odla.operator.scheduler import Scheduler

NOW = 1_800_000_000.0
LATER = "2027-03-15T08:00:00Z"  # after NOW: still loaded


def cluster(**nodes):
    """``name={"slots": n, "warm": bool, "speed": tps, "claims": tps, "models": [...]}`` -> a scheduler
    over them: ``speed`` as the operator saw the node's answers arrive, ``claims`` as the node says;
    each node was seen to answer ``slots`` jobs at once."""
    reg = Registry(prune_after=60, clock=lambda: NOW)
    for name, spec in nodes.items():
        models = spec.get("models", ["llama3:latest"])
        node = reg.register(name, f"http://{name}", models, slots={m: spec.get("slots", 1) for m in models},
                            loaded=[LoadedModel(name=m, expires_at=LATER) for m in models] if spec.get("warm") else [],
                            tokens_per_s={m: spec["claims"] for m in models} if "claims" in spec else {})
        if "speed" in spec:
            for m in models:
                node.saw(m, 101, 100 / spec["speed"])  # 101 tokens, the last 100 at that speed
        for m in models:  # seen answering as many at once as it says it can (its slots are given)
            node.most_at_once[m] = spec.get("slots", 1)
    return Scheduler(reg, clock=lambda: NOW), reg


def pick(sched, model="llama3"):
    claim = sched.try_claim(model)
    return claim and claim.node.node_id


def test_a_free_slot_beats_a_busy_node():
    sched, reg = cluster(a={"slots": 1, "warm": True}, b={"slots": 4})
    assert pick(sched) == "a"  # warm and idle
    assert [pick(sched) for _ in range(4)] == ["b"] * 4  # a's one slot is taken
    assert pick(sched) is None
    assert reg.get("a").active_jobs == 1 and reg.get("b").active_jobs == 4


def test_ranks_warm_idle_then_warm_then_cold_idle_then_cold():
    sched, reg = cluster(warm_busy={"slots": 2, "warm": True}, cold_idle={"slots": 1},
                         cold_busy={"slots": 1}, warm_idle={"slots": 2, "warm": True})
    reg.get("warm_busy").inflight["llama3:latest"] = 1
    reg.get("cold_busy").inflight["mistral:latest"] = 1  # its Ollama runs something else
    assert pick(sched) == "warm_idle"  # rank 0
    assert pick(sched) in ("warm_busy", "warm_idle")  # rank 1: both warm with a free slot now
    assert pick(sched) in ("warm_busy", "warm_idle")
    assert pick(sched) == "cold_idle"  # rank 2: loads the model, but runs nothing else
    assert pick(sched) == "cold_busy"  # rank 3, the only free slot left
    assert pick(sched) is None


def test_the_faster_node_first_within_a_rank():
    sched, _ = cluster(slow={"slots": 4, "warm": True, "speed": 20}, fast={"slots": 4, "warm": True, "speed": 120})
    assert pick(sched) == "fast"


def test_a_nodes_claimed_speed_is_not_believed():
    sched, _ = cluster(liar={"slots": 4, "warm": True, "speed": 20, "claims": 1e12},
                       honest={"slots": 4, "warm": True, "speed": 60, "claims": 60})
    picks = []
    for _ in range(4):
        claim = sched.try_claim("llama3")
        picks.append(claim.node.node_id)
        claim.release()
    assert picks == ["honest"] * 4


@pytest.mark.parametrize("a, b, equal", [(100, 99, True), (100, 101, True), (100, 88, True), (100, 86, False),
                                         (94.9, 95.1, True), (20, 120, False)])
def test_nodes_within_15_percent_are_equals_and_take_turns(a, b, equal):
    """No fixed steps: two speeds a hair apart on either side of a step are still equals."""
    sched, _ = cluster(a={"slots": 8, "warm": True, "speed": a}, b={"slots": 8, "warm": True, "speed": b})
    picks = []
    for _ in range(6):
        claim = sched.try_claim("llama3")
        picks.append(claim.node.node_id)
        claim.release()
    fastest = "a" if a > b else "b"
    if equal:  # they take turns
        assert set(picks) == {"a", "b"} and picks == picks[:2] * 3
    else:
        assert picks == [fastest] * 6


def test_a_node_not_yet_measured_is_tried_before_measured_ones():
    sched, _ = cluster(known={"slots": 4, "warm": True, "speed": 120}, new={"slots": 4, "warm": True})
    assert pick(sched) == "new"


def test_equals_take_turns_and_cursors_are_per_model():
    both = ["llama3:latest", "mistral:latest"]
    sched, _ = cluster(a={"slots": 8, "warm": True, "models": both}, b={"slots": 8, "warm": True, "models": both})
    picks = []
    for _ in range(4):
        claim = sched.try_claim("llama3")
        picks.append(claim.node.node_id)
        claim.release()  # idle again: the two stay equal
    assert picks == ["a", "b", "a", "b"]
    claim = sched.try_claim("mistral")
    assert claim.node.node_id == "a"  # mistral's own cursor


def test_claims_are_the_operators_own_and_never_below_zero():
    sched, reg = cluster(a={"slots": 2, "warm": True})
    claim = sched.try_claim("llama3")
    reg.register("a", "http://a", ["llama3:latest"], slots={"llama3:latest": 2})  # a heartbeat
    assert reg.get("a").active_jobs == 1  # not overwritten by what the node reports
    claim.release()
    claim.release()
    assert reg.get("a").active_jobs == 0 and reg.get("a").inflight == {}


def test_no_node_with_the_model_is_none_not_a_wait():
    sched, _ = cluster(a={})
    assert asyncio.run(sched.claim("mistral")) is None


def test_a_freed_slot_goes_to_the_waiter_first_come_first_served():
    async def go():
        sched, _ = cluster(a={"slots": 1})
        held = await sched.claim("llama3")
        first = asyncio.ensure_future(sched.claim("llama3"))
        second = asyncio.ensure_future(sched.claim("llama3"))
        await asyncio.sleep(0)
        assert sched.waiting == 2 and not first.done()
        held.release()
        got = await first
        assert got.node.node_id == "a" and not second.done()
        assert sched.try_claim("llama3") is None  # handed over: no newcomer can take it first
        got.release()
        (await second).release()
        assert sched.waiting == 0
    asyncio.run(go())


def test_the_queue_is_fair_across_callers():
    async def go():
        sched, _ = cluster(a={"slots": 1})
        held = await sched.claim("llama3")
        served: list[str] = []

        async def job(caller: str, n: int) -> None:
            claim = await sched.claim("llama3", caller)
            served.append(f"{caller}{n}")
            await asyncio.sleep(0)
            claim.release()

        tasks = [asyncio.ensure_future(job("x", i)) for i in range(3)]
        await asyncio.sleep(0)
        tasks.append(asyncio.ensure_future(job("y", 0)))
        await asyncio.sleep(0)
        held.release()
        await asyncio.gather(*tasks)
        assert served == ["x0", "y0", "x1", "x2"]
    asyncio.run(go())


def test_places_are_told_and_follow_the_queue():
    async def go():
        sched, _ = cluster(a={"slots": 1})
        held = await sched.claim("llama3")
        places: list[int] = []
        other = asyncio.ensure_future(sched.claim("llama3", "x"))
        await asyncio.sleep(0)
        mine = asyncio.ensure_future(sched.claim("llama3", "x", place=places.append))
        await asyncio.sleep(0)
        assert places == [2]
        held.release()
        (await other).release()
        (await mine).release()
        assert places[0] == 2 and sched.waiting == 0
    asyncio.run(go())


def test_a_full_queue_refuses_with_retry_after_and_a_long_wait_times_out():
    async def go():
        sched, _ = cluster(a={"slots": 1})
        sched.max_queue, sched.queue_timeout = 1, 0.2
        await sched.claim("llama3")
        waiting = asyncio.ensure_future(sched.claim("llama3"))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as full:
            await sched.claim("llama3")
        assert full.value.status_code == 503 and full.value.headers["Retry-After"]
        with pytest.raises(QueueTimeout) as late:
            await waiting
        assert late.value.status_code == 504 and sched.waiting == 0
    asyncio.run(go())


def test_a_waiter_that_leaves_leaves_no_trace_and_its_grant_is_passed_on():
    async def go():
        sched, reg = cluster(a={"slots": 1})
        held = await sched.claim("llama3")
        leaver = asyncio.ensure_future(sched.claim("llama3"))
        stayer = asyncio.ensure_future(sched.claim("llama3"))
        await asyncio.sleep(0)
        leaver.cancel()
        await asyncio.sleep(0)
        assert sched.waiting == 1
        held.release()
        (await stayer).release()
        assert reg.get("a").active_jobs == 0 and sched.waiting == 0
    asyncio.run(go())


def test_a_node_that_keeps_failing_rests_and_its_rest_only_grows():
    sched, reg = cluster(a={"slots": 4, "warm": True}, b={"slots": 4, "warm": True})
    a = reg.get("a")
    for _ in range(2):
        a.outcome(False, NOW)
    assert a.resting_until is None and a.errors > 0
    assert pick(sched) == "b"  # equal otherwise: the one that failed of late comes after
    a.outcome(False, NOW)  # the third in a row
    first = a.resting_until
    assert first > NOW and a.info(NOW).resting_until is not None
    assert {pick(sched) for _ in range(3)} == {"b"}
    a.outcome(False, NOW - 100)  # a late report of an older failure cannot shorten the rest
    assert a.resting_until >= first
    reg.get("b").resting_until = NOW + 10  # every node rests: they still serve rather than no one
    assert pick(sched) in ("a", "b")
    a.outcome(True, NOW)
    assert a.failures == 0


def test_a_waiter_that_leaves_the_queue_never_takes_a_newer_queue_with_it():
    """A job granted a slot cleans up after itself a few loop turns later; by then its queue may have
    emptied (another waiter left) and been replaced by a new one, with a new waiter in it. The old
    job took the new queue out of the scheduler with it, and the new waiter was never offered a slot:
    seen as one job in a few thousand waiting a minute with every node idle."""
    async def run() -> None:
        sched, _ = cluster(a={"slots": 1, "warm": True})
        held = sched.try_claim("llama3")
        first = asyncio.ensure_future(sched.claim("llama3", ticket="first"))
        leaving = asyncio.ensure_future(sched.claim("llama3", ticket="leaving"))
        await asyncio.sleep(0)  # both wait in the queue
        held.release()  # "first" is granted the slot; it cleans up a few turns later
        leaving.cancel()  # its client left: the queue it leaves is empty, and goes
        newest = asyncio.ensure_future(sched.claim("llama3", ticket="newest"))  # a new queue, holding it
        granted = await asyncio.wait_for(first, 1)
        granted.release()  # the slot is free: it must go to "newest"
        claim = await asyncio.wait_for(newest, 1)
        assert claim.node.node_id == "a"
        claim.release()
        with pytest.raises(asyncio.CancelledError):
            await leaving
    asyncio.run(run())


def test_among_equals_a_cold_job_goes_where_its_load_pushes_no_model_out():
    """No speeds measured yet, the model loaded nowhere: a node with room for it beats an idle one
    that would have to drop its only model (which a later job would load again)."""
    sched, reg = cluster(room={"slots": 4, "models": ["llama3:latest", "mistral:latest"]},
                         full={"slots": 1, "models": ["llama3:latest", "mistral:latest"]})
    for name, room in (("room", 2), ("full", 1)):
        node = reg.register(name, f"http://{name}", ["llama3:latest", "mistral:latest"],
                            slots={"llama3:latest": 4 if name == "room" else 1, "mistral:latest": 1},
                            loaded=[LoadedModel(name="llama3:latest", expires_at=LATER)], max_models=room)
        node.most_at_once.update({"llama3:latest": 4, "mistral:latest": 1})
    reg.get("room").inflight["llama3:latest"] = 1  # it runs something; the other is idle
    assert pick(sched, "mistral") == "room"
