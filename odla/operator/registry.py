"""The operator's in-memory registry of nodes: what each has, can run and is running; prune.

Pure and synchronous: the clock is injected, so tests move time by hand; it is monotonic
(``time.monotonic``), so a jump of the wall clock prunes no node: wall-clock times (Ollama's
``expires_at``) are taken onto it as they arrive and shown back as wall-clock times. Which node gets a
job is the scheduler's business (odla/operator/scheduler.py); in-flight counts are the operator's own
and are never overwritten by what a node reports.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

from odla.core.names import display_name, model_key
from odla.core.protocol import LoadedModel, NodeInfo, NodeReport
from odla.core.times import epoch, iso

Clock = Callable[[], float]
LINK_SCHEME = "link://"
"The URL of a node that dialled in: ``link://<the address it dialled from>``."
REST_AFTER = 3  # failures in a row before a node rests
REST_BASE_S = 5.0  # the first rest; each further failure doubles it
REST_MAX_S = 120.0
ERROR_WEIGHT = 0.2  # weight of the newest outcome in a node's error average
SPEED_WEIGHT = 0.3  # weight of the newest answer in a node's speed as the operator saw it
MIN_TOKENS_SEEN, MIN_SECONDS_SEEN = 3, 0.02  # an answer shorter than this tells no speed
IN_USE_S = 10.0
"A model that ran a job on a node this recently is in use there: pushing it out costs a load later."
CLAIM_SLACK, CLAIM_FLOOR = 3.0, 0.6
"How far a node's reported speed may exceed the measured one, and the least its reputation keeps for it."
TRUSTED_SLOTS = 2
"Slots a node is given at once until one of its jobs began to answer with more of them running there."
LOADED_LATE_S = 1.0
DOUBT_S = 60.0
"""A first token this much later than a loaded model's (or half a load's time, when more) took a load;
for this long after that, a node that had said the model was loaded is not believed on it."""


@dataclass
class Node:
    """What the operator knows about one node."""

    node_id: str
    url: str
    models: list[str]
    last_seen: float
    healthy: bool = True
    jobs_total: int = 0
    keys: frozenset[str] = field(default_factory=frozenset)
    slots: dict[str, int] = field(default_factory=dict)
    "Per model key: requests Ollama runs at once (1 when the node did not say)."
    loaded: dict[str, Optional[float]] = field(default_factory=dict)
    "Per model key: when Ollama unloads it (on the registry's clock; None: not known)."
    tokens_per_s: dict[str, float] = field(default_factory=dict)
    "Per model key, as the node says it measured it (shown; never believed for scheduling)."
    slots_learned: bool = False
    "The node learns its slots from its jobs (they may change); else they are configured."
    seen_speed: dict[str, float] = field(default_factory=dict)
    "Per model key: tokens per second of the answers this operator relayed from the node (a moving average)."
    inflight: dict[str, int] = field(default_factory=dict)
    "Per model key: jobs this operator has running here. Claimed and released by the scheduler only."
    ends: dict[str, list[float]] = field(default_factory=dict)
    "Per model key: when each of those jobs was predicted to end (registry clock; odla/operator/forecast.py)."
    load_s: dict[str, float] = field(default_factory=dict)
    "Per model key: seconds its Ollama took to load it, as its answers' ``load_duration`` said (a moving average)."
    max_models: int = 0
    """Models its Ollama holds at most, as last seen when it dropped one to load another (0: not seen
    yet); raised when it is seen holding more."""
    most_loaded: int = 0
    "The most models its Ollama was seen to hold at once."
    used: dict[str, float] = field(default_factory=dict)
    "Per model key: when a job of it last started here (registry clock)."
    loading: dict[str, int] = field(default_factory=dict)
    """Per model key: jobs sent here whose model must push another out of memory, not yet answered.
    Meanwhile the node gets no jobs of other models: they would keep the one to go busy, and Ollama
    would never load this one."""
    failures: int = 0
    "Jobs that failed here in a row (unreachable, refused, broken off)."
    errors: float = 0.0
    "Moving average of failed jobs (0: none of late, 1: all)."
    resting_until: Optional[float] = None
    "After REST_AFTER failures in a row the node gets no jobs until then, unless no other node can."
    link: Any = None
    "The node's dial-out link (``odla.operator.link.Link``) while it has one; None for a node reached at its URL."
    address: Optional[str] = None
    "The key that signed its registration (``odla.operator.identities``); None: an unsigned node."
    reputation: float = 1.0
    """From its audits, disputed receipts and outcomes (``rate``; ``odla.operator.audits``): 1 until
    something counts against it."""
    ok_jobs: int = 0
    failed_jobs: int = 0
    "Its jobs that ended well, and those it failed (here, since it joined)."
    quarantined: bool = False
    "Its reputation fell under ``quarantine_below``: it gets no jobs."
    digests: dict[str, str] = field(default_factory=dict)
    "Model key -> the digest the node's Ollama lists for it, as the node reports it."
    disk_free: Optional[int] = None
    "Bytes free where its Ollama keeps models, as the node reports it (None: it does not say)."
    standing: Any = None
    "What audits and receipts found of it (``odla.operator.audits.Standing``); None: nothing yet."
    prompt_s: dict[str, float] = field(default_factory=dict)
    "Per model key: seconds its Ollama takes per prompt token it reads (``prompt_eval_duration``; a moving average)."
    cached: dict[str, "OrderedDict[str, None]"] = field(default_factory=dict)
    """Per model key: the conversations whose last turn it served, newest last, as many as it has slots:
    Ollama keeps each slot's prompt and answer cached (odla/operator/forecast.py)."""
    joined: int = 0
    "Its place in the order nodes joined (equal nodes take turns in this order)."
    most_at_once: dict[str, int] = field(default_factory=dict)
    """Per model key: the most jobs this operator had running here when one of them began to answer:
    what bounds the slots it claims (``slots_for``)."""
    load_began: dict[str, float] = field(default_factory=dict)
    "Per model key: when this operator last sent it a job of the model while not taking it to be loaded (registry clock)."
    doubted: dict[str, float] = field(default_factory=dict)
    """Per model key: until when its word that the model is loaded is not taken (registry clock): a job
    it said so of answered as late as a load (``checked_warm``)."""
    changed: dict[str, tuple[Optional[str], float]] = field(default_factory=dict)
    """Per model key: a change this operator made to the node's models (its name when added, None when
    removed) and until when (registry clock) it holds against what reports say (``Registry.changed``)."""
    on_speed: Optional[Callable[["Node", str], None]] = field(default=None, repr=False, compare=False)
    "Told when ``seen_speed`` of a model changes (the registry keeps its nodes in order of speed)."

    @property
    def dialled(self) -> bool:
        """It dialled in (``link: dial``): reached only through its link, open or not."""
        return self.url.startswith(LINK_SCHEME)

    def outcome(self, ok: bool, now: float) -> None:
        """A job here ended: ``ok``, or it failed because of the node. Rests only ever get longer."""
        self.errors = ERROR_WEIGHT * (0.0 if ok else 1.0) + (1 - ERROR_WEIGHT) * self.errors
        self.failures = 0 if ok else self.failures + 1
        if ok:
            self.ok_jobs += 1
        else:
            self.failed_jobs += 1
        self.rate()
        if self.failures >= REST_AFTER:
            rest = min(REST_MAX_S, REST_BASE_S * 2 ** (self.failures - REST_AFTER))
            self.resting_until = max(self.resting_until or 0.0, now + rest)

    def rate(self) -> None:
        """Its reputation: what audits and receipts found of it (``standing``), weighed by how many
        of its jobs ended well (a node that fails half its jobs keeps at most 7/8 of it) and by how its
        reported speeds hold against those measured (``speed_honesty``)."""
        found = self.standing.reputation if self.standing is not None else 1.0
        ended_well = 0.75 + 0.25 * (1 + self.ok_jobs) / (1 + self.ok_jobs + self.failed_jobs)
        self.reputation = found * ended_well * self.speed_honesty()

    def speed_honesty(self) -> float:
        """1 while every speed it reports is at most ``CLAIM_SLACK`` times what this operator measured
        of its answers (a slow client slows what is measured; a node's own measure leaves the network
        out); then that bound over its claim, never under ``CLAIM_FLOOR``: a speed it made up counts
        against it, and alone never quarantines it."""
        worst = 1.0
        for key, said in self.tokens_per_s.items():
            seen = self.seen_speed.get(key)
            if seen and said > CLAIM_SLACK * seen:
                worst = min(worst, CLAIM_SLACK * seen / said)
        return max(CLAIM_FLOOR, worst)

    def resting(self, now: float) -> bool:
        return self.resting_until is not None and self.resting_until > now

    @property
    def active_jobs(self) -> int:
        return sum(self.inflight.values())

    def said_slots(self, key: str) -> int:
        """The slots it says its Ollama has for ``key`` (1 when it does not say)."""
        return self.slots.get(key, 1)

    def slots_for(self, key: str) -> int:
        """Jobs of ``key`` it is given at once: the slots it says it has (1 when it does not say),
        up to twice the most this operator had running here when one of them began to answer (at
        least ``TRUSTED_SLOTS``). An honest node reaches its slots in a few answers; a node that
        claims a thousand and answers nothing gets two."""
        return min(self.said_slots(key), max(TRUSTED_SLOTS, 2 * self.most_at_once.get(key, 0)))

    def answered(self, key: str) -> bool:
        """A job of ``key`` here sent its first token; True when that gave the node more slots."""
        at_once = self.inflight.get(key, 0)
        if at_once <= self.most_at_once.get(key, 0):
            return False
        before = self.slots_for(key)
        self.most_at_once[key] = at_once
        return self.slots_for(key) > before

    def checked_warm(self, key: str, said_warm: bool, late: float, load: float, now: float) -> None:
        """A job of ``key`` here sent its first token ``late`` seconds after a loaded model would have
        (the forecast's wait and prompt time), ``load`` being a load's time: when it had said the model
        was loaded and it came a load's time late, its word on that model is not taken for
        ``DOUBT_S``; a job that came in time restores it."""
        if late < max(LOADED_LATE_S, load / 2):
            self.doubted.pop(key, None)
        elif said_warm:
            self.doubted[key] = now + DOUBT_S

    def free(self, key: str) -> bool:
        return self.inflight.get(key, 0) < self.slots_for(key)

    def warm(self, key: str, now: float) -> bool:
        if key not in self.loaded or key in self.doubted and self.doubted[key] > now:
            return False
        expires = self.loaded[key]
        return expires is None or expires > now

    def served(self, key: str, conversation: str) -> None:
        """A turn of ``conversation`` ended here: Ollama has it cached in one of the model's slots."""
        recent = self.cached.setdefault(key, OrderedDict())
        recent[conversation] = None
        recent.move_to_end(conversation)
        while len(recent) > self.said_slots(key):
            recent.popitem(last=False)

    def use(self, key: str, until: float, now: float) -> None:
        """A job for ``key`` starts: Ollama has it in memory until ``until``; if that needed room
        (``max_models``), the least recently used idle model went."""
        if self.needs_room(key, now, known=True):
            idle = [k for k in self.loaded if self.warm(k, now) and not self.inflight.get(k)]
            if idle:
                del self.loaded[min(idle, key=lambda k: self.loaded[k] or 0.0)]
        self.loaded[key] = until
        self.used[key] = now

    def evicts_busy(self, key: str, now: float) -> bool:
        """Loading ``key`` here would push out a model that ran a job here within ``IN_USE_S``: a
        later job of it would load it again (one that sat idle is no loss)."""
        if not self.needs_room(key, now):
            return False
        return any(now - self.used.get(k, -math.inf) < IN_USE_S for k in self.loaded if k != key and self.warm(k, now))

    def needs_room(self, key: str, now: float, known: bool = False) -> bool:
        """Loading ``key`` here would push another model out of memory: it holds ``max_models``
        already, or (unless ``known``) as many as it was ever seen to hold at once. (Heartbeats
        correct what the operator takes to be loaded.)"""
        room = self.max_models if known else self.max_models or self.most_loaded
        if not room or self.warm(key, now):
            return False
        return sum(1 for k in self.loaded if self.warm(k, now)) >= room

    def speed(self, key: str) -> Optional[float]:
        """Tokens per second for this model as the operator saw them arrive, or the mean over the node's
        models; None: not measured yet. What the node claims is not taken: a node could say anything."""
        if key in self.seen_speed:
            return self.seen_speed[key]
        return sum(self.seen_speed.values()) / len(self.seen_speed) if self.seen_speed else None

    def saw(self, key: str, tokens: int, seconds: float) -> None:
        """An answer of ``tokens`` for ``key`` came in ``seconds`` from its first token to its last."""
        if tokens < MIN_TOKENS_SEEN or seconds < MIN_SECONDS_SEEN:
            return  # too short to tell a speed (a whole answer in one read)
        rate = (tokens - 1) / seconds
        before = self.seen_speed.get(key)
        self.seen_speed[key] = rate if before is None else SPEED_WEIGHT * rate + (1 - SPEED_WEIGHT) * before
        self.rate()  # its reported speed is held against it
        if self.on_speed is not None:
            self.on_speed(self, key)

    def info(self, now: float, active_jobs: Optional[int] = None, builds: Mapping[str, set[str]] = {}) -> NodeInfo:
        """What ``/nodes`` says of the node (``active_jobs``: counted across operators, when they share);
        ``now`` is the registry's clock, whose times are shown as wall-clock times; ``builds``: each
        model key's digests across the nodes (``Registry.builds``)."""
        speeds = list(self.tokens_per_s.values())
        wall = time.time() - now  # the registry's clock to the wall's
        return NodeInfo(
            node_id=self.node_id,
            url=self.url,
            models=list(self.models),
            last_seen=iso(wall + self.last_seen),
            healthy=self.healthy,
            active_jobs=self.active_jobs if active_jobs is None else active_jobs,
            jobs_total=self.jobs_total,
            slots={m: self.said_slots(model_key(m)) for m in self.models},  # its word; given: slots_for
            slots_learned=self.slots_learned,
            loaded=[display_name(k) for k in self.loaded if self.warm(k, now)],
            tokens_per_s=round(sum(speeds) / len(speeds), 1) if speeds else None,  # the node's word
            resting_until=iso(wall + self.resting_until) if self.resting(now) else None,
            link="dial" if self.dialled else "http",
            address=self.address,
            reputation=round(self.reputation, 3),
            audits={"passed": self.standing.passed, "failed": self.standing.failed} if self.standing else
            {"passed": 0, "failed": 0},
            disputed=self.standing.disputed if self.standing else 0,
            quarantined=self.quarantined,
            disk_free=self.disk_free,
            other_builds=[display_name(k) for k in sorted(self.keys) if len(builds.get(k, ())) > 1],
        )


