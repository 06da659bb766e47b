"""Slots claimed by several operators at once, as leases in Redis, and the cluster's fair queue.

Each node and model has a sorted set of the jobs running there, each scored by when its lease
expires. A claim is one Lua script, atomic in Redis: drop the expired leases, count the live
ones against the node's slots, and add this job's only if there is room. So two operators can
never put more jobs on a node than it has slots, and the leases of an operator that died
expire by themselves, ``lease_seconds`` after their last renewal. Time is Redis's own clock
(``TIME``), so the operators' clocks need not agree.

``take`` is the operator's claim: it is given the nodes that could run the job, best first in
groups of equals, and in the same script it

- keeps **the queue's order**: per model, tickets in a sorted set, fair across callers (API
  keys): a ticket's score is its caller's next *round*, then its arrival, so callers take turns
  and one caller's burst waits behind the others' first jobs, as in the lone operator's queue
  (odla/operator/scheduler.py). A job is granted a slot only while fewer tickets are ahead of it than
  there are free slots, so its place is the same whichever operator it asked. A ticket not
  asked for again within its life (its operator died) drops out;
- turns **the pick cursor**: among equals, the first node after the one last picked for the
  model, by node id, whichever operator picked it; one that runs nothing on any operator before
  one that runs something (each operator ranks by its own jobs only).

A release tells the operators (``PUBLISH odla:freed "<count> <model>"``) when jobs wait for the
model, so that a waiting job is woken rather than asking again and again.

    leases = Leases(redis.asyncio.Redis.from_url(url), lease_seconds=30)
    node, place = await leases.take("llama3:latest", job_id, caller, [[("n1", 2), ("n2", 2)], [("n3", 1)]])
    await leases.renew(node, "llama3:latest", job_id)    # every lease_seconds / 3 while it runs
    await leases.release(node, "llama3:latest", job_id)
"""

from __future__ import annotations

from collections import Counter
from typing import Optional, Sequence

from redis.asyncio import Redis

PREFIX = "odla:leases"
FREED = "odla:freed"
"""The channel on which releases (or a job leaving the queue) say ``"<count> <model>"`` when jobs wait
for the model: so many of them move up a place."""
TURNS_MS = 600_000
"How long a model's cursor and callers' rounds outlive its last claim."

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

# The model's queue: KEYS[1] ticket ("<job> <caller>") -> round * ROUND + arrival, KEYS[2] ticket ->
# when it drops out unless asked for again, KEYS[3] a hash: 'served' (the round being served), 'seq'
# (arrivals), 'last' (the node last picked), 'c:<caller>' (the caller's last round), 'n:<caller>'
# (its tickets queued).
_QUEUE = """
local ROUND = 16777216
local queue, waiting, turns = KEYS[1], KEYS[2], KEYS[3]

local function number(field, default)
  return tonumber(redis.call('HGET', turns, field) or default)
end

-- A ticket out of the queue: served in round ``round``, or (round nil) left or not asked for
-- again. A caller with none left is due in the next round if it was just served, else in this one.
local function out(ticket, round)
  redis.call('ZREM', waiting, ticket)
  if redis.call('ZREM', queue, ticket) == 0 then return false end
  local caller = string.match(ticket, ' (.*)$') or ''
  if redis.call('HINCRBY', turns, 'n:' .. caller, -1) <= 0 then
    redis.call('HDEL', turns, 'n:' .. caller)
    local due = round or number('served', '0') - 1
    if number('c:' .. caller, '-1') > due then redis.call('HSET', turns, 'c:' .. caller, due) end
  end
  return true
end
"""

