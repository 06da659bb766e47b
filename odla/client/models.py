"""The client's model management: ``pull`` with a progress bar as ``ollama pull`` draws it, ``rm``, ``cp``."""

from __future__ import annotations

import json
import sys
from typing import Iterator, Optional, TextIO

import httpx

from odla.client.calls import refused, unreachable
from odla.client.errors import Failure


def placement(replicas: Optional[str], nodes: list[str]) -> dict[str, str]:
    """The headers that say where: ``X-ODLA-Replicas`` (a count or ``all``) or ``X-ODLA-Nodes``."""
    if replicas and nodes:
        raise Failure("give --replicas or --node, not both")
    if nodes:
        return {"x-odla-nodes": ",".join(nodes)}
    return {"x-odla-replicas": replicas} if replicas else {}


def pulled(http: httpx.Client, operator: str, model: str, headers: dict[str, str]) -> Iterator[dict]:
    """The pull's progress lines as the operator sends them; its error line as a ``Failure``."""
    try:
        with http.stream("POST", "/api/pull", json={"model": model, "stream": True}, headers=headers) as resp:
            if resp.status_code != 200:
                raise refused(resp, operator)
            for line in resp.iter_lines():
                if not line.strip():
                    continue
                part = json.loads(line)
                if "error" in part:
                    raise Failure(str(part["error"]))
                yield part
    except httpx.HTTPError as exc:
        raise unreachable(operator, exc) from exc
    except ValueError:
        raise Failure(f"{operator} sent a progress line that is not JSON") from None


class Progress:
    """Each status on a line of its own; a layer's download as one line redrawn in place on a
    terminal (``pulling 6a0746a1ec1a:  45% ▕█████      ▏ 2.1 GB/4.7 GB``), its last state elsewhere."""

    WIDTH = 24

    def __init__(self, out: Optional[TextIO] = None) -> None:
        self.out = out = out if out is not None else sys.stderr
        self.live = out.isatty()
        self.drawing: Optional[str] = None
        self.last: dict[str, str] = {}

    def show(self, part: dict) -> None:
        status = str(part.get("status", ""))
        total, done = part.get("total"), part.get("completed") or 0
        if isinstance(total, int) and total > 0:
            share = min(1.0, done / total)
            bar = "█" * int(share * self.WIDTH)
            text = f"{status}: {share:4.0%} ▕{bar:<{self.WIDTH}}▏ {_size(done)}/{_size(total)}"
            if self.live:
                self.out.write(("\r" if self.drawing == status else ("\n" if self.drawing else "")) + text)
                self.drawing = status
            else:
                self.last[status] = text
            return
        self._end_drawing()
        for text in self.last.values():
            self.out.write(text + "\n")
        self.last.clear()
        self.out.write(status + "\n")
        self.out.flush()

    def _end_drawing(self) -> None:
        if self.drawing is not None:
            self.out.write("\n")
            self.drawing = None


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
