"""Slots shared by several operators as leases in a real redis-server (issue 17's foundation)."""

import asyncio
import contextlib
import random
from typing import AsyncIterator, Awaitable, Callable

from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from odla.operator.leases import FREED, Leases


def run(coro):
    return asyncio.run(coro)


def in_redis(server, scenario: Callable[..., Awaitable[None]], clients: int = 1) -> None:
    """Run ``scenario(*redis_clients)`` (each client as an operator would hold one), closing them after."""
    async def go() -> None:
        redis = [Redis.from_url(server.url) for _ in range(clients)]
        try:
            await scenario(*redis)
        finally:
            for client in redis:
                await client.aclose()
    run(go())


@contextlib.asynccontextmanager
async def subscribed(redis: Redis) -> AsyncIterator[PubSub]:
    """Listening on ``odla:freed`` as an operator does, the subscription confirmed."""
    async with redis.pubsub() as sub:
        await sub.subscribe(FREED)
        assert (await sub.get_message(timeout=1))["type"] == "subscribe"
        yield sub


def test_two_operators_never_hold_more_leases_than_slots(redis_server):
    """Two clients (two operators) race for a 2-slot node; a job holds its slot a moment, then releases."""
    held, most = set(), [0]

    async def operator(name: str) -> int:
        redis = Redis.from_url(redis_server.url)
        leases = Leases(redis, lease_seconds=30)
        granted = 0
        try:
            for i in range(60):
                job = f"{name}-{i}"
                if await leases.claim("n1", "llama3:latest", job, slots=2):
                    granted += 1
                    held.add(job)
                    most[0] = max(most[0], len(held))
                    await asyncio.sleep(random.uniform(0, 0.004))
                    held.discard(job)
                    await leases.release("n1", "llama3:latest", job)
                else:
                    await asyncio.sleep(0.001)
        finally:
            await redis.aclose()
        return granted

    async def both() -> list[int]:
        return await asyncio.gather(operator("a"), operator("a2"), operator("b"), operator("b2"))

    granted = run(both())
    assert most[0] == 2 and all(g > 0 for g in granted), (most, granted)


def test_a_dead_operators_leases_expire_and_renewed_ones_do_not(redis_server):
    async def scenario(redis: Redis) -> None:
        leases = Leases(redis, lease_seconds=0.3)
        assert await leases.claim("n1", "m", "held", slots=2)
        assert await leases.claim("n1", "m", "renewed", slots=2)
        assert not await leases.claim("n1", "m", "third", slots=2)  # full
        assert await leases.running("n1", "m") == 2
        for _ in range(3):
            await asyncio.sleep(0.15)
            assert await leases.renew("n1", "m", "renewed")
        # "held" was never renewed: its operator died; its slot is free again, the renewed one's is not
        assert await leases.running("n1", "m") == 1
        assert await leases.claim("n1", "m", "third", slots=2)
        assert not await leases.renew("n1", "m", "held")  # expired: not brought back
        await leases.release("n1", "m", "third")
        await leases.release("n1", "m", "renewed")
        assert await leases.running("n1", "m") == 0
        await asyncio.sleep(0.4)
        assert await redis.exists(Leases.key("n1", "m")) == 0  # nothing left behind in Redis
    in_redis(redis_server, scenario)


M = "llama3:latest"


def test_take_turns_the_pick_cursor_across_operators(redis_server):
    """Equal nodes take turns whichever operator picks: n1, n2, n3, n1, ... as two clients alternate;
    a better group comes first; a full node is passed over."""
    async def scenario(a: Redis, b: Redis) -> None:
        ops = [Leases(a), Leases(b)]
        equals = [[("n2", 4), ("n1", 4), ("n3", 4)]]  # given in any order: turns go by node id
        picked = []
        for i in range(7):
            node, place = await ops[i % 2].take(M, f"j{i}", "", equals)
            assert place == 0
            picked.append(node)
            await ops[i % 2].release(node, M, f"j{i}")
        assert picked == ["n1", "n2", "n3", "n1", "n2", "n3", "n1"]
        assert await ops[0].take(M, "better", "", [[("fast", 1)], [("n1", 4)]]) == ("fast", 0)
        assert await ops[1].take(M, "next", "", [[("fast", 1)], [("n1", 4)]]) == ("n1", 0)  # fast is full
    in_redis(redis_server, scenario, clients=2)