# KEYS[1..3] the model's queue (above), KEYS[3 + i] node i's leases, then the leases of the releases
# carried. ARGV: job, caller, lease ms, ticket ms, model, r (releases carried), then per node i its id,
# its slots, its group (equals share one; groups best first, ids sorted within), then the r released
# job ids. {0, node id}: claimed. {n}: not yet, the job is n-th in the queue.
TAKE = _NOW_MS + _QUEUE + """
local job, caller, lease_ms, ticket_ms = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local model, r = ARGV[5], tonumber(ARGV[6])
local n = (#ARGV - 6 - r) / 3
local function id(i) return ARGV[4 + 3 * i] end
local function slots(i) return tonumber(ARGV[5 + 3 * i]) end
local function group(i) return ARGV[6 + 3 * i] end

-- this operator's releases of the model's slots, carried here rather than sent on their own
local freed = 0
for k = 1, r do freed = freed + redis.call('ZREM', KEYS[3 + n + k], ARGV[6 + 3 * n + k]) end
local function tell()  -- the jobs waiting hear of slots freed
  if freed > 0 and redis.call('ZCARD', queue) > 0 then
    redis.call('PUBLISH', 'FREED', freed .. ' ' .. model)
  end
end

local ticket = job .. ' ' .. caller
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', waiting, '-inf', now)) do out(dead, nil) end
if redis.call('ZCARD', queue) == 0 and redis.call('HLEN', turns) > 3 then
  local last = redis.call('HGET', turns, 'last')  -- nobody waits: the callers' rounds start again
  redis.call('DEL', turns)
  if last then redis.call('HSET', turns, 'last', last) end
end

local score = redis.call('ZSCORE', queue, ticket)
local queued = score ~= false and score ~= nil
if not queued then
  local seq = redis.call('HINCRBY', turns, 'seq', 1) % ROUND
  score = string.format('%.0f', math.max(number('served', '0'), number('c:' .. caller, '-1') + 1) * ROUND + seq)
end
local ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. score)

local free, total = {}, 0
for i = 1, n do
  redis.call('ZREMRANGEBYSCORE', KEYS[3 + i], '-inf', now)
  free[i] = slots(i) - redis.call('ZCARD', KEYS[3 + i])
  if free[i] > 0 then total = total + free[i] end
end

redis.call('PEXPIRE', turns, TURNS_MS)
if ahead < total then
  local last, i = redis.call('HGET', turns, 'last') or '', 1
  while i <= n do
    local j = i
    while j < n and group(j + 1) == group(i) do j = j + 1 end
    local size, first = j - i + 1, 0
    for k = 0, size - 1 do
      if id(i + k) > last then first = k; break end
    end
    -- a node idle across every operator first (an operator sees only its own jobs), then any with room
    for pass = 1, 2 do for k = 0, size - 1 do
      local at = i + (first + k) % size
      if free[at] > 0 and (pass == 2 or free[at] == slots(at)) then
        redis.call('ZADD', KEYS[3 + at], now + lease_ms, job)
        redis.call('PEXPIRE', KEYS[3 + at], lease_ms)
        redis.call('HSET', turns, 'last', id(at))
        if queued then
          local round = math.floor(tonumber(score) / ROUND)
          redis.call('HSET', turns, 'served', math.max(number('served', '0'), round))
          out(ticket, round)
        end
        tell()
        return {0, id(at)}
      end
    end end
    i = j + 1
  end
end

if not queued then
  redis.call('ZADD', queue, score, ticket)
  redis.call('HINCRBY', turns, 'n:' .. caller, 1)
  redis.call('HSET', turns, 'c:' .. caller, math.floor(tonumber(score) / ROUND))
end
redis.call('ZADD', waiting, now + ticket_ms, ticket)
redis.call('PEXPIRE', queue, ticket_ms * 2)
redis.call('PEXPIRE', waiting, ticket_ms * 2)
tell()
return {ahead + 1}
""".replace("TURNS_MS", str(TURNS_MS)).replace("'FREED'", repr(FREED))

