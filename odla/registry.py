"""The operator's in-memory registry of nodes: register, pick round-robin, prune.

Pure and synchronous: the clock is injected, so tests move time by hand.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Iterable, Optional

from .names import model_key
from .protocol import NodeInfo

Clock = Callable[[], float]


@dataclass
class Node:
    """What the operator knows about one node."""

    node_id: str
    url: str
    models: list[str]
    last_seen: float
    healthy: bool = True
    active_jobs: int = 0
    jobs_total: int = 0
    keys: frozenset[str] = field(default_factory=frozenset)

    def info(self) -> NodeInfo:
        seen = datetime.fromtimestamp(self.last_seen, tz=timezone.utc)
        return NodeInfo(
            node_id=self.node_id,
            url=self.url,
            models=list(self.models),
            last_seen=seen.isoformat(timespec="seconds").replace("+00:00", "Z"),
            healthy=self.healthy,
            active_jobs=self.active_jobs,
            jobs_total=self.jobs_total,
        )


class Registry:
    """Nodes by id, with one round-robin cursor per model."""

    def __init__(self, *, prune_after: float, clock: Clock = time.time) -> None:
        self.prune_after = prune_after
        self.clock = clock
        self._nodes: dict[str, Node] = {}
        self._cursors: dict[str, itertools.count] = {}

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> Optional[Node]:
        return self._nodes.get(node_id)

    def nodes(self) -> list[Node]:
        return list(self._nodes.values())

    def register(self, node_id: str, url: str, models: Iterable[str], *, healthy: bool = True) -> Node:
        """Add a node, or update the one with this id (never a second row)."""
        models = list(dict.fromkeys(models))
        node = self._nodes.get(node_id)
        if node is None:
            node = self._nodes[node_id] = Node(node_id, url, models, self.clock())
        node.url, node.last_seen, node.healthy = url, self.clock(), healthy
        self.set_models(node, models)
        return node

    def set_models(self, node: Node, models: list[str]) -> None:
        node.models = models
        node.keys = frozenset(model_key(m) for m in models)

    def remove(self, node_id: str) -> bool:
        return self._nodes.pop(node_id, None) is not None

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

    def candidates(self, model: str) -> list[Node]:
        """Healthy nodes with ``model``, rotated one step further on each call."""
        key = model_key(model)
        nodes = [n for n in self._nodes.values() if n.healthy and key in n.keys]
        if not nodes:
            return []
        cursor = self._cursors.setdefault(key, itertools.count())
        start = next(cursor) % len(nodes)
        return nodes[start:] + nodes[:start]

    def prune(self) -> list[str]:
        """Drop nodes not seen for ``prune_after`` seconds; returns their ids."""
        cutoff = self.clock() - self.prune_after
        gone = [n.node_id for n in self._nodes.values() if n.last_seen < cutoff]
        for node_id in gone:
            del self._nodes[node_id]
        return gone
