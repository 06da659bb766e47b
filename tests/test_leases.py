"""Slots shared by several operators as leases in a real redis-server (issue 17's foundation)."""

import asyncio
import random

from redis.asyncio import Redis

from odla.leases import Leases


def run(coro):
    return asyncio.run(coro)


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
    async def scenario() -> None:
        redis = Redis.from_url(redis_server.url)
        try:
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
        finally:
            await redis.aclose()
    run(scenario())