def test_take_queues_fairly_across_callers_with_the_same_place_from_any_operator(redis_server):
    """One slot, held. Caller A queues three jobs, then B one: B's job is second (callers take turns),
    the places are the same asked through either client, and the slot goes in that order."""
    async def scenario(a: Redis, b: Redis) -> None:
        ops = [Leases(a), Leases(b)]
        one = [[("n1", 1)]]
        assert await ops[0].take(M, "held", "A", one) == ("n1", 0)
        places = {}
        for i, (job, caller) in enumerate([("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")]):
            places[job] = (await ops[i % 2].take(M, job, caller, one))[1]
        assert places == {"a1": 1, "a2": 2, "a3": 3, "b1": 2}  # on arrival: B goes before A's second
        for job, caller in [("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B")]:  # asked again, elsewhere
            places[job] = (await ops[1].take(M, job, caller, one))[1]
        assert places == {"a1": 1, "b1": 2, "a2": 3, "a3": 4}
        served = []
        await ops[0].release("n1", M, "held")
        for _ in range(4):
            waiting = sorted(places, key=places.get)
            for job in waiting:  # everyone asks; only the first in the queue gets the slot
                node, place = await ops[0].take(M, job, job[0].upper(), one)
                if node:
                    served.append(job)
                    del places[job]
                    await ops[1].release(node, M, job)
                else:
                    places[job] = place
        assert served == ["a1", "b1", "a2", "a3"]
        assert await a.zcard(Leases.queue_keys(M)[0]) == 0
    in_redis(redis_server, scenario, clients=2)


def test_a_caller_whose_jobs_left_is_not_sent_to_the_back_and_dead_tickets_drop_out(redis_server):
    async def scenario(redis: Redis) -> None:
        leases, one = Leases(redis), [[("n1", 1)]]
        assert await leases.take(M, "held", "A", one) == ("n1", 0)
        assert [(await leases.take(M, f"a{i}", "A", one))[1] for i in range(5)] == [1, 2, 3, 4, 5]
        for i in range(5):  # A's client gave up on all of them
            await leases.leave(M, f"a{i}", "A")
        assert (await leases.take(M, "b1", "B", one))[1] == 1
        assert (await leases.take(M, "a5", "A", one))[1] == 2  # not behind five rounds of its own
        # a ticket not asked for again within its life drops out: its operator died
        assert (await leases.take(M, "c1", "C", one, ticket_s=0.2))[1] == 3
        await asyncio.sleep(0.3)
        assert (await leases.take(M, "b1", "B", one))[1] == 1
        assert (await leases.take(M, "d1", "D", one))[1] == 3  # c1 is gone: B, A, D
    in_redis(redis_server, scenario)


def test_a_release_tells_the_operators_only_when_jobs_wait(redis_server):
    async def scenario(redis: Redis) -> None:
        leases, one = Leases(redis), [[("n1", 1)]]
        async with subscribed(redis) as sub:
            assert await leases.take(M, "j1", "", one) == ("n1", 0)
            await leases.release("n1", M, "j1")
            assert await sub.get_message(timeout=0.3) is None  # nobody waited
            assert await leases.take(M, "j2", "", one) == ("n1", 0)
            assert (await leases.take(M, "j3", "", one))[1] == 1
            await leases.release_all([("n1", M, "j2"), ("n1", "other:latest", "x")])
            message = await sub.get_message(timeout=1)
            assert message["type"] == "message" and message["data"] == f"1 {M}".encode()
            assert await sub.get_message(timeout=0.3) is None  # one message: no job waits for the other
            assert await leases.take(M, "j3", "", one) == ("n1", 0)
    in_redis(redis_server, scenario)


def test_a_take_carries_the_operators_releases_and_tells_the_jobs_waiting(redis_server):
    """An operator's next take frees the slots it released in the same call: a one-slot node held by
    j1 is taken by j2 carrying j1's release; when a job waits, the others hear of the slot freed."""
    async def scenario(redis: Redis) -> None:
        leases, one = Leases(redis), [[("n1", 1)]]
        assert await leases.take(M, "j1", "", one) == ("n1", 0)
        assert (await leases.take(M, "j2", "", one))[1] == 1  # full: j2 waits
        async with subscribed(redis) as sub:
            assert await leases.take(M, "j2", "", one, releases=[("n1", "j1")]) == ("n1", 0)
            assert await sub.get_message(timeout=0.3) is None  # j2 took it; nobody else waits
            assert [(await leases.take(M, job, "", one))[1] for job in ("j3", "j4")] == [1, 2]
            assert await leases.take(M, "j3", "", one, releases=[("n1", "j2")]) == ("n1", 0)
            message = await sub.get_message(timeout=1)
            assert message["type"] == "message" and message["data"] == f"1 {M}".encode()  # j4 hears
            assert (await leases.take(M, "j4", "", one, releases=[("n1", "j3")])) == ("n1", 0)
        assert await leases.running("n1", M) == 1  # j4's
    in_redis(redis_server, scenario)


def test_among_equals_a_node_idle_across_the_operators_comes_before_the_cursors_turn(redis_server):
    """Two 2-slot nodes an operator ranks equal (it sees only its own jobs): j1 runs on n1, j2 on n2 and
    ends; the cursor's turn is n1, but n1 runs j1 (another operator's) and n2 nothing: j3 goes to n2."""
    async def scenario(redis: Redis) -> None:
        leases, equals = Leases(redis), [[("n1", 2), ("n2", 2)]]
        assert await leases.take(M, "j1", "", equals) == ("n1", 0)
        assert await leases.take(M, "j2", "", equals) == ("n2", 0)
        await leases.release("n2", M, "j2")
        assert await leases.take(M, "j3", "", equals) == ("n2", 0)
        assert await leases.take(M, "j4", "", equals) == ("n1", 0)  # none idle: the cursor's turn
    in_redis(redis_server, scenario)
