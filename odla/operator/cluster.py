"""Several operators on one Redis (``redis_url``): shared nodes and slots, each operator's own last view.

Each operator keeps its in-memory registry (odla/operator/registry.py) as its view of the network and
serves from it; Redis is where the operators meet:

- **nodes**: a registration (a node's heartbeat) to any operator is written to
  ``odla:node:<id>`` and its liveness to ``odla:alive:<id>``, a key that expires
  ``prune_after`` after the last heartbeat (no keyspace notifications are relied on). Every
  second each operator reads them back: nodes registered elsewhere join its view, nodes alive
  elsewhere stay in it, nodes gone everywhere leave it.
- **slots and the pick**: every job's slot is a lease in Redis (odla/operator/leases.py), taken by one Lua
  script, so two operators never put more jobs on a node than it has slots; a lease is renewed
  every ``lease_seconds / 3`` while its job runs and expires with an operator that died. Among
  equal nodes the script turns one cursor for every operator.
- **the queue**: a job that finds every slot taken joins the model's queue in Redis, fair across
  callers (API keys) as a lone operator's; a slot goes to the first in it, whichever operator each
  job asked, and each job's place is the same seen from any operator. A release with jobs waiting
  is published (``odla:freed``): waiting jobs are woken, not polling.
- **health checks**: each interval one operator checks a node (the first to ``SET NX PX`` its
  ``odla:check:<id>``) and writes what it found to ``odla:health:<id>``; the others take it (a
  node not answering cuts their streams from it too).
- **rests**: a node that failed several jobs in a row rests on every operator, until the latest
  deadline any of them set.
- **receipts**: each operator's SQLite keeps its own jobs (durable, while Redis need not be); ended
  jobs are also copied to Redis for ``jobs_keep_days``, so that ``GET /jobs`` on any operator lists
  every operator's (falling back to its own while Redis is down).

**Slow is not down.** Every call to Redis has a deadline (``deadline``, one wrapper); a call that
misses it, or fails, fails that call alone: a job's claim asks again (with more patience each
time, under a fresh ticket, the old one's lease and place given back), a release is queued and
sent again until Redis takes it, a heartbeat or health result is sent again with the next. Only
the sync loop judges Redis down: when its reads have failed for ``OUTAGE_S``.

**Redis down.** Operators serve from what they last knew and claim slots on their own count
alone; the outage is logged loudly and ``/health`` answers ``degraded`` with the reason. Redis may
come back empty: heartbeats rebuild the nodes within one heartbeat interval, and ``/health`` is
``healthy`` again at the next read; the releases that waited are sent then.

A node that dialled in is not published (only the operator holding its link can relay to it): such
a node dials each operator it is given (``operator_url`` as a list).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from pydantic import ValidationError
from redis.asyncio import Redis
from redis.exceptions import RedisError

from odla.core import protocol as p
from odla.core.config import Settings
from odla.operator.scheduler import CLUSTER_POLL_S
from odla.serving.jobs import Job
from odla.operator.leases import FREED, Leases
from odla.core.logs import Throttle
from odla.operator.registry import Node, Registry, capacity

if sys.version_info >= (3, 11):
    from asyncio import timeout as deadline
else:  # Python 3.10: redis-py depends on async-timeout there
    from async_timeout import timeout as deadline

log = logging.getLogger("odla.operator")
FAILED = (RedisError, OSError, asyncio.TimeoutError)
"What a call to Redis that did not work raises: Redis's error, a lost connection, its deadline passed."
SYNC_S = 1.0
"How often an operator reads the shared nodes back."
CALL_S = 1.0
"""A call to Redis that takes longer failed (that call only). A job's claim waits twice as long as
the slowest of late (``SharedState.patience``), at least this and at most ``PATIENCE_S``; the
sync loop's calls have ``PATIENCE_S``. Enforced with
``deadline`` around calls: redis-py's ``socket_timeout`` would cost a task per command
(``asyncio.wait_for``), a fifth of the Redis path's cost per job."""
PATIENCE_S = 2.5
"The longest a single call to Redis is waited for: a Redis slower than this is taken for one away."
SLOWEST_DECAY = 0.95
"Each claim answered faster than the slowest of late brings it this much closer to normal."
OUTAGE_S = 2.0
"""Redis is down, and each operator counts slots on its own, once the sync loop's reads have failed
this long (from the start of the first that failed): a slow answer now and then is not an outage."""
CARRY_S = 0.01
"""A freed slot reaches Redis within this time: with the next take for its model, when one comes
sooner (one round trip for both, not two: a serial client's next job comes a few ms later), else
with the other releases of that moment, in one pipeline."""
TICKET_S = 3 * CLUSTER_POLL_S
"A waiting job's ticket drops out of the cluster's queue when its operator has not asked for it this long."
NODES = "odla:nodes"
JOBS = "odla:jobs"
"Job id -> when it started: the index of the receipts kept in ``odla:job:<id>``."
RESTS = "odla:rests"
"Node id -> when its rest ends (epoch seconds): a node that failed jobs in a row rests on every operator."
STANDINGS = "odla:standings"
"'<node id> <operator>' -> 'passed failed disputed': what each operator's audits and receipts found."


