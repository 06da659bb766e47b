"""The operator's routing and stream relay: pick a node, fail over, pass its bytes on.

The relay does not decode tokens: the node already speaks the protocol, so its
bytes go to the client as they arrive, several lines per send when they come
together. Only the last line is looked at, to make sure every stream ends with
exactly one final line.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import AsyncIterator, Callable, Optional

from . import protocol as p
from .auth import join_headers
from .errors import NoNodeError, ODLAError, UpstreamError
from .registry import Node, Registry
from .upstream import Pool, Response
from .upstream import UpstreamError as Unreachable

log = logging.getLogger("odla.operator")
RETRY_ELSEWHERE = {401, 403, 404, 408, 429}  # and every 5xx: another node may well take the job


class Router:
    """Round-robin with failover before the first byte."""

    def __init__(self, registry: Registry, pool: Pool, join_token: Optional[str] = None,
                 on_failure: Optional[Callable[[Node], None]] = None) -> None:
        self.registry = registry
        self.pool = pool
        self.headers = [("content-type", "application/json"), *join_headers(join_token).items()]
        self.on_failure = on_failure or (lambda node: None)

    async def open_job(self, model: str, prompt: str) -> tuple[Node, Response]:
        """Open a ``/run`` stream on the first node that accepts the job."""
        body = p.RunRequest(job_id=uuid.uuid4().hex, model=model, prompt=prompt).model_dump_json().encode()
        node, resp = await self.open(model, "POST", "/run", body)
        if resp.status_code != 200:
            raise ODLAError(await _error_message(resp), resp.status_code)  # the request itself is at fault
        return node, resp

    async def open(self, model: str, method: str, path: str, body: bytes) -> tuple[Node, Response]:
        """Send the request to the first node with ``model`` that takes it.

        A node that cannot be reached, or answers 401/403/404/408/429 or 5xx, is skipped;
        any other answer (200, or the request's own fault such as 400) is returned.
        """
        nodes = self.registry.candidates(model)
        if not nodes:
            raise NoNodeError(model)
        failures: list[tuple[Node, int, str]] = []
        for node in nodes:
            resp = await self._try(node, method, path, body, failures)
            if resp is not None:
                return node, resp
        raise self._all_failed(model, failures)

    async def _try(self, node: Node, method: str, path: str, body: bytes, failures: list) -> Optional[Response]:
        try:
            resp = await self.pool.request(method, f"{node.url}{path}", body, self.headers)
        except Unreachable as exc:
            log.warning("node %s unreachable (%s); trying the next one", node.node_id, exc)
            self._failed(node)
            failures.append((node, 503, "not reachable"))
            return None
        if resp.status_code not in RETRY_ELSEWHERE and resp.status_code < 500:
            return resp
        message = await _error_message(resp)
        log.warning("node %s refused the job (%d: %s); trying the next one", node.node_id,
                    resp.status_code, message)
        failures.append((node, resp.status_code, message))
        return None

    @staticmethod
    def _all_failed(model: str, failures: list[tuple[Node, int, str]]) -> ODLAError:
        statuses = {status for _, status, _ in failures}
        if statuses == {404}:
            return NoNodeError(model)
        reasons = "; ".join(f"{node.node_id}: {message}" for node, _, message in failures)
        status = 503 if statuses <= {503, 429, 408} else 502
        return UpstreamError(f"no node could run model {model} ({reasons})", status)

    def _failed(self, node: Node) -> None:
        self.registry.mark_failed(node.node_id)
        self.on_failure(node)

    async def relay(self, node: Node, resp: Response,
                    broken: Callable[[str], bytes] = p.error_line, check_final: bool = True) -> AsyncIterator[bytes]:
        """The node's stream, byte for byte, ended with ``broken(message)`` if it broke off.

        With ``check_final`` (ODLA's own protocol), a stream that ends without its final
        line counts as broken too.
        """
        node.active_jobs += 1
        node.jobs_total += 1
        tail = b""  # the stream's last (maybe partial) line
        try:
            async for chunk in resp:
                yield chunk
                tail = _last_line(tail, chunk)
            if check_final and not p.is_final(tail):
                yield _newline(tail) + broken(f"node {node.node_id} ended the stream without a final line")
        except Unreachable as exc:
            log.warning("node %s failed mid-stream (%s)", node.node_id, exc)
            self._failed(node)
            yield _newline(tail) + broken(f"node {node.node_id} failed mid-stream: connection lost")
        finally:
            node.active_jobs -= 1
            await resp.aclose()  # a client that left cancels the job at the node


def _newline(tail: bytes) -> bytes:
    return b"\n" if tail and not tail.endswith(b"\n") else b""


def _last_line(tail: bytes, chunk: bytes) -> bytes:
    buf = tail + chunk if not tail.endswith(b"\n") else chunk
    cut = buf.rfind(b"\n", 0, len(buf) - 1)
    return buf[cut + 1:] if cut >= 0 else buf


async def _error_message(resp: Response) -> str:
    try:
        return str(json.loads(await resp.read()).get("error") or f"HTTP {resp.status_code}")
    except (ValueError, AttributeError, Unreachable):
        return f"HTTP {resp.status_code}"
    finally:
        await resp.aclose()
