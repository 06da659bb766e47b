"""Slots claimed by several operators at once, as leases in Redis (issue 17's foundation).

Each node and model has a sorted set of the jobs running there, each scored by when its lease
expires. A claim is one Lua script, atomic in Redis: drop the expired leases, count the live
ones against the node's slots, and add this job's only if there is room. So two operators can
never put more jobs on a node than it has slots, and the leases of an operator that died
expire by themselves, ``lease_seconds`` after their last renewal. Time is Redis's own clock
(``TIME``), so the operators' clocks need not agree.

    leases = Leases(redis.asyncio.Redis.from_url(url), lease_seconds=30)
    if await leases.claim("node1", "llama3:latest", job_id, slots=2): ...
    await leases.renew("node1", "llama3:latest", job_id)    # every lease_seconds / 3 while it runs
    await leases.release("node1", "llama3:latest", job_id)
"""

from __future__ import annotations

from redis.asyncio import Redis

PREFIX = "odla:leases"

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# KEYS[1] the node and model's leases; ARGV: slots, lease ms, job id. 1: claimed; 0: full.
CLAIM = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""

# A claim that keeps the cluster's queue order. KEYS[1] the node and model's leases, KEYS[2] the
# model's queue (ticket -> arrival), KEYS[3] its tickets' liveness (ticket -> expiry); ARGV: slots,
# lease ms, ticket (the job), ticket ms. 0: claimed. n > 0: not yet, the ticket is n-th in the queue
# (a newcomer queues behind everyone waiting, whichever operator they asked). Tickets not renewed
# (their operator died, or the job left without taking its ticket back) drop out.
CLAIM_IN_TURN = _NOW_MS + """
local dead = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)
for _, ticket in ipairs(dead) do
  redis.call('ZREM', KEYS[2], ticket)
  redis.call('ZREM', KEYS[3], ticket)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local rank = redis.call('ZRANK', KEYS[2], ARGV[3])
if not rank then rank = redis.call('ZCARD', KEYS[2]) end
if rank < free then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[3])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]))
  redis.call('ZREM', KEYS[2], ARGV[3])
  redis.call('ZREM', KEYS[3], ARGV[3])
  return 0
end
redis.call('ZADD', KEYS[2], 'NX', now, ARGV[3])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[3])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[4]) * 10)
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[4]) * 10)
return rank + 1
"""

# KEYS[1]; ARGV: lease ms, job id. 1: renewed; 0: the lease had expired (or was never held).
RENEW = _NOW_MS + """
local expires = redis.call('ZSCORE', KEYS[1], ARGV[2])
if not expires or tonumber(expires) <= now then return 0 end
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[2])
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return 1
"""

# KEYS[1]. The live leases.
RUNNING = _NOW_MS + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZCARD', KEYS[1])
"""


class Leases:
    """Claims, renewals and releases of a node's slots, shared through Redis."""

    def __init__(self, redis: Redis, lease_seconds: float = 30.0) -> None:
        self.redis = redis
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._claim = redis.register_script(CLAIM)
        self._claim_in_turn = redis.register_script(CLAIM_IN_TURN)
        self._renew = redis.register_script(RENEW)
        self._running = redis.register_script(RUNNING)

    @staticmethod
    def key(node_id: str, model: str) -> str:
        return f"{PREFIX}:{node_id}:{model}"

    async def claim(self, node_id: str, model: str, job_id: str, slots: int) -> bool:
        """Take one of the node's ``slots`` for ``model``, if one is free across every operator."""
        return bool(await self._claim(keys=[self.key(node_id, model)], args=[slots, self.lease_ms, job_id]))

    async def claim_in_turn(self, node_id: str, model: str, ticket: str, slots: int, ticket_s: float = 2.0) -> int:
        """``claim``, in the cluster's queue order for ``model``: 0 when claimed, else the job's place
        in that queue (it stays queued while it asks again within ``ticket_s``)."""
        keys = [self.key(node_id, model), f"{PREFIX}:queue:{model}", f"{PREFIX}:waiting:{model}"]
        return int(await self._claim_in_turn(keys=keys, args=[slots, self.lease_ms, ticket, int(ticket_s * 1000)]))

    async def leave(self, model: str, ticket: str) -> None:
        """A job that waited no longer does (it left, or found its slot): out of the queue."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zrem(f"{PREFIX}:queue:{model}", ticket)
            pipe.zrem(f"{PREFIX}:waiting:{model}", ticket)
            await pipe.execute()

    async def renew(self, node_id: str, model: str, job_id: str) -> bool:
        """Push the lease's expiry ``lease_seconds`` on; False if it had already expired."""
        return bool(await self._renew(keys=[self.key(node_id, model)], args=[self.lease_ms, job_id]))

    async def release(self, node_id: str, model: str, job_id: str) -> None:
        await self.redis.zrem(self.key(node_id, model), job_id)

    async def running(self, node_id: str, model: str) -> int:
        """Jobs with a live lease on the node for ``model``, whichever operator holds them."""
        return int(await self._running(keys=[self.key(node_id, model)]))