# KEYS[1..3] the model's queue; ARGV: the ticket, the model. A job that waited no longer does: the
# jobs behind it move up.
LEAVE = _QUEUE + """
if out(ARGV[1], nil) and redis.call('ZCARD', queue) > 0 then
  redis.call('PUBLISH', '""" + FREED + """', '1 ' .. ARGV[2])
end
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

# KEYS: leases of nodes and models. The live ones in each, by Redis's clock (read-only).
LIVE = _NOW_MS + """
local counts = {}
for i, key in ipairs(KEYS) do counts[i] = redis.call('ZCOUNT', key, '(' .. now, '+inf') end
return counts
"""

Candidates = Sequence[Sequence[tuple[str, int]]]
"Nodes that could run a job, (node id, its slots for the model): groups of equals, best first."


class Leases:
    """Claims, renewals and releases of a node's slots, shared through Redis; the cluster's queue."""

    def __init__(self, redis: Redis, lease_seconds: float = 30.0) -> None:
        self.redis = redis
        self.lease_ms = max(1, int(lease_seconds * 1000))
        self._claim = redis.register_script(CLAIM)
        self._take = redis.register_script(TAKE)
        self._leave = redis.register_script(LEAVE)
        self._renew = redis.register_script(RENEW)
        self._running = redis.register_script(RUNNING)
        self._live = redis.register_script(LIVE)

    @staticmethod
    def key(node_id: str, model: str) -> str:
        return f"{PREFIX}:{node_id}:{model}"

    @staticmethod
    def queue_keys(model: str) -> list[str]:
        return [f"odla:queue:{model}", f"odla:waiting:{model}", f"odla:turns:{model}"]

    @staticmethod
    def ticket(job_id: str, caller: str) -> str:
        return f"{job_id} {caller}"

    async def claim(self, node_id: str, model: str, job_id: str, slots: int) -> bool:
        """Take one of the node's ``slots`` for ``model``, if one is free across every operator."""
        return bool(await self._claim(keys=[self.key(node_id, model)], args=[slots, self.lease_ms, job_id]))

    async def take(self, model: str, job_id: str, caller: str, candidates: Candidates,
                   ticket_s: float = 6.0, releases: Sequence[tuple[str, str]] = ()) -> tuple[Optional[str], int]:
        """A slot for the job on the best free node, in the cluster's fair queue order: (node id, 0)
        when claimed, else (None, the job's place in the queue). The job keeps its place while it
        asks again within ``ticket_s``. ``releases``, (node id, job id) of ``model``'s slots this
        operator freed, are made first, in the same call."""
        keys, args = self.queue_keys(model), [job_id, caller, self.lease_ms, int(ticket_s * 1000), model,
                                              len(releases)]
        for group, nodes in enumerate(candidates):
            for node_id, slots in sorted(nodes):
                keys.append(self.key(node_id, model))
                args += [node_id, slots, group]
        for node_id, released in releases:
            keys.append(self.key(node_id, model))
            args.append(released)
        answer = await self._take(keys=keys, args=args)
        if answer[0] == 0:
            return answer[1].decode(), 0
        return None, int(answer[0])

    async def leave(self, model: str, job_id: str, caller: str) -> None:
        """A job that waited no longer does (it left, or found its slot): out of the queue."""
        await self._leave(keys=self.queue_keys(model), args=[self.ticket(job_id, caller), model])

    async def renew(self, node_id: str, model: str, job_id: str) -> bool:
        """Push the lease's expiry ``lease_seconds`` on; False if it had already expired."""
        return bool(await self._renew(keys=[self.key(node_id, model)], args=[self.lease_ms, job_id]))

    async def renew_all(self, leases: Sequence[tuple[str, str, str]]) -> list[bool]:
        """``renew`` for each (node id, model, job id), in one round trip whatever their number."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id, model, job_id in leases:
                await self._renew(keys=[self.key(node_id, model)], args=[self.lease_ms, job_id], client=pipe)
            return [bool(ok) for ok in await pipe.execute()]

    async def claim_all(self, leases: Sequence[tuple[str, str, str]]) -> None:
        """Leases that had expired under running jobs, held again whatever the slots (the overlap is lived with)."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id, model, job_id in leases:
                await self._claim(keys=[self.key(node_id, model)], args=[1 << 30, self.lease_ms, job_id], client=pipe)
            await pipe.execute()

    async def live(self, pairs: Sequence[tuple[str, str]]) -> list[int]:
        """Jobs with a live lease on each (node id, model), whichever operator holds them, in one call."""
        if not pairs:
            return []
        return [int(n) for n in await self._live(keys=[self.key(node_id, model) for node_id, model in pairs])]

    async def release(self, node_id: str, model: str, job_id: str) -> None:
        await self.release_all([(node_id, model, job_id)])

    async def release_all(self, leases: Sequence[tuple[str, str, str]]) -> None:
        """Free the slots of jobs that ended, (node id, model, job id) each, in one round trip; then
        tell the operators of each model for which jobs wait. (No script: a pipeline with one asks
        Redis first whether it has it, a round trip more. A job that queues after the count below
        finds the slot free itself.)"""
        models = sorted({model for _, model, _ in leases})
        async with self.redis.pipeline(transaction=False) as pipe:
            for node_id, model, job_id in leases:
                pipe.zrem(self.key(node_id, model), job_id)
            for model in models:
                pipe.zcard(self.queue_keys(model)[0])
            answers = await pipe.execute()
        freed = Counter(model for (_, model, _), removed in zip(leases, answers) if removed)
        waited = [model for model, waiting in zip(models, answers[len(leases):]) if waiting and freed[model]]
        if waited:
            async with self.redis.pipeline(transaction=False) as pipe:
                for model in waited:
                    pipe.publish(FREED, f"{freed[model]} {model}")
                await pipe.execute()

    async def running(self, node_id: str, model: str) -> int:
        """Jobs with a live lease on the node for ``model``, whichever operator holds them."""
        return int(await self._running(keys=[self.key(node_id, model)]))
