"""odla.operator.forecast and the scheduler's pick by predicted finish (no sockets, the clock moved by hand)."""

import asyncio
import json

import pytest

from odla.core.names import Prompt, requested
from odla.core.protocol import LoadedModel
from odla.operator.forecast import DEFAULT_LOAD_S, DEFAULT_TOKENS, Forecaster
from odla.operator.registry import Registry
from odla.operator.scheduler import Scheduler

LLAMA = "llama3:latest"
WALL_LATER = "2099-01-01T00:00:00Z"  # still loaded whatever the clock


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def network(**nodes):
    """``name={"speed": tokens/s, "slots": n, "warm": [models], "models": [...], "load": s}``."""
    clock = Clock()
    reg = Registry(prune_after=600, clock=clock)
    for name, spec in nodes.items():
        models = spec.get("models", [LLAMA])
        node = reg.register(name, f"http://{name}", models, slots={m: spec.get("slots", 1) for m in models},
                            loaded=[LoadedModel(name=m, expires_at=WALL_LATER) for m in spec.get("warm", [])])
        for m in models:
            node.saw(m, 101, 100 / spec["speed"])
            node.most_at_once[m] = spec.get("slots", 1)  # seen answering with as many at once as it says
        if "load" in spec:
            node.load_s[LLAMA] = spec["load"]
    return Scheduler(reg, clock=clock), reg, clock


def test_the_parts_of_a_prediction():
    sched, reg, clock = network(fast={"speed": 100, "warm": [LLAMA]}, cold={"speed": 100, "load": 2.0})
    forecast = sched.forecast
    fast, cold = reg.get("fast"), reg.get("cold")
    assert forecast.predict(fast, LLAMA, clock.now, 50, 100) == (0.0, 0.0, 0.5, 50, 0.0)  # warm and free: the answer
    assert forecast.predict(cold, LLAMA, clock.now, 50, 100) == (0.0, 2.0, 0.5, 50, 0.0)  # its measured load first
    claim = sched.hold(fast, LLAMA, tokens=300)  # predicted to end in 3 s
    assert forecast.predict(fast, LLAMA, clock.now, 50, 100).wait == pytest.approx(3.0)
    clock.now += 2
    assert forecast.predict(fast, LLAMA, clock.now, 50, 100).wait == pytest.approx(1.0)
    clock.now += 3  # 2 s past its predicted end: expected to run as long again
    assert forecast.predict(fast, LLAMA, clock.now, 50, 100).wait == pytest.approx(2.0)
    claim.release()
    assert forecast.predict(fast, LLAMA, clock.now, 50, 100).wait == 0.0 and fast.ends == {}


def test_a_load_waits_for_a_busy_model_to_be_evicted():
    both = [LLAMA, "mistral:latest"]
    sched, reg, clock = network(one={"speed": 100, "models": both, "warm": ["mistral:latest"]})
    node = reg.get("one")
    assert node.max_models == 0 and node.most_loaded == 1
    assert node.needs_room(LLAMA, clock.now) and not node.needs_room(LLAMA, clock.now, known=True)
    reg.register("one", "http://one", both, loaded=[LoadedModel(name=LLAMA, expires_at=WALL_LATER)])
    reg.register("one", "http://one", both, loaded=[LoadedModel(name="mistral:latest", expires_at=WALL_LATER)])
    assert node.max_models == 1  # it dropped llama3 before its time to load mistral: it holds one
    mistral = sched.hold(node, "mistral:latest", tokens=400)  # busy for 4 s
    prediction = sched.forecast.predict(node, LLAMA, clock.now, 100, 100)
    assert prediction.wait == pytest.approx(4.0) and prediction.load == DEFAULT_LOAD_S
    mistral.release()  # idle: Ollama evicts it at once
    assert sched.forecast.predict(node, LLAMA, clock.now, 100, 100).wait == 0.0


def test_a_node_that_holds_one_model_is_known_cold_for_the_one_it_dropped():
    both = [LLAMA, "mistral:latest"]
    sched, reg, clock = network(one={"speed": 100, "models": both, "warm": [LLAMA]})
    node = reg.get("one")
    node.max_models = 1
    node.use("mistral:latest", clock.now + 300, clock.now)  # a job loads mistral: llama3 goes
    assert node.warm("mistral:latest", clock.now) and not node.warm(LLAMA, clock.now)
    node.max_models = 2
    node.use(LLAMA, clock.now + 300, clock.now)
    assert node.warm("mistral:latest", clock.now) and node.warm(LLAMA, clock.now)