@dataclass(eq=False)
class _Turn:
    """A job waiting here in the cluster's queue."""

    place: int
    woken: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class SharedState:
    """One operator's connection to the others, through Redis."""

    def __init__(self, settings: Settings, registry: Registry,
                 on_change: Callable[..., None] = lambda grown=False: None) -> None:
        assert settings.redis_url
        # A new connection costs one round trip, not three (RESP2: no HELLO; no CLIENT SETINFO): a call
        # cut at its deadline closes its connection, and against a slow Redis the next one must not
        # spend its own deadline greeting it.
        self.redis = Redis.from_url(settings.redis_url, socket_connect_timeout=CALL_S, socket_timeout=None,
                                    protocol=2, lib_name=None, lib_version=None)
        self.leases = Leases(self.redis, settings.lease_seconds)
        self.lease_seconds = settings.lease_seconds
        self.keep_s = max(1, int(settings.jobs_keep_days * 86400))
        self.registry = registry
        self.alive_ms = max(1, int((settings.prune_after or 60) * 1000))
        self.on_change = on_change
        self.error: Optional[str] = None
        "Why Redis cannot be used now (the sync loop's judgement); None while it can."
        self.failing_since: Optional[float] = None
        "Monotonic time of the first of the sync loop's reads that failed in a row; None while they work."
        self.call_failures = Throttle(60.0)  # a kind of call that failed is logged at most once a minute
        self.slowest = 0.0
        "Seconds the slowest claim took of late (each faster one takes a little off): sets ``patience``."
        self.leaving: list[tuple[str, str, str]] = []  # (model key, job, caller): tickets to take out of a queue
        self.held: dict[str, tuple[str, str]] = {}  # job id -> (node id, model key) of its lease, renewed while held
        self.turns: dict[str, set[_Turn]] = {}  # model key -> the jobs waiting here in the cluster's queue
        self.learned: set[str] = set()  # nodes in this view only because another operator has them
        self.reports: dict[str, bytes] = {}  # each node's last report read from Redis, as read
        self.releasing: list[tuple[str, str, str]] = []  # leases to release, flushed together, kept until sent
        self.flusher: Optional[asyncio.Future] = None
        self.me = os.urandom(6).hex()
        "This operator, in the health results it writes."
        self.heard: dict[str, str] = {}  # node id -> the last shared health result taken
        self.on_unreachable: Callable[[str], int] = lambda node_id: 0
        "Cut a node's streams here when another operator found it not answering (the router's abort)."
        self.address = self.me
        """This operator as its lifespan names it (its key, machine and port): the name of what it found of
        each node, the same across its restarts."""
        self.found: dict[str, tuple[int, int, int]] = {}
        "What this operator found of nodes (audits passed, failed, receipts disputed) since it last told Redis."
        self.on_standings: Callable[[dict[str, tuple[int, int, int]]], None] = lambda others: None
        "Hears what the other operators found of each node, summed (``Auditor.shared``)."

    @property
    def ok(self) -> bool:
        return self.error is None

    async def aclose(self) -> None:
        """On shutdown: this operator's leases go with it (rather than block their slots until they expire)."""
        if self.flusher is not None:
            self.flusher.cancel()
        leases = [*self.releasing, *((node_id, key, member) for member, (node_id, key) in self.held.items())]
        with contextlib.suppress(*FAILED):
            async with deadline(CALL_S):
                await self.leases.release_all(leases)
                for key, job, caller in self.leaving:
                    await self.leases.leave(key, job, caller)
        self.held.clear()
        self.releasing.clear()
        self.leaving.clear()
        await self.redis.aclose()

    def _call_failed(self, what: str, exc: BaseException) -> None:
        """One call failed: that call only (Redis is judged down by the sync loop alone)."""
        if self.ok and self.call_failures(what) is not None:
            log.warning("a call to Redis failed (%s: %s); it is retried, this operator stays shared", what,
                        describe(exc))

    def _sync_failed(self, exc: BaseException, began: float) -> None:
        """The sync loop's reads failed: Redis is down once they have failed for ``OUTAGE_S``."""
        if self.failing_since is None:
            self.failing_since = began
        reason, failing = describe(exc), time.monotonic() - self.failing_since
        if self.error is None and failing >= OUTAGE_S:
            log.error("REDIS UNAVAILABLE (%s for %.1fs): serving from this operator's last view of the network, "
                      "slots counted by this operator alone, until it is back", reason, failing)
        if self.error is not None or failing >= OUTAGE_S:
            self.error = f"redis: {reason}"

    def _recovered(self) -> None:
        self.failing_since = None
        if self.error is not None:
            log.warning("Redis is back: the network is shared again")
            self.error = None
            self._flush_soon()  # the releases that waited

    # --- nodes ---------------------------------------------------------------------------------

    async def publish(self, body: p.RegisterRequest) -> None:
        """A registration (or heartbeat) here, for every operator."""
        self.learned.discard(body.node_id)
        if not self.ok:
            return
        try:
            async with deadline(CALL_S), self.redis.pipeline(transaction=False) as pipe:
                record = f'{{"at": {time.time()!r}, "node": {body.model_dump_json()}}}'  # (at: for people reading Redis)
                pipe.set(f"odla:node:{body.node_id}", record)
                pipe.set(f"odla:alive:{body.node_id}", 1, px=self.alive_ms)
                pipe.sadd(NODES, body.node_id)
                await pipe.execute()
        except FAILED as exc:  # the node's next heartbeat publishes it again
            self._call_failed("publish a node", exc)

    async def withdraw(self, node_id: str) -> None:
        """A node left (deregistered here): gone for every operator."""
        if not self.ok:
            return
        try:
            async with deadline(CALL_S):
                await self.redis.delete(f"odla:node:{node_id}", f"odla:alive:{node_id}")
                await self.redis.srem(NODES, node_id)
        except FAILED as exc:  # its liveness key expires by itself
            self._call_failed("withdraw a node", exc)

    async def sync(self) -> None:
        """Read the shared nodes into this operator's view."""
        async with deadline(PATIENCE_S):
            ids = sorted(m.decode() for m in await self.redis.smembers(NODES))
        # Times that operators share are Redis's (a key's time to live) or, for rests, the wall clock's
        # (each operator's own clock is monotonic: its times mean nothing to another operator).
        now, wall = self.registry.clock(), time.time()
        resting = {n.node_id: wall + (n.resting_until - now) for n in self.registry.nodes() if n.resting(now)}
        async with self.redis.pipeline(transaction=False) as pipe:
            if resting:  # a rest only ever gets longer, whichever operator set it (ZADD GT)
                pipe.zadd(RESTS, resting, gt=True)
            pipe.zremrangebyscore(RESTS, "-inf", wall)
            pipe.zmscore(RESTS, ids or ["-"])
            for node_id in ids:
                pipe.get(f"odla:node:{node_id}")
                pipe.pttl(f"odla:alive:{node_id}")
                pipe.get(f"odla:health:{node_id}")
                pipe.pttl(f"odla:health:{node_id}")
            async with deadline(PATIENCE_S):
                answers = await pipe.execute()
        self._recovered()
        rests = answers[2 if resting else 1]
        answers = answers[3 if resting else 2:]
        for node_id, until in zip(ids, rests):
            node = self.registry.get(node_id)
            local = None if until is None else now + (until - wall)
            if local is not None and node is not None and (node.resting_until or 0.0) < local:
                node.resting_until = local  # another operator's failures rest it here too
        changed, present, gone = False, set(), []
        for node_id, record, alive, health, health_ttl in zip(ids, *(answers[i::4] for i in range(4))):
            if alive == -2 or record is None:  # gone everywhere: its heartbeats stopped
                gone.append(node_id)
                continue
            # its last heartbeat, to whichever operator: as long ago as its liveness key has run down
            heard = now - max(0.0, self.alive_ms - alive) / 1000 if alive >= 0 else now
            present.add(node_id)
            known = self.registry.get(node_id)
            if known is not None and known.link is not None:
                continue  # dialled in here: this operator's own
            try:
                body = p.RegisterRequest.model_validate(json.loads(record)["node"])
            except (ValueError, KeyError, TypeError, ValidationError):
                continue
            if known is None or known.url != body.url:
                self.registry.take_report(body, body.url)
                self.learned.add(node_id)
                changed = True
            elif self.reports.get(node_id) != record:  # a report since: its models, loaded, slots, digests, disk
                last_seen, before = known.last_seen, capacity(known)
                self.registry.take_report(body, body.url, healthy=known.healthy)  # health: as checked
                known.last_seen = max(last_seen, heard)  # its last heartbeat, to whichever operator
                changed |= bool(capacity(known) - before)  # the queue is woken when it can take more
            else:
                known.last_seen = max(known.last_seen, heard)
            self.reports[node_id] = record
            if health is not None:
                changed |= self._take_health(node_id, health, health_ttl, now)
        for node_id in self.reports.keys() - present:
            del self.reports[node_id]
        for node_id in self.learned - present:  # alive nowhere now: out of this view too
            self.learned.discard(node_id)
            node = self.registry.get(node_id)
            if node is not None and node.link is None:
                self.registry.remove(node_id)
                log.warning("node %s left the network (no heartbeat to any operator)", node_id)
        if gone:
            async with deadline(PATIENCE_S):
                await self.redis.srem(NODES, *gone)
        if changed:
            self.on_change(grown=True)

    # --- what audits and receipts found of each node: every operator's, summed ---------------------

    def share_standing(self, node_id: str, passed: int, failed: int, disputed: int) -> None:
        """What this operator found of a node: written with the next sync."""
        self.found[node_id] = (passed, failed, disputed)

    async def sync_standings(self) -> None:
        """Tell Redis what this operator found of nodes, and take what the others found (one hash,
        ``odla:standings``: a field per node and operator), so that a cheat caught by one operator
        is judged so by all."""
        found = dict(self.found)
        async with self.redis.pipeline(transaction=False) as pipe:
            if found:
                pipe.hset(STANDINGS, mapping={f"{node_id} {self.address}": " ".join(map(str, counts))
                                              for node_id, counts in found.items()})
            pipe.hgetall(STANDINGS)
            async with deadline(PATIENCE_S):
                answers = await pipe.execute()
        for node_id, counts in found.items():
            if self.found.get(node_id) == counts:  # (unless it changed meanwhile)
                del self.found[node_id]
        others: dict[str, tuple[int, int, int]] = {}
        for field_, value in answers[-1].items():
            node_id, _, operator = field_.decode().rpartition(" ")
            if operator == self.address:
                continue
            try:
                passed, failed, disputed = (int(x) for x in value.decode().split())
            except ValueError:
                continue
            was = others.get(node_id, (0, 0, 0))
            others[node_id] = (was[0] + passed, was[1] + failed, was[2] + disputed)
        self.on_standings(others)

    # --- health checks: one operator per node per interval -------------------------------------

    async def checks_for(self, node_ids: list[str], interval: float) -> set[str]:
        """The nodes this operator checks this round: those no other operator took (``SET NX PX``).
        With Redis down, all of them."""
        if not self.ok or not node_ids:
            return set(node_ids)
        try:
            async with deadline(CALL_S), self.redis.pipeline(transaction=False) as pipe:
                for node_id in node_ids:
                    pipe.set(f"odla:check:{node_id}", self.me, nx=True, px=max(1, int(interval * 1000)))
                taken = await pipe.execute()
        except FAILED as exc:
            self._call_failed("share health checks", exc)
            return set(node_ids)
        return {node_id for node_id, ok in zip(node_ids, taken) if ok}

    async def share_health(self, results: dict[str, tuple[bool, bool, Optional[str]]], interval: float) -> None:
        """What this round's checks found, node id -> (healthy, unreachable, error), for the others."""
        if not self.ok or not results:
            return
        ttl = max(1, int(3 * interval * 1000))
        try:
            async with deadline(CALL_S), self.redis.pipeline(transaction=False) as pipe:
                for node_id, (healthy, unreachable, error) in results.items():
                    result = {"by": self.me, "id": os.urandom(6).hex(), "ttl": ttl, "healthy": healthy,
                              "unreachable": unreachable, "error": error}
                    pipe.set(f"odla:health:{node_id}", json.dumps(result), px=ttl)
                await pipe.execute()
        except FAILED as exc:  # the next round's results go
            self._call_failed("share health results", exc)

    def _take_health(self, node_id: str, raw: bytes, left_ms: int, now: float) -> bool:
        """Another operator's check of a node (its key has ``left_ms`` to live), into this view, once;
        True when the node became usable."""
        try:
            result = json.loads(raw)
            by, seen, healthy, ttl = result["by"], str(result["id"]), bool(result["healthy"]), int(result["ttl"])
        except (ValueError, KeyError, TypeError):
            return False
        node = self.registry.get(node_id)
        if by == self.me or node is None or node.link is not None or seen == self.heard.get(node_id):
            return False
        self.heard[node_id] = seen
        at = now - max(0, ttl - left_ms) / 1000 if left_ms >= 0 else now  # when it was checked, by Redis's time
        if not healthy:
            self.registry.mark_failed(node_id)
            if result.get("unreachable"):
                self.on_unreachable(node_id)
            return False
        became = not node.healthy
        node.healthy = True
        node.last_seen = max(node.last_seen, at)
        return became

    # --- job receipts: every operator's, readable from any -----------------------------------------

    async def add_receipts(self, jobs: list[Job]) -> None:
        """Ended jobs (each operator's SQLite keeps its own), for every operator, kept ``jobs_keep_days``."""
        if not self.ok or not jobs:
            return
        indexes: dict[str, dict[str, float]] = {}
        for job in jobs:
            if job.part_of is not None:  # a resumed answer's later leg: read by its id, listed in its job's legs
                continue
            for index in (JOBS, *_indexes(job.model, job.node, job.outcome, job.caller)):
                indexes.setdefault(index, {})[job.id] = job.started
        try:
            async with deadline(CALL_S), self.redis.pipeline(transaction=False) as pipe:
                for job in jobs:
                    pipe.set(f"odla:job:{job.id}", job.receipt().model_dump_json(), ex=self.keep_s)
                for index, members in indexes.items():  # what a filter of GET /jobs reads, not every receipt
                    pipe.zadd(index, members)
                    pipe.zremrangebyscore(index, "-inf", time.time() - self.keep_s)  # (jobs start on the wall clock)
                    pipe.expire(index, self.keep_s)
                await pipe.execute()
        except FAILED as exc:  # each operator's SQLite keeps its own: the copy is what is missed
            self._call_failed("copy receipts", exc)

    async def receipt(self, job_id: str) -> Optional[p.JobReceipt]:
        async with deadline(CALL_S):
            raw = await self.redis.get(f"odla:job:{job_id}")
        return p.JobReceipt.model_validate_json(raw) if raw else None

    async def receipts(self, model: Optional[str], node: Optional[str], outcome: Optional[str],
                       since: Optional[float], limit: int, offset: int,
                       caller: Optional[str] = None) -> list[p.JobReceipt]:
        """Every operator's ended jobs, newest first, filtered and paged as ``Receipts.find``. Read from
        the index of the most telling filter (a caller's, a model's, a node's, an outcome's), so a
        filter that matches nothing reads nothing, and a page reads little more than itself."""
        index = next(iter(_indexes(model, node, outcome, caller)), JOBS)
        found: list[p.JobReceipt] = []
        start, batch = 0, min(500, max(50, 2 * (offset + limit)))
        while len(found) < offset + limit:
            async with deadline(CALL_S):
                ids = await self.redis.zrevrangebyscore(index, "+inf", since if since is not None else "-inf",
                                                        start=start, num=batch)
                raws = await self.redis.mget([f"odla:job:{i.decode()}" for i in ids]) if ids else []
            if not ids:
                break
            start += len(ids)
            for raw in raws:
                if raw is None:
                    continue  # expired
                job = p.JobReceipt.model_validate_json(raw)
                if (model is None or job.model == model) and (node is None or job.node == node) \
                        and (outcome is None or job.outcome == outcome) \
                        and (caller is None or (job.caller or "") == caller):
                    found.append(job)
        return found[offset:offset + limit]

    # --- slots and the queue: the scheduler's cluster (odla/operator/scheduler.py) ---------------------------

    @property
    def patience(self) -> float:
        """How long a claim waits for Redis: twice the slowest answer of late, within [CALL_S, PATIENCE_S]."""
        return min(PATIENCE_S, max(CALL_S, 2 * self.slowest))

    async def take(self, key: str, ticket: str, caller: str, groups: list[list[Node]]) -> tuple[Optional[Node], int]:
        """A slot for the job on the best node free across the operators, in the cluster's queue
        order: (node, 0), or (None, its place in the queue). (None, 0): this call failed (within
        ``patience``); the ticket is then given back (its lease, if the script ran, and its place),
        so the job asks again under another."""
        if not self.ok:
            return None, 0
        nodes = {node.node_id: node for group in groups for node in group}
        carried = [(node_id, job) for node_id, model, job in self.releasing if model == key]
        if carried:
            self.releasing = [release for release in self.releasing if release[1] != key]
        patience, loop = self.patience, asyncio.get_running_loop()
        began = loop.time()
        try:
            async with deadline(patience):
                node_id, place = await self.leases.take(
                    key, ticket, caller, [[(n.node_id, n.slots_for(key)) for n in group] for group in groups],
                    TICKET_S, carried)
            took = loop.time() - began
            self.slowest = took if took > self.slowest else self.slowest * SLOWEST_DECAY
        except BaseException as exc:  # failed, timed out or cancelled: the script may have run, or not
            if isinstance(exc, asyncio.TimeoutError):
                self.slowest = max(self.slowest, patience)  # the next claim waits longer
            for node_id, job in carried:  # never dropped: sent again with the others
                self._to_release(node_id, key, job)
            for node_id in nodes:  # a lease it may have taken, and its place in the queue, go back
                self._to_release(node_id, key, ticket)
            self.leaving.append((key, ticket, caller))
            self._flush_soon()
            if not isinstance(exc, FAILED):
                raise
            self._call_failed("claim a slot", exc)
            return None, 0
        if node_id is None:
            return None, place
        self.held[ticket] = (node_id, key)
        return nodes[node_id], 0

    async def turn(self, key: str, place: int, timeout: float) -> None:
        """Wait, ``place``-th in the queue for ``key``, until a slot may be this job's (one freed
        somewhere, or a node gained capacity), or ``timeout``."""
        turn = _Turn(place)
        waiting = self.turns.setdefault(key, set())
        waiting.add(turn)
        try:
            await asyncio.wait((turn.woken,), timeout=timeout)
        finally:
            waiting.discard(turn)
            if not waiting and self.turns.get(key) is waiting:  # never a newer set that replaced this one
                del self.turns[key]

    def _freed(self, key: str, count: int) -> None:
        """``count`` slots for ``key`` were freed (or jobs left its queue): each waiter moves up as
        many places in its own reckoning, and those that may be first now ask."""
        for turn in self.turns.get(key, ()):
            turn.place -= count
            if turn.place <= 1 and not turn.woken.done():
                turn.woken.set_result(None)

    def wake(self) -> None:
        """Nodes gained capacity: every waiting job asks again."""
        for waiting in self.turns.values():
            for turn in waiting:
                if not turn.woken.done():
                    turn.woken.set_result(None)

    async def active_jobs(self, nodes: list[Node]) -> dict[str, int]:
        """Jobs running on each node, whichever operator relays them: its live leases. Empty while
        Redis is away (each operator then counts its own)."""
        if not self.ok:
            return {}
        pairs = [(node, key) for node in nodes if node.link is None for key in node.keys]
        try:
            async with deadline(CALL_S):
                counts = await self.leases.live([(node.node_id, key) for node, key in pairs])
        except FAILED as exc:
            self._call_failed("count the jobs on nodes", exc)
            return {}
        active: dict[str, int] = {}
        for (node, _), count in zip(pairs, counts):
            active[node.node_id] = active.get(node.node_id, 0) + count
        return active

    async def leave(self, key: str, ticket: str, caller: str) -> None:
        """The job no longer waits: its ticket out of the queue now, or with the releases if that fails."""
        try:
            async with deadline(CALL_S):
                await self.leases.leave(key, ticket, caller)
        except BaseException as exc:
            self.leaving.append((key, ticket, caller))
            self._flush_soon()
            if not isinstance(exc, FAILED):
                raise
            self._call_failed("leave the queue", exc)

    def release(self, ticket: str) -> None:
        """A job's slot is free: released in Redis within ``CARRY_S``, with the next take for its
        model or with the others that end in the same moment (not a command and a task per job);
        while Redis does not take it, sent again (never dropped)."""
        held = self.held.pop(ticket, None)
        if held is not None:
            self._to_release(*held, ticket)

    def _to_release(self, node_id: str, key: str, job: str) -> None:
        self.releasing.append((node_id, key, job))
        self._flush_soon()

    def _flush_soon(self) -> None:
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.ensure_future(self._flush_releases())

    async def _flush_releases(self) -> None:
        """Send the releases and queue departures; those that fail wait and go again, with a
        growing pause, until Redis takes them (a lease not released expires by itself at the latest)."""
        pause = CARRY_S
        while self.releasing or self.leaving:
            await asyncio.sleep(pause)  # (the first time: unless a take carries them first)
            batch, self.releasing = self.releasing, []
            leaving, self.leaving = self.leaving, []
            try:
                async with deadline(PATIENCE_S):
                    if batch:
                        await self.leases.release_all(batch)
                    for key, job, caller in leaving:
                        await self.leases.leave(key, job, caller)
                pause = CARRY_S
            except BaseException as exc:
                self.releasing[:0], self.leaving[:0] = batch, leaving
                if not isinstance(exc, FAILED):
                    raise
                self._call_failed("release slots", exc)
                pause = min(2 * pause if pause > CARRY_S else 0.1, SYNC_S)

    async def listen(self) -> None:
        """Hear of slots freed by any operator (``odla:freed``), to wake the jobs waiting here."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as sub:
                    async with deadline(PATIENCE_S):
                        await sub.subscribe(FREED)
                    while True:
                        message = await sub.get_message(timeout=SYNC_S)
                        if message is not None:
                            count, _, key = message["data"].decode().partition(" ")
                            self._freed(key, int(count))
            except FAILED:
                pass  # the sync loop says so; waiting jobs ask on their own meanwhile
            except Exception:  # noqa: BLE001 - the loop outlives any one failure
                log.exception("shared state: listening for freed slots failed unexpectedly")
            await asyncio.sleep(SYNC_S)

    async def renew(self) -> None:
        """Every lease held here renewed, in one round trip whatever their number; those that had
        expired (Redis was away, or came back empty) claimed again, or the overlap is lived with."""
        held = [(node_id, key, member) for member, (node_id, key) in self.held.items()]
        if not held:
            return
        renewed = await self.leases.renew_all(held)
        lost = [lease for lease, ok in zip(held, renewed) if not ok and lease[2] in self.held]
        if lost:
            await self.leases.claim_all(lost)

    # --- the loop --------------------------------------------------------------------------------

    async def run(self) -> None:
        """Every second: the shared nodes read back; every ``lease_seconds / 3``: leases renewed. Two
        loops side by side: a renewal that waits for a slow Redis never holds up the judgement of it."""
        await asyncio.gather(self._sync_loop(), self._renew_loop())

    async def _sync_loop(self) -> None:
        while True:
            began = time.monotonic()
            try:
                await self.sync()  # (each call with its deadline)
            except FAILED as exc:
                self._sync_failed(exc, began)
            except Exception:  # noqa: BLE001 - the loop outlives any one failure
                log.exception("shared state: sync failed unexpectedly")
            if self.ok:
                try:  # a call of its own: its failure is not Redis's outage
                    await self.sync_standings()
                except FAILED as exc:
                    self._call_failed("share what audits found", exc)
                except Exception:  # noqa: BLE001
                    log.exception("shared state: sharing what audits found failed unexpectedly")
            await asyncio.sleep(SYNC_S)

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self.ok:
                continue
            try:  # two round trips (a pipeline of scripts asks first whether Redis has them)
                async with deadline(2 * PATIENCE_S):
                    await self.renew()
            except FAILED as exc:  # the next round renews them
                self._call_failed("renew leases", exc)
            except Exception:  # noqa: BLE001 - the loop outlives any one failure
                log.exception("shared state: renewing leases failed unexpectedly")


def _indexes(model: Optional[str], node: Optional[str], outcome: Optional[str],
             caller: Optional[str]) -> list[str]:
    """The receipt indexes of these values, the most telling first (None: not a filter)."""
    named = (("caller", caller), ("model", model), ("node", node), ("outcome", outcome))
    return [f"{JOBS}:{kind}:{value}" for kind, value in named if value is not None and (value or kind == "caller")]


def describe(exc: BaseException) -> str:
    """Why a call to Redis failed, in a few words (a missed deadline has no message of its own)."""
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
