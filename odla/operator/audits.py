"""Audits and reputation: the operator re-runs a hidden sample of jobs on other nodes and judges
each node by what it finds.

    auditor = Auditor(settings, registry, router)      # owned by the operator's lifespan
    job.audit = auditor.sample()                       # at a job's start: a Capture, or None
    body = seeded(path, body)                          # every job gets a seed unless it set one
    auditor.ended(job)                                 # at its end: the audit runs in the background
    auditor.disputed(node)                             # a disputed receipt (odla.operator.countersign)

So that a re-run can match, every job that did not set ``options.seed`` (OpenAI: ``seed``) gets
one (``audit_seed``): a random one, so answers vary as before, but the node's answer is now one
that any node with the same model digest gives again. A sampled job (``audit_rate``) keeps the
first bytes of its answer; when it has ended well, the same request, byte for byte, goes to
another node that reports the same model digest, under the caller ``odla-audit`` in the fair queue
(so audits wait their turn and never crowd clients out), at most ``AUDITS_AT_ONCE`` at a time. The
auditing node sees a job like any other: same path, same body, a job id of its own.

The first ``audit_tokens`` words of the two answers match: the job passes. They do not: a third
node answers too, and any node whose answer is the odd one out (the other two agree, within
drift, and it agrees with neither) fails, as does one that stopped well short of what both others
gave under the same seed. Otherwise (no third node, or three different answers) the audit says
nothing. A node that has no peer with its model's digest is asked a canary instead: a request
whose answer two other nodes gave alike in a passed audit (the last ``CANARIES`` per model and
digest; never one it answered, so it cannot know it again), and held to that answer. What the audits and receipts found is ``(1 + passed) / (1 + passed + 4 x (failed +
disputed))``; a node's reputation is that, weighed by the share of its jobs that ended well
(``Node.rate``). Under ``quarantine_below`` it gets no jobs, and its receipts from the open epoch on
are disputed.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from odla.core.config import Settings
from odla.core.errors import ODLAError
from odla.core.names import model_key
from odla.operator.countersign import AUDIT_CALLER, PADDING
from odla.operator.registry import Node, Registry
from odla.serving.jobs import Job

log = logging.getLogger("odla.operator")

AUDITS_AT_ONCE = 2
"Audits running at once, at most: past it a sampled job is not audited (counted as skipped)."
CAPTURE_BYTES = 1 << 16
"The most of a sampled answer kept to compare."
AGREE = 0.9
"Two answers agree when this share of their first words match (GPUs of different makes drift)."
DISAGREE = 0.5
"An answer that matches less than this share of another's first words is another answer."
SHORT = 0.75
"An answer this much shorter than both others' under the same seed stopped early."
CANARIES = 16
"Canaries kept per model and digest (the latest passed audits')."
PENALTY = 4
"What a failed audit or a disputed receipt weighs against a passed audit."
SEEDED_PATHS = {"/run": "options", "/inference": "options", "/api/generate": "options", "/api/chat": "options",
                "/v1/chat/completions": "top", "/v1/completions": "top"}

@dataclass
class Capture:
    """A sampled job: the request it sent, and the first bytes of its answer."""

    request: Optional[tuple[str, str, bytes]] = None
    answer: bytearray = field(default_factory=bytearray)

    def add(self, chunk: bytes) -> None:
        if len(self.answer) < CAPTURE_BYTES:
            self.answer += chunk[:CAPTURE_BYTES - len(self.answer)]


@dataclass
class Standing:
    """What the operator has found of one node."""

    passed: int = 0
    failed: int = 0
    disputed: int = 0

    @property
    def reputation(self) -> float:
        return (1 + self.passed) / (1 + self.passed + PENALTY * (self.failed + self.disputed))


def seeded(path: str, body: bytes, rng: Callable[[], int] = lambda: random.getrandbits(31)) -> bytes:
    """``body`` with a seed, when the request runs a model and set none (unchanged otherwise, and
    for anything that is not a JSON object)."""
    where = SEEDED_PATHS.get(path)
    if where is None:
        return body
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return body
    if not isinstance(data, dict):
        return body
    if where == "top":
        if data.get("seed") is not None:
            return body
        data["seed"] = rng()
    else:
        options = data.get("options")
        if options is None:
            options = data["options"] = {}
        if not isinstance(options, dict) or options.get("seed") is not None:
            return body
        options["seed"] = rng()
    return json.dumps(data, separators=(",", ":")).encode()


def words_of(data: bytes) -> list[str]:
    """The words of an answer as it was sent: ODLA's token lines, Ollama's stream or document
    (``response``, ``message.content``), or OpenAI's (``choices[0].delta.content`` or ``text``)."""
    text = []
    for line in bytes(data).split(b"\n"):
        line = line.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        if not line.startswith(b"{"):
            continue
        try:
            part = json.loads(line)
        except ValueError:
            continue  # a line cut at the capture's end
        piece = part.get("token") or part.get("response")
        if piece is None and isinstance(part.get("message"), dict):
            piece = part["message"].get("content")
        if piece is None and isinstance(part.get("choices"), list) and part["choices"]:
            choice = part["choices"][0]
            piece = (choice.get("delta") or {}).get("content") or choice.get("text") or (
                (choice.get("message") or {}).get("content"))
        if isinstance(piece, str):
            text.append(piece)
    return "".join(text).split()