def test_a_node_making_room_for_a_model_gets_no_jobs_of_the_one_to_go():
    """Ollama loads a model that needs room only once the model to go is idle: new jobs of that
    model would keep it busy for ever (the second cluster benchmark lost jobs so)."""
    both = [LLAMA, "mistral:latest"]
    sched, reg, clock = network(fast={"speed": 100, "models": both, "warm": [LLAMA], "slots": 4},
                                slow={"speed": 20, "warm": [LLAMA]})
    fast = reg.get("fast")
    assert fast.needs_room("mistral:latest", clock.now) and not fast.needs_room(LLAMA, clock.now)
    assert sched.try_claim("llama3", tokens=100).node is fast
    fast.loading["mistral:latest"] = 1  # a mistral job sent, not yet answered
    assert sched.try_claim("llama3", tokens=100).node.node_id == "slow"
    assert sched.try_claim("mistral", tokens=100).node is fast  # its own model's jobs still go there
    del fast.loading["mistral:latest"]
    assert sched.try_claim("llama3", tokens=100).node is fast


def test_a_job_whose_only_node_is_making_room_for_another_model_waits_for_it():
    both = [LLAMA, "mistral:latest"]
    sched, reg, clock = network(only={"speed": 100, "models": both, "warm": [LLAMA], "slots": 2})
    node = reg.get("only")
    node.loading["mistral:latest"] = 1

    async def main():
        waiting = asyncio.ensure_future(sched.claim("llama3", tokens=100))
        await asyncio.sleep(0.05)
        assert not waiting.done()  # it waits: the node is there, just not taking llama3 for now
        del node.loading["mistral:latest"]
        sched.wake()  # as the relay does when the load is answered
        assert (await asyncio.wait_for(waiting, 0.5)).node is node

    asyncio.run(main())


def test_a_conversations_next_turn_goes_where_its_history_is_cached():
    sched, reg, clock = network(a={"speed": 50, "warm": [LLAMA], "slots": 2}, b={"speed": 50, "warm": [LLAMA], "slots": 2})
    for node in reg.nodes():
        node.prompt_s[LLAMA] = 0.001  # 1 ms a prompt token
    turn = Prompt(tokens=3000, history=2800, conversation="c1")
    picks = set()
    for _ in range(4):  # nobody has it cached: equals take turns
        claim = sched.try_claim("llama3", tokens=50, prompt=turn)
        picks.add(claim.node.node_id)
        assert claim.prediction.prompt == pytest.approx(3.0)
        claim.release()
    assert picks == {"a", "b"}
    reg.get("b").served(LLAMA, "c1")
    for _ in range(4):
        claim = sched.try_claim("llama3", tokens=50, prompt=turn)
        assert claim.node.node_id == "b" and claim.prediction.prompt == pytest.approx(0.2)  # 200 new tokens only
        claim.release()
    reg.get("b").served(LLAMA, "c2")
    reg.get("b").served(LLAMA, "c3")  # two slots: c1's cache is gone there
    assert list(reg.get("b").cached[LLAMA]) == ["c2", "c3"]
    assert {sched.try_claim("llama3", tokens=50, prompt=turn).node.node_id for _ in range(2)} == {"a", "b"}


def test_with_affinity_off_every_node_reads_the_whole_prompt():
    sched, reg, clock = network(a={"speed": 50, "warm": [LLAMA]}, b={"speed": 50, "warm": [LLAMA]})
    sched.forecast.affinity = False
    reg.get("b").served(LLAMA, "c1")
    turn = Prompt(tokens=3000, history=2800, conversation="c1")
    picks = []
    for _ in range(4):
        claim = sched.try_claim("llama3", tokens=50, prompt=turn)
        picks.append(claim.node.node_id)
        claim.release()
    assert sorted(picks) == ["a", "a", "b", "b"]


