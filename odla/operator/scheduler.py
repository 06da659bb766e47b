"""Which node runs a job, and a fair queue when none has a free slot.

**Pick.** Among healthy nodes with the model and a free slot (the operator's own count of
jobs it has running there below the node's slots for the model), in this order:

    0  warm and idle        the model is loaded, the node runs nothing for us
    1  warm                 loaded, with a free slot
    2  cold and idle        Ollama must load the model, but runs nothing else
    3  cold                 the rest

within a rank the node that failed fewer jobs of late, then the faster one (tokens per
second of the answers the operator relayed from it for the model, never the node's own claim;
nodes within ``EQUAL_SPEED`` of the fastest are equals; a node not yet measured counts as
fastest, so it gets measured), then a per-model cursor, so equals take turns. A node that
failed several jobs in a row rests (odla/operator/registry.py) and gets none unless no other can. Claiming counts the job at once; releasing it (always, in
``finally``) never goes below zero.

**Queue.** When every node with the model is full, the job waits: per model, fair across
callers (round-robin between API keys, first come first served within one), woken when a
slot frees or a node's capacity grows, never by polling. A freed slot is handed to the next
waiter directly, so a newcomer cannot take it first. Past ``max_queue`` waiting jobs a new one
is refused (503 with Retry-After); one that waits ``queue_timeout`` gives up (504). A waiter
whose client leaves is simply gone.

**Several operators** (``cluster``, odla/operator/cluster.py): the pick and the queue are the cluster's.
The scheduler ranks the nodes as above, in groups of equals; one call to Redis claims a slot on
the best node free across every operator (turning a cursor shared by all of them), or puts the
job in the model's queue there, fair across callers in the same way, its place the same whichever
operator it asked. A waiting job asks again when a slot frees anywhere (it is woken), when a node
gains capacity, and every ``CLUSTER_POLL_S`` besides. With Redis away, this operator's own
count and queue take over.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
from collections import Counter, OrderedDict, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Protocol

from odla.core.errors import ODLAError, QueueFull, QueueTimeout
from odla.core.names import model_key
from odla.operator.registry import Node, Registry

RETRY_AFTER_S = 5
EQUAL_SPEED = 1.15
"Nodes whose speeds are within 15 % of the fastest are equals: they take turns (no fixed steps to straddle)."
CLUSTER_POLL_S = 2.0
"With several operators: how often a waiting job asks again, though no slot was heard to free."
Place = Callable[[int], None]


@dataclass
class Claim:
    """A slot on a node, held until ``release()``."""

    node: Node
    key: str
    scheduler: "Scheduler"
    released: bool = False
    waited: float = 0.0
    "Seconds the job waited in the queue for this slot (0: it had one at once)."
    on_release: Optional[Callable[[], None]] = None
    "Also to do on release (the claim's lease, with several operators: odla/operator/cluster.py)."

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.scheduler._release(self)
            if self.on_release is not None:
                self.on_release()


class Cluster(Protocol):
    """Slots and the queue shared by several operators (odla/operator/cluster.py's SharedState)."""

    @property
    def ok(self) -> bool: ...  # False while the shared store cannot be used

    async def take(self, key: str, ticket: str, caller: str,
                   groups: list[list[Node]]) -> tuple[Optional[Node], int]: ...

    async def turn(self, key: str, place: int, timeout: float) -> None: ...

    async def leave(self, key: str, ticket: str, caller: str) -> None: ...

    def release(self, ticket: str) -> None: ...

    def wake(self) -> None: ...


@dataclass(eq=False)
class _Waiter:
    caller: str
    exclude: frozenset[str]
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    taken: bool = False
    "The waiter saw its grant (else, if it left at that moment, the slot is passed on)."


class _ModelQueue:
    """Waiters for one model: a FIFO per caller, callers served in turn."""

    def __init__(self) -> None:
        self.callers: OrderedDict[str, deque[_Waiter]] = OrderedDict()

    def __len__(self) -> int:
        return sum(len(q) for q in self.callers.values())

    def add(self, waiter: _Waiter) -> None:
        self.callers.setdefault(waiter.caller, deque()).append(waiter)

    def remove(self, waiter: _Waiter) -> None:
        queue = self.callers.get(waiter.caller)
        if queue is not None and waiter in queue:
            queue.remove(waiter)
            if not queue:
                del self.callers[waiter.caller]

    def order(self) -> Iterable[_Waiter]:
        """Waiters in the order they will be served: one per caller in turn."""
        queues = [list(q) for q in self.callers.values()]
        for round_ in itertools.zip_longest(*queues):
            yield from (w for w in round_ if w is not None)

    def take(self, waiter: _Waiter) -> None:
        """``waiter`` is served: out of the queue, and its caller to the back of the turn."""
        self.remove(waiter)
        if waiter.caller in self.callers:
            self.callers.move_to_end(waiter.caller)

    def place(self, waiter: _Waiter) -> int:
        return next((i for i, w in enumerate(self.order(), 1) if w is waiter), 0)


def _fastest(nodes: list[Node], key: str) -> list[Node]:
    """The fastest of ``nodes`` for ``key`` and those within ``EQUAL_SPEED`` of it (a node not
    measured yet counts as fastest: it gets jobs, and so a measure)."""
    speeds = [node.speed(key) for node in nodes]
    if any(speed is None for speed in speeds):
        return [node for node, speed in zip(nodes, speeds) if speed is None]
    top = max(speeds)
    return [node for node, speed in zip(nodes, speeds) if speed * EQUAL_SPEED >= top]


class Scheduler:
    """Claims slots on nodes for jobs; queues jobs that find none."""

    def __init__(self, registry: Registry, *, max_queue: int = 512, queue_timeout: float = 300,
                 clock: Optional[Callable[[], float]] = None, max_queue_per_key: Optional[int] = None) -> None:
        self.registry = registry
        self.max_queue = max_queue
        self.max_queue_per_key = max_queue_per_key
        "Jobs one caller (API key) may have waiting; None: no limit of its own."
        self.waiting_by_caller: Counter[str] = Counter()
        self.queue_timeout = queue_timeout
        self.clock = clock or registry.clock  # the registry's time: when loaded models expire
        self.queues: dict[str, _ModelQueue] = {}
        self._cursors: dict[str, itertools.count] = {}
        self.cluster: Optional[Cluster] = None
        "Several operators' shared slots and queue (odla/operator/cluster.py), used while ``cluster.ok``."
        self.waiting_in_cluster: Counter[str] = Counter()
        "Per model key: jobs of this operator waiting in the cluster's queue."
        self.closed: Optional[ODLAError] = None
        "Set when the operator stops: what every waiting job, and every new one, is answered."

    def close(self, error: ODLAError) -> None:
        """The operator is stopping: no job waits any longer, and none starts; each is answered ``error``."""
        self.closed = error
        for queue in self.queues.values():
            for waiter in queue.order():
                if not waiter.granted.done():
                    waiter.granted.set_exception(error)

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self.queues.values()) + sum(self.waiting_in_cluster.values())

    def depth(self) -> dict[str, int]:
        """Per model key: jobs of this operator waiting for a slot."""
        depths = Counter(self.waiting_in_cluster)
        depths.update({key: len(queue) for key, queue in self.queues.items()})
        return {key: n for key, n in depths.items() if n}

    def has_model(self, model: str, exclude: Iterable[str] = ()) -> bool:
        return any(n.node_id not in exclude for n in self.registry.candidates(model))

    def _usable(self, model: str, key: str, now: float, exclude: Iterable[str], free_only: bool) -> list[Node]:
        excluded = set(exclude)
        nodes = [n for n in self.registry.candidates(model) if n.node_id not in excluded]
        awake = [n for n in nodes if not n.resting(now)]
        return [n for n in awake or nodes if not free_only or n.free(key)]  # resting nodes only when no other can

    def try_claim(self, model: str, exclude: Iterable[str] = ()) -> Optional[Claim]:
        """The best free slot for ``model`` now, claimed; None when every node is full."""
        key, now = model_key(model), self.clock()
        free = self._usable(model, key, now, exclude, free_only=True)
        if not free:
            return None
        ranks = {n.node_id: self._rank(n, key, now) for n in free}
        best = min(ranks.values())
        equals = _fastest([n for n in free if ranks[n.node_id] == best], key)
        node = equals[next(self._cursors.setdefault(key, itertools.count())) % len(equals)]
        return self.hold(node, key)

    def ranked(self, model: str, exclude: Iterable[str] = ()) -> list[list[Node]]:
        """The nodes that could run ``model`` whatever this operator's own count (the cluster
        counts), in groups of equals, best first."""
        key, now = model_key(model), self.clock()
        classes: dict[tuple, list[Node]] = {}
        for node in self._usable(model, key, now, exclude, free_only=False):
            classes.setdefault(self._rank(node, key, now), []).append(node)
        groups = []
        for rank in sorted(classes):
            left = classes[rank]
            while left:  # the fastest and its equals, then the fastest of the rest and its equals...
                group = _fastest(left, key)
                groups.append(group)
                left = [n for n in left if n not in group]
        return groups

    async def claim(self, model: str, caller: str = "", exclude: Iterable[str] = (),
                    place: Optional[Place] = None, ticket: str = "", since: Optional[float] = None) -> Optional[Claim]:
        """A slot for ``model``, waiting in the queue if every node is full; None when no
        healthy node (outside ``exclude``) has the model at all. ``place(n)`` hears the
        job's place in the queue: at once, then when it changes, at most once a second.
        ``ticket`` (the job's id) is its name in the cluster's queue; ``since`` (loop time),
        when it began waiting, if it already had (its ``queue_timeout`` counts from then)."""
        if self.closed is not None:
            raise self.closed
        if self.cluster is not None and self.cluster.ok:
            return await self._claim_in_cluster(self.cluster, model, caller, exclude, place,
                                                ticket or os.urandom(8).hex())
        key = model_key(model)
        queue = self.queues.get(key)
        if not queue:  # nobody waits: a free slot is anyone's
            claim = self.try_claim(model, exclude)
            if claim is not None or not self.has_model(model, exclude):
                return claim
        self._room_for(model, caller)
        waiter = _Waiter(caller, frozenset(exclude))
        queue = self.queues.setdefault(key, _ModelQueue())
        queue.add(waiter)
        self.waiting_by_caller[caller] += 1
        began = asyncio.get_running_loop().time() if since is None else since
        try:
            claim = await self._wait(queue, waiter, model, place, began + self.queue_timeout)
            claim.waited = asyncio.get_running_loop().time() - began
            return claim
        finally:
            self._left(caller)
            queue.remove(waiter)
            if not queue:
                self.queues.pop(key, None)
            if waiter.granted.done() and not waiter.taken:
                waiter.granted.result().release()  # granted just as it gave up: pass it on

    async def _claim_in_cluster(self, cluster: Cluster, model: str, caller: str, exclude: Iterable[str],
                                place: Optional[Place], ticket: str) -> Optional[Claim]:
        key, loop = model_key(model), asyncio.get_running_loop()
        began = loop.time()
        deadline, told, shown = began + self.queue_timeout, -math.inf, 0
        ticketed = counted = False  # its ticket is in the cluster's queue; it is counted in waiting_in_cluster
        failed = 0  # calls to the cluster that failed in a row
        try:
            while cluster.ok:
                if self.closed is not None:
                    raise self.closed
                groups = self.ranked(model, exclude)
                if not groups:
                    return None
                asked = loop.time()
                node, now_place = await cluster.take(key, ticket, caller, groups)
                if node is not None:
                    ticketed = False  # the claim took its ticket out of the queue
                    claim = self.hold(node, key)
                    claim.on_release = lambda: cluster.release(ticket)
                    claim.waited = loop.time() - began if counted else 0.0
                    return claim
                if not now_place:  # that call failed (slow is not down): again, under a fresh ticket
                    ticketed, failed = False, failed + 1  # (the cluster gave the old one back)
                    ticket = f"{ticket.split('~')[0]}~{failed}"
                    if loop.time() >= deadline:
                        raise QueueTimeout(f"no node with model {model} had a free slot within "
                                           f"{self.queue_timeout:g}s (the shared state did not answer)")
                    await asyncio.sleep(max(0.0, min(0.1 * failed, 1.0) - (loop.time() - asked)))
                    continue
                failed, ticketed = 0, True
                if not counted:
                    self._room_for(model, caller)
                    counted = True
                    self.waiting_in_cluster[key] += 1
                    self.waiting_by_caller[caller] += 1
                if place is not None and now_place != shown and loop.time() - told >= 1.0:
                    shown, told = now_place, loop.time()
                    place(now_place)
                left = deadline - loop.time()
                if left <= 0:
                    raise QueueTimeout(f"no node with model {model} had a free slot within {self.queue_timeout:g}s")
                await cluster.turn(key, now_place, min(left, CLUSTER_POLL_S))
        finally:
            if counted:
                self._left(caller)
                self.waiting_in_cluster[key] -= 1
                if not self.waiting_in_cluster[key]:
                    del self.waiting_in_cluster[key]
            if ticketed:  # it gave up (or the client left): the jobs behind it move up
                await cluster.leave(key, ticket, caller)
        # the cluster is away: this operator's own count and queue, for what is left of the wait
        return await self.claim(model, caller, exclude, place, since=began if counted else None)

    def _room_for(self, model: str, caller: str) -> None:
        """Refuse a job that would wait past ``max_queue``, or past its caller's share of it."""
        if self.waiting >= self.max_queue:
            raise QueueFull(f"every node with model {model} is busy and {self.waiting} jobs wait already; "
                            f"try again later", headers={"Retry-After": str(RETRY_AFTER_S)})
        share = self.max_queue_per_key
        if caller and share is not None and self.waiting_by_caller[caller] >= share:
            raise QueueFull(f"every node with model {model} is busy and this API key has {share} jobs waiting "
                            f"already (max_queue_per_key); try again later", headers={"Retry-After": str(RETRY_AFTER_S)})

    def _left(self, caller: str) -> None:
        self.waiting_by_caller[caller] -= 1
        if self.waiting_by_caller[caller] <= 0:
            del self.waiting_by_caller[caller]

    async def _wait(self, queue: _ModelQueue, waiter: _Waiter, model: str, place: Optional[Place],
                    deadline: float) -> Claim:
        loop = asyncio.get_running_loop()
        shown = 0
        while True:
            if place is not None and (now_place := queue.place(waiter)) != shown:
                shown = now_place
                place(now_place)
            left = deadline - loop.time()
            if left <= 0:
                raise QueueTimeout(f"no node with model {model} had a free slot within {self.queue_timeout:g}s")
            done, _ = await asyncio.wait((waiter.granted,), timeout=min(left, 1.0) if place else left)
            if done:
                waiter.taken = True
                return waiter.granted.result()

    def _rank(self, node: Node, key: str, now: float) -> tuple[int, int]:
        """The node's class for ``key``; within one, speed decides (``_fastest``)."""
        warm, idle = node.warm(key, now), node.active_jobs == 0
        rank = 0 if warm and idle else 1 if warm else 2 if idle else 3
        return rank, round(node.errors * 4)  # a node that failed of late comes after its equals

    def hold(self, node: Node, key: str) -> Claim:
        """A slot on ``node`` for ``key``, counted here at once."""
        node.inflight[key] = node.inflight.get(key, 0) + 1
        node.jobs_total += 1
        return Claim(node, key, self)

    def _release(self, claim: Claim) -> None:
        node, key = claim.node, claim.key
        node.inflight[key] = max(0, node.inflight.get(key, 0) - 1)
        if not node.inflight[key]:
            del node.inflight[key]
        self.wake(key)

    def wake(self, key: Optional[str] = None, *, grown: bool = False) -> None:
        """Hand free slots to waiters: after a release, or when nodes may have gained capacity
        (``key`` None: every model). ``grown``: they did (a node joined, came back, or has more
        slots or models): the jobs waiting in the cluster's queue look again too."""
        if grown and self.cluster is not None and self.cluster.ok:
            self.cluster.wake()  # (a slot freed in the cluster wakes them by itself)
        for k in [key] if key is not None else list(self.queues):
            queue = self.queues.get(k)
            while queue:
                waiter = next((w for w in queue.order() if not w.granted.done()), None)
                if waiter is None:
                    break
                claim = self.try_claim(k, waiter.exclude) or self.try_claim(k)
                if claim is None:
                    break
                queue.take(waiter)
                waiter.granted.set_result(claim)