def _with_changes(node: Node, models: list[str], now: float) -> list[str]:
    """``models`` as reported, with the changes this operator made that still hold (the others forgotten)."""
    for key in [k for k, (_, until) in node.changed.items() if until <= now]:
        del node.changed[key]
    kept = [m for m in models if model_key(m) not in node.changed]
    return kept + [name for name, _ in node.changed.values() if name is not None]


def capacity(node: Optional[Node]) -> frozenset[tuple[str, int]]:
    """What jobs a node can take: (model key, slots) while it is healthy. A registration or a
    check that adds to it wakes the queue (``Scheduler.wake(grown=True)``)."""
    if node is None or not node.healthy:
        return frozenset()
    return frozenset((key, node.slots_for(key)) for key in node.keys)


class Registry:
    """Nodes by id."""

    def __init__(self, *, prune_after: float, clock: Clock = time.monotonic) -> None:
        self.prune_after = prune_after
        self.clock = clock
        self._nodes: dict[str, Node] = {}
        self._having: dict[str, dict[str, Node]] = {}
        "Per model key: the nodes that have it, by id (the scheduler's candidates without a scan of every node)."
        self._by_speed: dict[str, list[tuple[float, int, Node]]] = {}
        "Per model key: (-measured speed, or -inf if not measured; a tie-breaker; node), in order: fastest first."
        self._entries: dict[tuple[str, str], tuple[float, int, Node]] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> Optional[Node]:
        return self._nodes.get(node_id)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def builds(self) -> dict[str, set[str]]:
        """Each model key's digests, across the nodes that report one."""
        out: dict[str, set[str]] = {}
        for node in self._nodes.values():
            for key, digest in node.digests.items():
                out.setdefault(key, set()).add(digest)
        return out

    def register(self, node_id: str, url: str, models: Iterable[str], *, healthy: bool = True,
                 slots: Optional[Mapping[str, int]] = None, loaded: Iterable[LoadedModel] = (),
                 tokens_per_s: Optional[Mapping[str, float]] = None, slots_learned: bool = False,
                 digests: Optional[Mapping[str, str]] = None, disk_free: Optional[int] = None,
                 max_models: Optional[int] = None) -> Node:
        """Add a node, or update the one with this id (never a second row)."""
        models = list(dict.fromkeys(models))
        node = self._nodes.get(node_id)
        if node is None:
            self._seq += 1
            node = self._nodes[node_id] = Node(node_id, url, [], self.clock(), joined=self._seq, on_speed=self._place)
        node.url, node.last_seen, node.healthy = url, self.clock(), healthy
        self.set_models(node, models)
        node.slots = {model_key(m): n for m, n in (slots or {}).items()}
        now, wall = self.clock(), time.time()
        held = {k for k in node.loaded if node.warm(k, now)}
        node.loaded = {model_key(m.name): self._local(epoch(m.expires_at), now, wall) for m in loaded}
        if max_models is not None:  # its owner told it (OLLAMA_MAX_LOADED_MODELS): no need to learn it
            node.max_models = max_models
        elif held - node.loaded.keys() and node.loaded.keys() - held:  # one went before its time, another came
            node.max_models = len(node.loaded)
        elif node.max_models:
            node.max_models = max(node.max_models, len(node.loaded))
        node.most_loaded = max(node.most_loaded, len(node.loaded))
        node.tokens_per_s = {model_key(m): v for m, v in (tokens_per_s or {}).items()}
        node.slots_learned = slots_learned
        node.digests = {model_key(m): d for m, d in (digests or {}).items()}
        node.disk_free = disk_free
        return node

    def take_report(self, report: NodeReport, url: str, healthy: Optional[bool] = None) -> Node:
        """Add or update the node ``report`` describes (a registration, a link's report, or another
        operator's, through Redis), reached at ``url``; ``healthy``: instead of the report's word."""
        return self.register(report.node_id, url, report.models,
                             healthy=report.healthy if healthy is None else healthy, slots=report.slots,
                             loaded=report.loaded, tokens_per_s=report.tokens_per_s,
                             slots_learned=report.slots_learned, digests=report.digests,
                             disk_free=report.disk_free, max_models=report.max_models)

    def changed(self, node: Node, seconds: float, added: Iterable[str] = (), removed: Iterable[str] = ()) -> None:
        """This operator has just changed the node's models (its Ollama answered a pull, copy or delete).
        For ``seconds`` that change holds against what reports say: one that left the node before the
        change (a heartbeat, a link's status, a health check under way) may arrive after it."""
        until = self.clock() + seconds
        node.changed.update({model_key(m): (None, until) for m in removed})
        node.changed.update({model_key(m): (display_name(m), until) for m in added})
        self.set_models(node, node.models)

    def set_models(self, node: Node, models: list[str]) -> None:
        if node.changed:
            models = _with_changes(node, models, self.clock())
        keys = frozenset(model_key(m) for m in models)
        for key in node.keys - keys:
            self._unindex(node, key)
        for key in keys - node.keys:
            self._having.setdefault(key, {})[node.node_id] = node
        node.models, node.keys = models, keys
        for key in keys:
            if (node.node_id, key) not in self._entries:
                self._place(node, key)

    def _place(self, node: Node, key: str) -> None:
        """Put ``node`` where its speed for ``key`` puts it in ``fastest(key)``."""
        entries = self._by_speed.setdefault(key, [])
        old = self._entries.pop((node.node_id, key), None)
        if old is not None:
            entries.remove(old)
        if key not in node.keys or self._nodes.get(node.node_id) is not node:
            return
        self._seq += 1
        entry = (-node.seen_speed.get(key, math.inf), self._seq, node)
        self._entries[(node.node_id, key)] = entry
        bisect.insort(entries, entry)

    def _unindex(self, node: Node, key: str) -> None:
        having = self._having.get(key)
        if having is not None and having.get(node.node_id) is node:
            del having[node.node_id]
            if not having:
                del self._having[key]
        old = self._entries.pop((node.node_id, key), None)
        if old is not None:
            self._by_speed[key].remove(old)
            if not self._by_speed[key]:
                del self._by_speed[key]

    def remove(self, node_id: str) -> bool:
        node = self._nodes.pop(node_id, None)
        if node is None:
            return False
        for key in node.keys:
            self._unindex(node, key)
        return True

    def seen(self, node_id: str, *, healthy: bool, models: Optional[list[str]] = None) -> None:
        """Record an answer from the node (a health check)."""
        node = self._nodes.get(node_id)
        if node is None:
            return
        node.last_seen, node.healthy = self.clock(), healthy
        if models is not None:
            self.set_models(node, models)

    def mark_failed(self, node_id: str) -> None:
        """The node did not answer: give it no new jobs until it answers again."""
        node = self._nodes.get(node_id)
        if node is not None:
            node.healthy = False

    def fastest(self, key: str) -> Iterator[Node]:
        """The nodes with model ``key``, healthy or not: those not measured for it yet first, then
        by the speed this operator measured, fastest first (kept in order as speeds change)."""
        return (entry[2] for entry in self._by_speed.get(key, ()))

    def ordered(self, key: str) -> list[tuple[float, int, Node]]:
        """``fastest(key)`` as the registry keeps it: (-speed, a tie-breaker, node), not to be changed."""
        return self._by_speed.get(key, [])

    def candidates(self, model: str) -> list[Node]:
        """Healthy nodes with ``model``, in registration order."""
        return [n for n in self._having.get(model_key(model), {}).values() if n.healthy and not n.quarantined]

    @staticmethod
    def _local(when: Optional[float], now: float, wall: float) -> Optional[float]:
        """A wall-clock time (Ollama's ``expires_at``) on the registry's clock."""
        return None if when is None else now + (when - wall)

    def prune(self) -> list[str]:
        """Drop nodes not seen for ``prune_after`` seconds; returns their ids. One with jobs still
        running here is kept, out of rotation, until they end: were it to register again, a fresh
        record would count none of them and take more jobs than the node has slots."""
        cutoff = self.clock() - self.prune_after
        gone = []
        for node in list(self._nodes.values()):
            if node.last_seen >= cutoff:
                continue
            if node.active_jobs:
                node.healthy = False
                continue
            self.remove(node.node_id)
            gone.append(node.node_id)
        return gone