def agreement(a: list[str], b: list[str], n: int) -> float:
    """The share of the first ``n`` words that two answers have alike, position by position, as far
    as the shorter goes (an answer cut short agrees with the whole one: ``_short`` judges its length)."""
    a, b = a[:n], b[:n]
    shortest = min(len(a), len(b))
    if not shortest:
        return 1.0
    return sum(x == y for x, y in zip(a, b)) / shortest


class Auditor:
    def __init__(self, settings: Settings, registry: Registry, router: Any, store: Any = None,
                 rng: Callable[[], float] = random.random) -> None:
        self.rate = settings.audit_rate
        self.tokens = settings.audit_tokens
        self.quarantine_below = settings.quarantine_below
        self.registry = registry
        self.router = router
        self.rng = rng
        self.store = store
        "Where what was found of each node is kept (``Receipts.stand``): a restart forgets no cheat."
        self.standing: dict[str, Standing] = {}
        "What this operator found of each node."
        self.others: dict[str, Standing] = {}
        "What the other operators on one Redis found of each node, summed (``odla.operator.cluster``)."
        self.on_stand: Callable[[str, int, int, int], None] = lambda node_id, passed, failed, disputed: None
        "Hears what this operator found of a node each time it changes (the cluster shares it)."
        self.running: set[asyncio.Task] = set()
        self.on_quarantine: Callable[[Node], None] = lambda node: None
        "Called when a node falls under quarantine_below (its receipts from the open epoch on are disputed)."
        self.counts = {"passed": 0, "failed": 0, "inconclusive": 0, "skipped": 0}
        self.canary_runs = 0
        "Audits made with a canary (a node without a peer), among those counted."
        self.canaries: dict[tuple[str, str], collections.deque] = {}
        "(model key, digest) -> requests and the answer two nodes gave alike: for nodes without a peer."
        self.audit_tokens = 0
        "Tokens the audits' answers cost, all together (apart from the clients' in /metrics)."

    async def open(self) -> None:
        if self.store is not None:
            self.standing = {node_id: Standing(*found) for node_id, found in (await self.store.standings_kept()).items()}
            for node_id, found in self.standing.items():  # the cluster hears it again after a restart
                self.on_stand(node_id, found.passed, found.failed, found.disputed)

    def shared(self, others: dict[str, tuple[int, int, int]]) -> None:
        """What the other operators found of each node: a node is judged on all of it."""
        others_now = {node_id: Standing(*found) for node_id, found in others.items()}
        changed = {node_id for node_id in others_now.keys() | self.others.keys()
                   if others_now.get(node_id) != self.others.get(node_id)}
        self.others = others_now
        for node_id in changed:
            node = self.registry.get(node_id)
            if node is not None:
                self._judge(node)

    def combined(self, node_id: str) -> Standing:
        """What every operator found of the node."""
        own, other = self.of(node_id), self.others.get(node_id)
        if other is None:
            return own
        return Standing(own.passed + other.passed, own.failed + other.failed, own.disputed + other.disputed)

    # --- per job, on the event loop: no I/O ------------------------------------------------------

    def sample(self) -> Optional[Capture]:
        return Capture() if self.rate and self.rng() < self.rate else None

    def of(self, node_id: str) -> Standing:
        standing = self.standing.get(node_id)
        if standing is None:
            standing = self.standing[node_id] = Standing()
        return standing

    def disputed(self, node: Node) -> None:
        self.of(node.node_id).disputed += 1
        self._keep(node.node_id)
        self._judge(node)

    def ended(self, job: Job) -> None:
        capture = job.audit
        if capture is None or job.outcome != "ok" or capture.request is None or job.door == "audit":
            return
        if len(self.running) >= AUDITS_AT_ONCE:
            self.counts["skipped"] += 1
            return
        task = asyncio.ensure_future(self._audit(job, capture))
        self.running.add(task)
        task.add_done_callback(self.running.discard)

    async def aclose(self) -> None:
        for task in list(self.running):
            task.cancel()
        if self.running:
            await asyncio.wait(list(self.running), timeout=2)

    # --- the audit ------------------------------------------------------------------------------

    async def _audit(self, job: Job, capture: Capture) -> None:
        try:
            await self._run_audit(job, capture)
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - an audit that fails says nothing of the node
            log.exception("audit of job %s failed", job.id)
            self.counts["inconclusive"] += 1

    async def _run_audit(self, job: Job, capture: Capture) -> None:
        assert capture.request is not None
        key = model_key(job.model)
        node = self.registry.get(job.node)
        digest = node.digests.get(key) if node is not None else None
        if not digest:
            self.counts["inconclusive"] += 1  # no digest known: no peer can be said to run the same model
            return
        original = words_of(capture.answer)
        answers: dict[str, list[str]] = {job.node: original}
        if self._peers(key, digest, {job.node}) is None:  # no other node runs this model: a canary instead
            await self._canary(job, key, digest)
            return
        for _ in range(2):
            peers = self._peers(key, digest, set(answers))
            if peers is None:
                break
            node_id, words, counted = await self._rerun(job, capture.request, peers)
            if node_id is None:
                break
            answers[node_id] = words
            if len(answers) == 2 and self._same(original, words):
                claimed = job.usage.output_tokens
                if claimed is not None and counted is not None and claimed > counted * PADDING[0] + PADDING[1]:
                    self._failed(job.node, job, f"it counted {claimed} output tokens for an answer of {counted}")
                else:
                    self._passed(job.node)
                    self._record(key, digest, capture.request, original, set(answers))
                return
        if len(answers) < 3:
            self.counts["inconclusive"] += 1
            return
        self._judge_three(job, answers)

    def _record(self, key: str, digest: str, request: tuple[str, str, bytes], words: list[str],
                seen: set[str]) -> None:
        """Two nodes (``seen``) gave this answer to this request: a canary for a node that has no peer
        later, unless it is one of them."""
        canaries = self.canaries.setdefault((key, digest), collections.deque(maxlen=CANARIES))
        canaries.append((request, words, seen))

    async def _canary(self, job: Job, key: str, digest: str) -> None:
        """The node has no peer with its model's digest: ask it a request whose answer two nodes
        gave alike before (recorded from a passed audit), and hold it to that answer."""
        unseen = [c for c in self.canaries.get((key, digest), ()) if job.node not in c[2]]
        if not unseen:  # none recorded yet, or it answered each: a request it saw again would tell it
            self.counts["inconclusive"] += 1
            return
        request, expected, seen = unseen[int(self.rng() * len(unseen)) % len(unseen)]
        seen.add(job.node)  # never asked of it twice
        others = [n.node_id for n in self.registry.nodes() if n.node_id != job.node]
        node_id, words, _ = await self._rerun(job, request, others)
        if node_id != job.node:
            self.counts["inconclusive"] += 1
            return
        self.canary_runs += 1
        if agreement(words, expected, self.tokens) < DISAGREE or _short(words, expected):
            self._failed(job.node, job, "its answer to a canary is not the one two nodes gave")
        else:
            self._passed(job.node)

    def _peers(self, key: str, digest: str, used: set[str]) -> Optional[list[str]]:
        """The node ids NOT to ask: every node without this digest for the model, and those asked."""
        having = [n for n in self.registry.candidates(key) if n.node_id not in used and not n.quarantined]
        same = [n for n in having if n.digests.get(key) == digest]
        if not same:
            return None
        return [n.node_id for n in self.registry.nodes() if n not in same]

    async def _rerun(self, job: Job, request: tuple[str, str, bytes],
                     avoid: list[str]) -> tuple[Optional[str], list[str], Optional[int]]:
        """The auditing node's id, its answer's words, and the output tokens its Ollama counted."""
        method, path, body = request
        audit = Job(door="audit", model=job.model, caller=AUDIT_CALLER)
        audit.audit = Capture()
        try:
            claim, resp = await self.router.open(job.model, method, path, body, audit, avoid=avoid)
        except ODLAError:
            return None, [], None
        if resp.status != 200:
            claim.release()
            return None, [], None
        body_stream = self.router.relay(claim, resp, audit, protocol=path == "/run")
        try:
            async for _ in body_stream:
                pass
        finally:
            await body_stream.aclose()
        self.audit_tokens += audit.usage.output_tokens or audit.delivered
        if audit.outcome != "ok":
            return None, [], None
        return audit.node, words_of(audit.audit.answer), audit.usage.output_tokens

    def _same(self, a: list[str], b: list[str]) -> bool:
        return a[:self.tokens] == b[:self.tokens] and not _short(a, b)

    def _judge_three(self, job: Job, answers: dict[str, list[str]]) -> None:
        ids = list(answers)
        odd = []
        for node_id in ids:
            others = [answers[o] for o in ids if o != node_id]
            mine = answers[node_id]
            if agreement(others[0], others[1], self.tokens) >= AGREE and (
                    all(agreement(mine, other, self.tokens) < DISAGREE for other in others)
                    or all(_short(mine, other) for other in others)):
                odd.append(node_id)
        if not odd:
            self.counts["inconclusive"] += 1
            if job.node in answers:
                self._passed(job.node)  # within drift of the others
            return
        for node_id in odd:
            self._failed(node_id, job, "its answer is not the other nodes'")
        for node_id in ids:
            if node_id not in odd and node_id == job.node:
                self._passed(node_id)

    def _passed(self, node_id: str) -> None:
        self.counts["passed"] += 1
        self.of(node_id).passed += 1
        self._keep(node_id)
        node = self.registry.get(node_id)
        if node is not None:
            self._judge(node)

    def restore(self, node: Node) -> None:
        """A node (re)joined: what was found of its id before still holds."""
        if node.node_id in self.standing or node.node_id in self.others:
            self._judge(node)

    def _failed(self, node_id: str, job: Job, why: str) -> None:
        self.counts["failed"] += 1
        self.of(node_id).failed += 1
        self._keep(node_id)
        log.warning("node %s failed an audit (job %s, model %s): %s", node_id, job.id, job.model, why)
        node = self.registry.get(node_id)
        if node is not None:
            self._judge(node)

    def _keep(self, node_id: str) -> None:
        found = self.standing[node_id]
        if self.store is not None:
            self.store.stand(node_id, found.passed, found.failed, found.disputed)
        self.on_stand(node_id, found.passed, found.failed, found.disputed)

    def _judge(self, node: Node) -> None:
        standing = node.standing = self.combined(node.node_id)
        node.rate()
        if not node.quarantined and node.reputation < self.quarantine_below:
            node.quarantined = True
            log.warning("node %s is quarantined: reputation %.2f (%d audits passed, %d failed, %d receipts "
                        "disputed) is under quarantine_below %.2f", node.node_id, node.reputation, standing.passed,
                        standing.failed, standing.disputed, self.quarantine_below)
            self.on_quarantine(node)


def _short(a: list[str], b: list[str]) -> bool:
    """``a`` stopped well short of ``b`` (the same seed, so the same length is due)."""
    return len(b) > 0 and len(a) < SHORT * len(b)