def test_the_prompt_a_request_names_and_its_conversation_across_turns():
    opening = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "x" * 400}]
    one = requested(json.dumps({"model": "m", "messages": opening}).encode()).prompt
    later = opening + [{"role": "assistant", "content": "y" * 800}, {"role": "user", "content": "z" * 40}]
    two = requested(json.dumps({"model": "m", "messages": later}).encode()).prompt
    assert one.conversation == two.conversation is not None
    assert two.tokens > two.history > one.tokens and two.tokens - two.history == (40 + 8) // 4
    other = requested(json.dumps({"model": "m", "messages": [opening[0], {"role": "user", "content": "w"}]}).encode())
    assert other.prompt.conversation != one.conversation
    assert requested(b'{"model": "m", "prompt": "abcdefgh", "system": "abcd"}').prompt == Prompt(3)


def test_a_load_that_pushes_out_a_model_in_use_costs_that_models_next_load_too():
    both = [LLAMA, "mistral:latest"]
    sched, reg, clock = network(x={"speed": 50, "models": both, "warm": [LLAMA], "load": 1.5},
                                y={"speed": 50, "models": both, "warm": [LLAMA], "load": 1.5})
    x, y = reg.get("x"), reg.get("y")
    for node in (x, y):
        node.load_s["mistral:latest"] = 1.5
    x.use(LLAMA, clock.now + 300, clock.now)  # x ran a llama3 job just now; y's has sat idle
    assert x.evicts_busy("mistral:latest", clock.now) and not y.evicts_busy("mistral:latest", clock.now)
    for _ in range(3):
        claim = sched.try_claim("mistral", tokens=50)
        assert claim.node is y and claim.prediction.load == 1.5  # its own finish is the same on both
        claim.release()
    clock.now += 11  # x's llama3 idle long enough: no loss either
    assert not x.evicts_busy("mistral:latest", clock.now)


def test_lengths_and_loads_are_learned_from_jobs_that_ended():
    forecast = Forecaster()
    reg = Registry(prune_after=60)
    node = reg.register("n", "http://n", [LLAMA])
    assert forecast.length(LLAMA, None) == DEFAULT_TOKENS and forecast.length(LLAMA, 64) == 64
    forecast.learn(node, LLAMA, 40, limited=False, load_ns=3_000_000)  # warm: 3 ms is no load
    forecast.learn(node, LLAMA, 500, limited=True, load_ns=None)  # asked for at most 500: not a natural length
    assert forecast.length(LLAMA, None) == 40 and LLAMA not in node.load_s
    forecast.learn(node, LLAMA, 40, limited=False, load_ns=2_500_000_000)
    assert node.load_s[LLAMA] == 2.5 and forecast.loads[LLAMA] == 2.5
    other = reg.register("m", "http://m", [LLAMA])
    assert forecast.load_time(other, LLAMA) == 2.5  # a node not measured yet: the network's mean for the model


def test_a_job_waits_for_a_fast_busy_node_rather_than_start_on_a_slow_one():
    sched, reg, clock = network(fast={"speed": 100, "warm": [LLAMA]}, slow={"speed": 10, "warm": [LLAMA]})

    async def main():
        first = await sched.claim("llama3", tokens=100)  # 1 s on fast, 10 s on slow
        assert first.node.node_id == "fast"
        waiting = asyncio.ensure_future(sched.claim("llama3", tokens=100))
        await asyncio.sleep(0.05)
        assert not waiting.done() and reg.get("slow").active_jobs == 0  # 1 s wait + 1 s beats 10 s
        first.release()
        second = await asyncio.wait_for(waiting, 1)
        assert second.node.node_id == "fast" and second.prediction.wait == pytest.approx(1.0)
        second.release()
        long_one = await asyncio.wait_for(sched.claim("llama3", tokens=2000), 0.1)  # 20 s on fast: the slow node finishes 100 sooner
        assert long_one.node.node_id == "fast"
        now = await asyncio.wait_for(sched.claim("llama3", tokens=100), 0.1)
        assert now.node.node_id == "slow"

    asyncio.run(main())


def test_a_job_waits_for_a_warm_node_rather_than_load_the_model_on_a_cold_one():
    sched, reg, clock = network(warm={"speed": 50, "warm": [LLAMA]}, cold={"speed": 50, "load": 6.0})

    async def main():
        busy = await sched.claim("llama3", tokens=100)  # 2 s on the warm node
        waiting = asyncio.ensure_future(sched.claim("llama3", tokens=100))  # 2 + 2 s there, 6 + 2 s on cold
        await asyncio.sleep(0.05)
        assert not waiting.done()
        busy.release()
        assert (await asyncio.wait_for(waiting, 1)).node.node_id == "warm"

    asyncio.run(main())
    assert reg.get("cold").jobs_total == 0


