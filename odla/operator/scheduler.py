"""Which node runs a job, and a fair queue when it should wait.

**Pick.** For each healthy node with the model the scheduler predicts when the job would finish
there (odla/operator/forecast.py): the wait for a slot, a model load if the model is not in memory,
and the answer's length at the node's speed as this operator measured it (never the node's own
claim), longer in proportion to the node's recent failures. It takes the earliest. Nodes within
``EQUAL_FINISH`` of it are equals: among them, one with a free slot, then an idle one, then one not
measured yet (so it gets measured), then each in turn (a per-model cursor). When the earliest
finish is on a node without a free slot, the job waits for it rather than start at once on a slow
or cold node. A node that failed several jobs in a row rests (odla/operator/registry.py) and gets
none unless no other can. Claiming counts the job at once with its predicted end; releasing it
(always, in ``finally``) never goes below zero.

**Queue.** When no free slot is the best place for it, the job waits: per model, fair across
callers (round-robin between API keys, first come first served within one), woken when a
slot frees or a node's capacity grows. A freed slot is offered to the waiters in their order,
each planned on its best node in turn (those planned ahead count there as running), so a newcomer
cannot take it first. While jobs wait, the queue also looks again every ``RECHECK_S``: a job that
overruns its predicted end makes its node look later, and a free slot passed up may become the best. Past ``max_queue`` waiting jobs a new one
is refused (503 with Retry-After); one that waits ``queue_timeout`` gives up (504). A waiter
whose client leaves is simply gone.

**Several operators** (``cluster``, odla/operator/cluster.py): the pick and the queue are the cluster's.
The scheduler ranks the nodes by predicted finish, in groups of equals; one call to Redis claims a
slot on the best node free across every operator (a job does not wait there for a busy better node:
the shared state has no predicted ends) (turning a cursor shared by all of them), or puts the
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
from odla.core.names import Prompt, model_key
from odla.operator.forecast import DEFAULT_SPEED, Forecaster, Prediction
from odla.operator.registry import Node, Registry

RETRY_AFTER_S = 5
EQUAL_FINISH = 1.15
"Nodes predicted to finish within 15 % of the earliest are equals: they take turns (no fixed steps to straddle)."
RECHECK_S = 0.5
"How often the queue looks again while a waiter is planned on a busy node (it may overrun, or a slot passed up become best)."
PLAN_AHEAD = 32
"Waiters planned per look at the queue: past them, a freed slot waits for the next look."
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
    prediction: Optional[Prediction] = None
    "When the job was predicted to finish on the node, when it asked (its first pick, if it waited)."
    end: float = 0.0
    "When it was predicted to end (registry clock), counted on the node until it is released."

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
    tokens: int = 0
    "Its answer's predicted length."
    prompt: Prompt = Prompt()
    "Its prompt: its length, and its conversation."
    prediction: Optional[Prediction] = None
    "Its first pick's prediction (the one its receipt shows)."
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


class Scheduler:
    """Claims slots on nodes for jobs; queues jobs that find none."""

    def __init__(self, registry: Registry, *, max_queue: int = 512, queue_timeout: float = 300,
                 clock: Optional[Callable[[], float]] = None, max_queue_per_key: Optional[int] = None,
                 affinity: bool = True) -> None:
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
        self.forecast = Forecaster(affinity)
        self._rechecks: dict[str, asyncio.TimerHandle] = {}

    def close(self, error: ODLAError) -> None:
        """The operator is stopping: no job waits any longer, and none starts; each is answered ``error``."""
        self.closed = error
        for handle in self._rechecks.values():
            handle.cancel()
        self._rechecks.clear()
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

    def _choose(self, key: str, now: float, tokens: int, exclude: Iterable[str] = (),
                planned: Optional[dict[str, list[float]]] = None,
                prompt: Prompt = Prompt()) -> Optional[tuple[Node, Prediction, bool]]:
        """The node predicted to finish the job first (among equals: free, then one whose load of the
        model pushes no other out, idle, not yet measured, then in turn), its prediction, and whether
        it has a free slot now; None: no node.
        Resting nodes only when no other has the model."""
        excluded = frozenset(exclude)
        scored = self._scored(key, now, tokens, excluded, planned, prompt, awake_only=True) \
            or self._scored(key, now, tokens, excluded, planned, prompt, awake_only=False)
        if not scored:
            return None
        best = min(entry[0] for entry in scored)
        equals = [entry for entry in scored if entry[0] <= best * EQUAL_FINISH]
        if len(equals) > 1:
            equals = ([e for e in equals if e[3]] or equals)  # a free slot
            equals = ([e for e in equals if e[2] is None or not e[2].load or not e[1].needs_room(key, now)]
                      or equals)  # a load that pushes no other model out of memory
            equals = ([e for e in equals if not e[1].active_jobs] or equals)
            equals = ([e for e in equals if key not in e[1].seen_speed] or equals)
            equals.sort(key=_joined)  # the cursor turns over the same order, however their speeds change
            turn = next(self._cursors.setdefault(key, itertools.count()))  # it turns whenever there are equals
            _, node, prediction, free = equals[turn % len(equals)]
        else:
            _, node, prediction, free = equals[0]
        if prediction is None:  # warm with a free slot: the answer alone
            prediction = Prediction(0.0, 0.0, tokens / (node.speed(key) or self._fastest_speed(key)), tokens,
                                    self.forecast.prompt_time(node, key, prompt))
        return node, prediction, free

    def _scored(self, key: str, now: float, tokens: int, excluded: frozenset[str],
                planned: Optional[dict[str, list[float]]], prompt: Prompt, awake_only: bool
                ) -> list[tuple[float, Node, Optional[Prediction], bool]]:
        """(score, node, prediction, free) for the healthy nodes that may finish the job with the
        earliest: the score is the predicted finish, longer for a node that failed of late; a warm
        node with a free slot has no prediction made (its answer alone), ``free``: a slot now.

        The hot path: nodes come fastest first (``Registry.fastest``), so once one's answer alone
        would take longer than the earliest finish so far times ``EQUAL_FINISH``, so would every
        slower one's, and the scan stops. With a hundred nodes, most are never looked at."""
        predict, fallback, best, scored = self.forecast.predict, 0.0, math.inf, []
        reading = self.forecast.prompt_time if prompt.tokens else None
        for _, _, node in self.registry.ordered(key):
            measured = node.seen_speed.get(key)
            if measured is not None:
                run = tokens / measured
                if run > best * EQUAL_FINISH:
                    break  # it and every slower node finish later than the best's equals
            else:
                run = -1.0
            if not node.healthy or node.quarantined or excluded and node.node_id in excluded or \
                    awake_only and node.resting_until is not None and node.resting_until > now:
                continue
            if run < 0:  # not measured yet: as fast as the fastest, so it gets a job and a measure
                speed = node.speed(key)
                if speed is None:
                    fallback = fallback or self._fastest_speed(key)
                    speed = fallback
                run = tokens / speed
            else:
                speed = measured
            read = reading(node, key, prompt) if reading is not None else 0.0
            doubt = node.errors + 1.0 - node.reputation  # failed of late, or caught
            score = run + read if not doubt else (run + read) * (1.0 + doubt)  # prompt and answer alone
            if score > best * EQUAL_FINISH:
                continue
            making_room = node.loading and key not in node.loading  # for another model: no new jobs of this one
            free = not making_room and _free(node, key, planned)
            if free and node.warm(key, now):  # warm with a free slot
                scored.append((score, node, None, True))
                if score < best:
                    best = score
                continue
            prediction = predict(node, key, now, tokens, speed, planned.get(node.node_id) if planned else None)
            if making_room:  # it can start once the other model is loaded
                prediction = prediction._replace(wait=max(prediction.wait, max(
                    self.forecast.load_time(node, other) for other in node.loading)))
            if read:
                prediction = prediction._replace(prompt=read)
            score = (prediction.wait + prediction.load + read + run) * (1.0 + doubt)
            if prediction.load and node.evicts_busy(key, now):
                score += prediction.load  # it pushes out a model in use there, which a later job will load again
            if score < best:
                best = score
            scored.append((score, node, prediction, free))
        return scored

    def _fastest_speed(self, key: str) -> float:
        """The fastest speed measured for ``key`` on a healthy node, or ``DEFAULT_SPEED``."""
        return next((n.seen_speed[key] for n in self.registry.fastest(key) if key in n.seen_speed and n.healthy),
                    DEFAULT_SPEED)

    def try_claim(self, model: str, exclude: Iterable[str] = (), tokens: Optional[int] = None,
                  prompt: Prompt = Prompt()) -> Optional[Claim]:
        """A slot for ``model`` on the node predicted to finish the job first (``tokens``: the most
        it asked for), claimed; None when that node has no free slot now (or no node has the model)."""
        key, now = model_key(model), self.clock()
        choice = self._choose(key, now, self.forecast.length(key, tokens), exclude, prompt=prompt)
        if choice is None or not choice[2]:
            return None
        return self.hold(choice[0], key, choice[1])

    def ranked(self, model: str, exclude: Iterable[str] = (), tokens: Optional[int] = None) -> list[list[Node]]:
        """The nodes that could run ``model`` whatever this operator's own count (the cluster
        counts), in groups of equals by predicted finish, best first."""
        key, now = model_key(model), self.clock()
        excluded = set(exclude)
        nodes = [n for n in self.registry.candidates(key) if n.node_id not in excluded]
        awake = [n for n in nodes if not n.resting(now)] or nodes
        length = self.forecast.length(key, tokens)
        fallback = self._fastest_speed(key)
        scored = sorted(((self.forecast.predict(n, key, now, length, n.speed(key) or fallback).total * (1.0 + n.errors), n)
                         for n in awake), key=lambda s: s[0])
        groups: list[list[Node]] = []
        top = -1.0
        for score, node in scored:  # the earliest and its equals, then the earliest of the rest and its equals...
            if groups and score <= top * EQUAL_FINISH:
                groups[-1].append(node)
            else:
                groups.append([node])
                top = score
        for group in groups:  # within a group: those not measured yet first (so they get measured)
            group.sort(key=lambda n: n.speed(key) is not None)
        return groups

    async def claim(self, model: str, caller: str = "", exclude: Iterable[str] = (),
                    place: Optional[Place] = None, ticket: str = "", since: Optional[float] = None,
                    tokens: Optional[int] = None, prompt: Prompt = Prompt()) -> Optional[Claim]:
        """A slot for ``model``, waiting in the queue when no free slot is the best place for the
        job; None when no healthy node (outside ``exclude``) has the model at all. ``tokens``: the
        most the job asked for (``num_predict``), if it did. ``place(n)`` hears the job's place in
        the queue: at once, then when it changes, at most once a second. ``ticket`` (the job's id)
        is its name in the cluster's queue; ``since`` (loop time), when it began waiting, if it
        already had (its ``queue_timeout`` counts from then)."""
        if self.closed is not None:
            raise self.closed
        if self.cluster is not None and self.cluster.ok:
            return await self._claim_in_cluster(self.cluster, model, caller, exclude, place,
                                                ticket or os.urandom(8).hex(), tokens, prompt)
        key, now = model_key(model), self.clock()
        length = self.forecast.length(key, tokens)
        choice = self._choose(key, now, length, exclude, prompt=prompt)
        if choice is None:
            return None
        node, prediction, free = choice
        queue = self.queues.get(key)
        if free and not queue:  # nobody waits: a free slot is anyone's
            return self.hold(node, key, prediction)
        self._room_for(model, caller)
        waiter = _Waiter(caller, frozenset(exclude), tokens=length, prompt=prompt, prediction=prediction)
        queue = self.queues.setdefault(key, _ModelQueue())
        queue.add(waiter)
        self.waiting_by_caller[caller] += 1
        began = asyncio.get_running_loop().time() if since is None else since
        try:
            self.wake(key)  # a slot the waiters ahead pass up may be its; alone, it looks again soon
            claim = await self._wait(queue, waiter, model, place, began + self.queue_timeout)
            claim.waited = asyncio.get_running_loop().time() - began
            claim.prediction = waiter.prediction
            return claim
        finally:
            self._left(caller)
            queue.remove(waiter)
            if not queue and self.queues.get(key) is queue:  # never a newer queue that replaced this one
                del self.queues[key]
            if waiter.granted.done() and not waiter.taken:
                waiter.granted.result().release()  # granted just as it gave up: pass it on

    async def _claim_in_cluster(self, cluster: Cluster, model: str, caller: str, exclude: Iterable[str],
                                place: Optional[Place], ticket: str, tokens: Optional[int],
                                prompt: Prompt) -> Optional[Claim]:
        key, loop = model_key(model), asyncio.get_running_loop()
        began = loop.time()
        deadline, told, shown = began + self.queue_timeout, -math.inf, 0
        ticketed = counted = False  # its ticket is in the cluster's queue; it is counted in waiting_in_cluster
        failed = 0  # calls to the cluster that failed in a row
        try:
            while cluster.ok:
                if self.closed is not None:
                    raise self.closed
                groups = self.ranked(model, exclude, tokens)
                if not groups:
                    return None
                asked = loop.time()
                node, now_place = await cluster.take(key, ticket, caller, groups)
                if node is not None:
                    ticketed = False  # the claim took its ticket out of the queue
                    claim = self.hold(node, key, tokens=tokens)
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
        return await self.claim(model, caller, exclude, place, since=began if counted else None, tokens=tokens,
                                prompt=prompt)

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

    def hold(self, node: Node, key: str, prediction: Optional[Prediction] = None,
             tokens: Optional[int] = None) -> Claim:
        """A slot on ``node`` for ``key``, counted here at once with its predicted end."""
        now = self.clock()
        if prediction is None:
            length = self.forecast.length(key, tokens)
            prediction = self.forecast.predict(node, key, now, length, node.speed(key) or DEFAULT_SPEED)
        node.inflight[key] = node.inflight.get(key, 0) + 1
        node.jobs_total += 1
        end = now + prediction.total
        node.ends.setdefault(key, []).append(end)
        return Claim(node, key, self, prediction=prediction, end=end)

    def _release(self, claim: Claim) -> None:
        node, key = claim.node, claim.key
        node.inflight[key] = max(0, node.inflight.get(key, 0) - 1)
        if not node.inflight[key]:
            del node.inflight[key]
        ends = node.ends.get(key)
        if ends is not None:
            if claim.end in ends:
                ends.remove(claim.end)
            if not ends or key not in node.inflight:
                del node.ends[key]
        self.wake(key)

    def wake(self, key: Optional[str] = None, *, grown: bool = False) -> None:
        """Offer free slots to waiters: after a release, or when nodes may have gained capacity
        (``key`` None: every model). ``grown``: they did (a node joined, came back, or has more
        slots or models): the jobs waiting in the cluster's queue look again too.

        Waiters are planned in their order, each on the node predicted to finish it first, those
        planned ahead counting there as running: a waiter whose best node has a free slot gets it.
        """
        if grown and self.cluster is not None and self.cluster.ok:
            self.cluster.wake()  # (a slot freed in the cluster wakes them by itself)
        for k in [key] if key is not None else list(self.queues):
            queue = self.queues.get(k)
            if not queue:
                continue
            now, planned = self.clock(), {}
            waiting = (w for w in queue.order() if not w.granted.done())
            for waiter in itertools.islice(waiting, PLAN_AHEAD):
                choice = self._choose(k, now, waiter.tokens, waiter.exclude, planned, waiter.prompt)
                if choice is None:
                    continue  # no node left outside those it failed on: it waits for one to join
                node, prediction, free = choice
                if free:
                    queue.take(waiter)
                    waiter.granted.set_result(self.hold(node, k, prediction))
                    continue
                planned.setdefault(node.node_id, []).append(now + prediction.total)
            if planned:
                self._recheck(k)

    def _recheck(self, key: str) -> None:
        """Look at ``key``'s queue again in ``RECHECK_S``: its waiters are planned on busy nodes, whose
        jobs may overrun their predicted ends (and a free slot they passed up may now be best)."""
        if key in self._rechecks or self.closed is not None:
            return

        def again() -> None:
            self._rechecks.pop(key, None)
            self.wake(key)

        self._rechecks[key] = asyncio.get_running_loop().call_later(RECHECK_S, again)


def _joined(entry: tuple) -> int:
    return entry[1].joined


def _free(node: Node, key: str, planned: Optional[dict[str, list[float]]]) -> bool:
    """A slot for ``key`` on ``node`` now: fewer jobs running and planned there than its slots."""
    busy = node.inflight.get(key, 0)
    if planned:
        busy += len(planned.get(node.node_id, ()))
    return busy < node.slots_for(key)
