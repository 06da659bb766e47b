"""Managing models across the network: pull, remove and copy them from the operator, in Ollama's shapes.

    lines = Pull(router, model, targets, wanted, spare).lines()   # Ollama's progress, every node's bytes added up
    await remove(router, model, nodes) ; await copy(router, source, destination, nodes)

A pull goes to ``replicas`` nodes (``default_replicas``; ``X-ODLA-Replicas: N`` or ``all``), or to
the nodes ``X-ODLA-Nodes`` names. It is placed on healthy nodes that lack the model, the least busy
and roomiest first. A node says how much disk is free where its Ollama keeps models. A pull whose
layers would not fit there is stopped as soon as Ollama says their sizes. A node that fails
mid-pull (an error line, its connection lost, no room) is reported. Another node takes its place
while one is left. The client reads Ollama's own progress lines:

    {"status": "pulling manifest"}
    {"status": "pulling 6a0746a1ec1a", "digest": "sha256:…", "total": 3 × 4.7 GB, "completed": …}
    {"status": "verifying sha256 digest"} {"status": "writing manifest"} {"status": "success"}

so that ``ollama.pull(…, stream=True)``, ollama-js and Open WebUI show it as one download. The
operator holds no model bytes: only the nodes' progress lines pass through it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, AsyncIterator, Callable, Optional, Sequence

import anyio

from odla.core.errors import NodeUnreachable, ODLAError, message_of
from odla.core.names import model_key
from odla.operator.registry import Node, Registry
from odla.operator.resume import Failed, Units

if TYPE_CHECKING:
    from odla.operator.relay import Router

log = logging.getLogger("odla.operator")
Signer = Callable[[str, str, bytes], dict[str, str]]
"Signs a request to a node as this operator's (``odla.proofs.reports.signed_request``): what a node takes only from it."

REPLICAS_HEADER, NODES_HEADER = "x-odla-replicas", "x-odla-nodes"
MAX_PULL_LINE = 1 << 16
"The longest progress line a node may send (Ollama's are some 150 bytes)."
CHANGE_HOLDS_S = 30.0
"""How long a change this operator made to a node's models holds against the node's reports: one
begun before it (a listing of Ollama's models takes up to ``health_check_timeout``, then the report's
way here) arrives well within this. A change made by hand on the node in that time shows after it."""


def targets(registry: Registry, model: str, wanted: Optional[int], named: Sequence[str] = ()
            ) -> tuple[list[Node], list[Node], int]:
    """Where a pull of ``model`` goes: (the nodes to pull on now, the ones that may take a failed
    node's place, how many must succeed). ``wanted`` None: every node; ``named``: exactly those.
    ``ODLAError`` when it cannot be placed."""
    now = registry.clock()
    usable = [n for n in registry.nodes() if n.healthy and not n.quarantined and not n.resting(now)]
    if named:
        known = {n.node_id: n for n in usable}
        missing = [node_id for node_id in named if node_id not in known]
        if missing:
            raise ODLAError(f"no healthy node {', '.join(missing)} (X-ODLA-Nodes)", 404)
        chosen = [known[node_id] for node_id in dict.fromkeys(named)]
        return chosen, [], len(chosen)
    if not usable:
        raise ODLAError("no healthy node has joined the network", 503)
    key = model_key(model)
    having = [n for n in usable if key in n.keys]
    lacking = sorted((n for n in usable if key not in n.keys), key=_placing)
    if wanted is None:
        return [*having, *lacking], [], len(having) + len(lacking)
    if wanted > len(usable):
        raise ODLAError(f"{wanted} replicas asked, and {len(usable)} healthy node(s) can take one", 409)
    if len(having) >= wanted:  # there already: each is brought up to date, as Ollama's pull does
        return having[:wanted], lacking, wanted
    more = wanted - len(having)
    return [*having, *lacking[:more]], lacking[more:], wanted


def _placing(node: Node) -> tuple[int, int, str]:
    """Least busy first, then the roomiest by whole GiB (nodes on one disk report it a few bytes
    apart as files come and go: they are equals), then by name."""
    return node.active_jobs, -((node.disk_free or 0) >> 30), node.node_id


def wanted_of(header: Optional[str], default: int) -> Optional[int]:
    """``X-ODLA-Replicas``: a count, or ``all`` (None)."""
    if header is None:
        return default
    if header.strip().lower() == "all":
        return None
    try:
        value = int(header)
    except ValueError:
        raise ODLAError(f"X-ODLA-Replicas must be a count or 'all', not {header[:40]!r}", 400) from None
    if not 1 <= value <= 4096:
        raise ODLAError("X-ODLA-Replicas must be between 1 and 4096", 400)
    return value


def named_of(header: Optional[str]) -> list[str]:
    return [part.strip() for part in (header or "").split(",") if part.strip()][:4096]


@dataclass
class _Progress:
    """One node's pull as far as it has gone."""

    node: Node
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    "Digest -> (total, completed) bytes."
    done: bool = False
    error: Optional[str] = None


class Pull:
    """One pull across nodes, as one stream of Ollama's progress lines."""

    def __init__(self, router: "Router", model: str, insecure: bool, nodes: list[Node], spare: list[Node],
                 wanted: int, sign: Signer = lambda method, path, body: {}) -> None:
        self.router, self.model, self.insecure, self.sign = router, model, insecure, sign
        self.spare, self.wanted = list(spare), wanted
        self.progress: dict[str, _Progress] = {}
        self.events: asyncio.Queue[Optional[str]] = asyncio.Queue()
        self.tasks: set[asyncio.Task] = set()
        self.order: list[str] = []
        "The layers' digests in the order they were first seen."
        self.running = 0
        "Nodes whose pull has not ended (each ends with its node id in ``events``)."
        for node in nodes:
            self._start(node)

    def _start(self, node: Node) -> None:
        self.running += 1
        self.progress[node.node_id] = _Progress(node)
        task = asyncio.ensure_future(self._one(self.progress[node.node_id]))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _one(self, state: _Progress) -> None:
        node = state.node
        request = json.dumps({"model": self.model, "insecure": self.insecure, "stream": True}).encode()
        try:
            resp = await self.router.nodes.send(node, "POST", "/ollama/api/pull", request,
                                                signed=self.sign("POST", "/ollama/api/pull", request))
            try:
                if resp.status != 200:
                    state.error = message_of(await self.router.nodes.read(resp), resp.status)
                    return
                body = self.router.nodes.body(resp)
                try:
                    await self._read(state, body)
                finally:
                    await body.aclose()  # before its end: the node's pull stops
            except BaseException:
                resp.close()
                raise
        except NodeUnreachable as exc:
            state.error = f"connection lost ({exc})"
        except Exception as exc:  # noqa: BLE001 - one node's odd answer is its failure, not the pull's
            log.warning("pull of %s on node %s failed unexpectedly", self.model, node.node_id, exc_info=True)
            state.error = str(exc) or type(exc).__name__
        finally:
            if state.error is not None:
                log.warning("pull of %s on node %s failed: %s", self.model, node.node_id, state.error)
            self.events.put_nowait(node.node_id)

    async def _read(self, state: _Progress, body: AsyncIterator[bytes]) -> None:
        units = Units(b"\n", MAX_PULL_LINE)  # whole lines; the error line a node ends with, apart
        async for chunk in body:
            try:
                lines = units.take(chunk)
            except Failed:
                state.error = "the node sent a progress line too long to be one"
                return
            for line in lines.split(b"\n"):
                if not line.strip():
                    continue
                try:
                    part = json.loads(line)
                except ValueError:
                    state.error = "the node sent a line that is not JSON"
                    return
                if not isinstance(part, dict):
                    continue
                digest, total, completed = part.get("digest"), part.get("total"), part.get("completed")
                if isinstance(digest, str) and isinstance(total, int):
                    if digest not in self.order:
                        self.order.append(digest)
                    state.layers[digest] = (total, completed if isinstance(completed, int) else 0)
                    free = state.node.disk_free
                    if free is not None and sum(t for t, _ in state.layers.values()) > free:
                        state.error = (f"{state.node.node_id} has {free / 1e9:.1f} GB free, and the model needs "
                                       f"{sum(t for t, _ in state.layers.values()) / 1e9:.1f} GB or more")
                        return
                    self.events.put_nowait(None)
                if part.get("status") == "success":
                    state.done = True
                    return
            if units.error:
                state.error = message_of(units.error, 500)[:2000]
                return
        if not state.done:
            state.error = "the node ended the pull without success"

    async def lines(self) -> AsyncIterator[bytes]:
        """Ollama's progress lines for the whole pull, then ``success`` or the error it ended with."""
        try:
            yield _line({"status": "pulling manifest"})
            while self.running:
                events = [await self.events.get()]
                while not self.events.empty():  # a burst of progress: one line for all of it
                    events.append(self.events.get_nowait())
                for node_id in events:
                    if node_id is None:
                        continue
                    self.running -= 1
                    state = self.progress[node_id]
                    if state.error is None:
                        await refreshed(self.router, state.node, added=[self.model])
                        continue
                    replaced = self._replace(state)
                    yield _line({"status": f"node {node_id} failed: {state.error}"
                                           + (f"; pulling on {replaced} instead" if replaced else "")})
                for digest in self.order:
                    layers = [p.layers[digest] for p in self.progress.values() if not p.error and digest in p.layers]
                    if layers:
                        yield _line({"status": f"pulling {digest[7:19]}", "digest": digest,
                                     "total": sum(t for t, _ in layers), "completed": sum(c for _, c in layers)})
            succeeded = [p for p in self.progress.values() if p.done]
            if len(succeeded) < self.wanted:
                errors = {p.error for p in self.progress.values() if p.error}
                message = errors.pop() if len(errors) == 1 and not succeeded else (
                    f"pulled on {len(succeeded)} of {self.wanted} node(s): " + "; ".join(
                        f"{p.node.node_id}: {p.error}" for p in self.progress.values() if p.error))
                yield _line({"error": message})
                return
            yield _line({"status": "verifying sha256 digest"})
            yield _line({"status": "writing manifest"})
            yield _line({"status": "success"})
        finally:
            for task in list(self.tasks):  # the client left: every node's pull stops
                task.cancel()
            if self.tasks:
                with anyio.CancelScope(shield=True):  # the client left: each node's pull has stopped before the answer ends
                    await asyncio.wait(list(self.tasks))

    def _replace(self, failed: _Progress) -> Optional[str]:
        """Another node takes a failed one's place, when one is left (not for a name no registry has)."""
        if "file does not exist" in (failed.error or "") or not self.spare:
            return None
        node = self.spare.pop(0)
        self._start(node)
        return node.node_id

async def refreshed(router: "Router", node: Node, added: Sequence[str] = (), removed: Sequence[str] = ()) -> None:
    """The node's models changed: jobs for a model it has now go there at once. The change holds
    against reports for ``CHANGE_HOLDS_S`` (one sent before it may arrive after it). A node over HTTP
    is also asked for its models; one that dialled in says them with its next status."""
    router.registry.changed(node, CHANGE_HOLDS_S, added, removed)
    if not node.dialled:
        try:
            status, health = await router.nodes.health(node)
        except (NodeUnreachable, ValueError):
            return
        router.registry.seen(node.node_id, healthy=status == 200 and health.status == "healthy",
                             models=health.models)
    router.scheduler.wake()


def _line(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


async def fan_out(router: "Router", nodes: list[Node], method: str, path: str, body: bytes,
                  sign: Signer = lambda method, path, body: {}, added: Sequence[str] = (),
                  removed: Sequence[str] = ()) -> dict[str, tuple[int, str]]:
    """The same request to each node's Ollama, at once: node id -> (status, message). Where it
    worked, the node has ``added`` models and no longer ``removed`` ones."""
    async def one(node: Node) -> tuple[int, str]:
        try:
            resp = await router.nodes.send(node, method, "/ollama" + path, body,
                                           signed=sign(method, "/ollama" + path, body))
            data = await router.nodes.read(resp)
        except NodeUnreachable as exc:
            return 503, f"not reachable ({exc})"
        return resp.status, message_of(data, resp.status) if resp.status != 200 else ""

    answers = await asyncio.gather(*(one(n) for n in nodes))
    await asyncio.gather(*(refreshed(router, n, added, removed) for n, (status, _) in zip(nodes, answers)
                           if status == 200))
    return {n.node_id: a for n, a in zip(nodes, answers)}