def test_a_waiter_takes_the_slow_node_once_the_fast_ones_job_has_overrun_long_enough():
    sched, reg, clock = network(fast={"speed": 100, "warm": [LLAMA]}, slow={"speed": 25, "warm": [LLAMA]})

    async def main():
        stuck = await sched.claim("llama3", tokens=100)  # predicted 1 s; it will hang
        waiting = asyncio.ensure_future(sched.claim("llama3", tokens=100))  # 2 s there, 4 s on slow
        await asyncio.sleep(0.7)  # a look again (RECHECK_S) at the same time: still waits
        assert not waiting.done()
        clock.now += 5  # 4 s past its end: expected to take 4 s more, then 1 s: the slow node's 4 s win
        claim = await asyncio.wait_for(waiting, 2)
        assert claim.node.node_id == "slow"
        claim.release()
        stuck.release()

    asyncio.run(main())


def test_waiters_planned_on_a_node_count_there_for_those_behind_them():
    sched, reg, clock = network(fast={"speed": 100, "warm": [LLAMA]}, slow={"speed": 40, "warm": [LLAMA], "slots": 1})

    async def queued():
        running = await sched.claim("llama3", tokens=100)
        first = asyncio.ensure_future(sched.claim("llama3", tokens=100))  # waits for fast: 2 s against 2.5
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(sched.claim("llama3", tokens=100))  # behind it fast is 3 s: slow's 2.5 wins
        claim = await asyncio.wait_for(second, 0.5)
        assert claim.node.node_id == "slow" and not first.done()
        running.release()
        assert (await asyncio.wait_for(first, 0.5)).node.node_id == "fast"

    asyncio.run(queued())


def test_equals_take_turns_and_a_free_one_goes_before_a_busy_equal():
    sched, reg, clock = network(a={"speed": 50, "warm": [LLAMA], "slots": 2}, b={"speed": 52, "warm": [LLAMA], "slots": 2})
    picks = []
    for _ in range(4):
        claim = sched.try_claim("llama3", tokens=10)
        picks.append(claim.node.node_id)
        claim.release()
    assert sorted(picks) == ["a", "a", "b", "b"]
    held = sched.try_claim("llama3", tokens=10)
    other = sched.try_claim("llama3", tokens=10)
    assert other.node is not held.node  # the idle equal before the busy one


def test_of_a_hundred_nodes_the_fastest_and_their_equals_take_the_jobs():
    """100 warm nodes of 10-59 tokens/s, one slot each: jobs go to those within 15 % of 59 tokens/s, in turn."""
    sched, reg, clock = network(**{f"n{i}": {"speed": 10 + i % 50, "warm": [LLAMA]} for i in range(100)})
    picked = []
    for _ in range(32):
        claim = sched.try_claim("llama3", tokens=100)
        picked.append(claim.node)
        claim.release()
    assert min(node.speed(LLAMA) for node in picked) * 1.15 >= 59  # only nodes of 52-59 tokens/s
    assert len({node.node_id for node in picked}) == 16  # and all 16 of them, in turn


def test_a_node_told_how_many_models_its_ollama_holds_is_not_thought_full():
    """OLLAMA_MAX_LOADED_MODELS, reported by the node: a node holding one of its two has room, so a job
    of the other model there pushes nothing out (the default cluster loaded models up to 5 times
    while the operator took such a node to be full), and a swap it is seen making does not change it."""
    from odla.node.capacity import max_loaded

    assert max_loaded({"OLLAMA_MAX_LOADED_MODELS": "2"}) == 2
    assert max_loaded({}) is None and max_loaded({"OLLAMA_MAX_LOADED_MODELS": "two"}) is None
    both = [LLAMA, "mistral:latest"]
    sched, reg, clock = network(one={"speed": 100, "models": both, "warm": [LLAMA]})
    node = reg.register("one", "http://one", both, loaded=[LoadedModel(name=LLAMA, expires_at=WALL_LATER)],
                        max_models=2)
    assert node.max_models == 2 and not node.needs_room("mistral:latest", clock.now)
    assert not node.evicts_busy("mistral:latest", clock.now)
    reg.register("one", "http://one", both, loaded=[LoadedModel(name="mistral:latest", expires_at=WALL_LATER)],
                 max_models=2)
    assert node.max_models == 2
