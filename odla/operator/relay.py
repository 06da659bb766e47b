"""The operator's routing and stream relay: pick a node, fail over, pass its bytes on.

The relay does not decode tokens: the node already speaks the protocol, so its
bytes go to the client as they arrive, several lines per send when they come
together. Only the last line is looked at: to make sure an ODLA stream ends with
exactly one final line, and to take off it the counts the node adds for the job's receipt.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import time
from typing import Any, AsyncIterator, Callable, Mapping, Optional, Sequence

from odla.core import protocol as p
from odla.core.errors import NoNodeError, ODLAError, UpstreamError, message_of
from odla.serving.jobs import Job
from odla.operator.nodes import Body, ClientResponse, NodeClient, NodeUnreachable
from odla.core.names import Prompt, listed, model_key, output_limit, prompt_of
from odla.operator.registry import LOADED_LATE_S, Node, Registry
from odla.serving.responses import Opened, Owned, StreamBroken, Tell
from odla.operator.countersign import AUDIT_CALLER
from odla.operator.forecast import Prediction
from odla.operator.resume import OPT_OUT, Failed, Leg, Plan, Resumed, Watch, plan_for
from odla.operator.scheduler import Claim, Place, Scheduler
from odla.core.usage import Tail, Usage, door_tokens, without_usage
from odla.proofs.receipts import sha256_hex

WARM_FOR_S = 300  # Ollama's default keep_alive: a model that answered stays loaded this long

log = logging.getLogger("odla.operator")
RETRY_ELSEWHERE = {401, 403, 404, 408, 429}  # and every 5xx: another node may well take the job
MAX_TRIES = 8
"Nodes one job is sent to at most: past it the job fails, rather than walk a registry of dead nodes."


class Router:
    """The scheduler's pick, failover before the first byte; every job's stream tracked per node."""

    def __init__(self, registry: Registry, nodes: NodeClient, scheduler: Scheduler,
                 on_failure: Optional[Callable[[Node], None]] = None) -> None:
        self.registry = registry
        self.nodes = nodes
        self.scheduler = scheduler
        self.on_failure = on_failure or (lambda node: None)
        self.streams: dict[str, set[ClientResponse]] = {}
        self.closing = False
        self.purse: Any = None
        "With ``settlement``: holds each job's worst case against its client's balance (``odla.settlement.purse``)."
        self.audit_seed = False
        "Give every job a seed unless it set one (``audit_seed``: ``odla.operator.audits``)."
        self.resume, self.resume_attempts, self.stall_timeout = "off", 0, 30.0
        "Whether, how often and when answers are resumed on another node (``odla.operator.resume``)."

    def plan(self, path: str, body: Any, headers: Mapping[str, str] = {}) -> Optional[Plan]:
        """How the job at ``path`` would be resumed, by the operator's settings; None: it would not."""
        return plan_for(path, body, self.resume, self.resume_attempts, self.stall_timeout, headers)

    def close(self) -> None:
        """The operator is stopping: waiting jobs are refused and running ones end now, each with a
        last line saying why (rather than being cut when uvicorn's graceful wait runs out)."""
        self.closing = True
        self.scheduler.close(ODLAError("the operator is shutting down", 503))
        for node_id in list(self.streams):
            self.abort(node_id)

    async def open_job(self, request: p.InferenceRequest, job: Job, tell: Optional[Tell] = None) -> Opened:
        """Open a ``/run`` stream on the node the scheduler picks; ``tell`` hears a queued job's place."""
        # already validated as an InferenceRequest: built without validating it again
        fields = request.ollama_fields()
        plan = self.plan("/inference", {"model": request.model, "prompt": request.prompt, **fields})
        if plan is not None:  # seeded, so that its rest on another node goes on alike
            fields = {k: v for k, v in plan.request.items() if k in p.OLLAMA_FIELDS}
        elif OPT_OUT in (fields.get("options") or {}):  # ODLA's option, not Ollama's
            fields["options"] = {k: v for k, v in fields["options"].items() if k != OPT_OUT}
        if self.audit_seed and (fields.get("options") or {}).get("seed") is None:  # so that an audit can match
            fields["options"] = {**(fields.get("options") or {}), "seed": random.getrandbits(31)}
        run = p.RunRequest.model_construct(job_id=job.id, model=request.model, prompt=request.prompt, **fields)
        body = run.model_dump_json(exclude_none=True).encode()
        place = (lambda n: tell(p.queued_line(n))) if tell is not None else None
        limit = output_limit((request.options or {}).get("num_predict"))
        prompt = prompt_of({"prompt": request.prompt, "system": request.system})
        claim, resp = await self.open(request.model, "POST", "/run", body, job, place, limit, prompt)
        if resp.status != 200:  # the request itself is at fault
            claim.release()
            raise ODLAError(message_of(await self.nodes.read(resp), resp.status), resp.status)
        body = Resumed(self, plan, job).body(claim, resp) if plan is not None else self.relay(claim, resp, job=job)
        return Opened(body, headers={"x-odla-node": claim.node.node_id}, gathered=True)

    async def open(self, model: str, method: str, path: str, body: bytes, job: Job,
                   place: Optional[Place] = None, tokens: Optional[int] = None,
                   prompt: Prompt = Prompt(), avoid: Sequence[str] = (), run_id: Optional[str] = None
                   ) -> tuple[Claim, ClientResponse]:
        """Send the request to the node the scheduler picks, the next one if it does not take it
        (``tokens``: the most the job asked for, the length the scheduler plans for; ``prompt``: its
        length and conversation, for the prompt it reads; ``run_id``: the id the node is told, which
        its receipt names, when not the job's: a resumed answer's later leg's).

        A node that cannot be reached, or answers 401/403/404/408/429 or 5xx, is skipped (at
        most ``MAX_TRIES`` nodes are tried);
        any other answer (200, or the request's own fault such as 400) is returned with the
        claim on the node's slot, which the caller releases (``relay`` does).
        """
        if self.purse is not None and job.caller != AUDIT_CALLER:  # 402 before any node works on it
            await self.purse.hold(job, model, prompt.tokens, tokens)
        failures: list[tuple[Node, int, str]] = []
        while True:
            if len(failures) >= MAX_TRIES:
                raise self._all_failed(model, failures)
            claim = await self.scheduler.claim(model, job.caller, [*avoid, *(node.node_id for node, _, _ in failures)],
                                               place,
                                               job.id, tokens=tokens, prompt=prompt)
            if claim is None:
                raise self._all_failed(model, failures) if failures else self.no_node(model)
            if claim.waited:
                job.queue_wait = (job.queue_wait or 0.0) + claim.waited
            if job.prediction is None and claim.prediction is not None:  # its first pick's
                job.prediction = predicted(claim.node.node_id, claim.prediction)
            resp = None
            node, key = claim.node, claim.key
            now = self.registry.clock()
            if not node.warm(key, now):  # this job loads it: the jobs sent meanwhile wait for the load too
                node.load_began[key] = now
            making_room = node.needs_room(key, now)
            if making_room:  # until Ollama has loaded it, the node's other models get no new jobs
                node.loading[key] = node.loading.get(key, 0) + 1
            try:
                resp = await self._try(node, method, path, body, failures, run_id or job.id)
            finally:
                if making_room:
                    node.loading[key] -= 1
                    if not node.loading[key]:
                        del node.loading[key]
                        self.scheduler.wake()  # jobs of its other models may start there again
                if resp is None:  # refused, unreachable, or the client left
                    claim.release()
            if resp is not None:
                job.node, job.failovers = claim.node.node_id, len(failures)
                job.node_address, job.request_hash = claim.node.address, sha256_hex(body)
                if job.audit is not None:
                    job.audit.request = (method, path, body)
                job.limited, job.conversation = tokens is not None, prompt.conversation
                return claim, resp

    async def _try(self, node: Node, method: str, path: str, body: bytes,
                   failures: list, job_id: str = "") -> Optional[ClientResponse]:
        try:
            resp = await self.nodes.send(node, method, path, body, job_id)
        except NodeUnreachable as exc:
            log.warning("node %s unreachable (%s); trying the next one", node.node_id, exc)
            self.failed(node)
            failures.append((node, 503, "not reachable"))
            return None
        if resp.status == 200 or 400 <= resp.status < 500 and resp.status not in RETRY_ELSEWHERE:
            return resp  # an answer, or the request's own fault; 1xx, 204, 3xx or 5xx: the node's
        node.outcome(False, self.registry.clock())
        try:
            message = message_of(await self.nodes.read(resp), resp.status)
        except NodeUnreachable:
            message = f"HTTP {resp.status}"
        log.warning("node %s refused the job (%d: %s); trying the next one", node.node_id, resp.status, message)
        failures.append((node, resp.status, message))
        return None

    async def ask(self, model: str, method: str, path: str, body: bytes) -> Opened:
        """A question about ``model`` that runs nothing (``/api/show``): to a healthy node that has
        it, warm and idle ones first, the next one if it does not answer; no slot is taken, so it
        never waits behind the jobs (clients such as Open WebUI ask it often)."""
        key, now = model_key(model), self.registry.clock()
        nodes = sorted(self.registry.candidates(model), key=lambda n: (n.resting(now), not n.warm(key, now),
                                                                       not n.free(key)))
        failures: list[tuple[Node, int, str]] = []
        for node in nodes[:MAX_TRIES]:
            resp = await self._try(node, method, path, body, failures)
            if resp is not None:
                media = resp.headers.get("content-type", "application/json")
                answer = self.nodes.body(resp)
                return Opened(Owned(_passed_on(answer), answer.aclose), resp.status, media,
                              {"x-odla-node": node.node_id})
        raise self._all_failed(model, failures) if failures else self.no_node(model)

    def no_node(self, model: str) -> NoNodeError:
        """Why no node could take the job, in the user's terms."""
        key, now = model_key(model), self.registry.clock()
        having = [n for n in self.registry.nodes() if key in n.keys]
        if having:
            states = ", ".join(f"{n.node_id} {'quarantined' if n.quarantined else 'resting' if n.resting(now) else 'unhealthy'}"
                               for n in having)
            return NoNodeError(model, f"{len(having)} node(s) have it, none can take jobs now: {states}")
        models = sorted({m for n in self.registry.nodes() if n.healthy for m in n.models})
        if not models:
            return NoNodeError(model, "no healthy node has joined the network")
        return NoNodeError(model, f"the network has {listed(models, 20)}")

    @staticmethod
    def _all_failed(model: str, failures: list[tuple[Node, int, str]]) -> ODLAError:
        statuses = {status for _, status, _ in failures}
        if statuses == {404}:
            return NoNodeError(model)
        reasons = "; ".join(f"{node.node_id}: {message}" for node, _, message in failures)
        status = 503 if statuses <= {503, 429, 408} else 502
        return UpstreamError(f"no node could run model {model} ({reasons})", status)

    def failed(self, node: Node) -> None:
        """The node did not answer: no new jobs until a health check passes, and a check soon."""
        node.outcome(False, self.registry.clock())
        self.registry.mark_failed(node.node_id)
        self.on_failure(node)

    def abort(self, node_id: str) -> int:
        """Cut every stream from a node that no longer answers; each ends with an error line."""
        streams = self.streams.get(node_id, ())
        for resp in list(streams):
            resp.close()
        return len(streams)

    def relay(self, claim: Claim, resp: ClientResponse, job: Job, protocol: bool = True,
              leg: Optional[Leg] = None) -> Owned:
        """The node's body as it arrives; raises ``StreamBroken`` if it broke off. The result owns
        the claim and the node's response: its ``aclose()`` releases both, streamed or not.

        With ``protocol`` (ODLA's JSON lines, from ``/run``): whole lines only (the start of
        a line waits for its end), the node's final line without its ``stats`` (they go to
        the job), and a stream that ends without a final line counts as broken. Otherwise (a
        door: Ollama's own answer) byte for byte, its end read for Ollama's counts and for
        an error it ended with. Either way the job ends (``ok`` or ``node_error``) once its
        last line has gone to the client, and counts the tokens it delivered.

        With ``leg`` (a resumable answer's, ``odla.operator.resume``): whole lines (events) only on
        every door; a failure (the connection lost, an error line, which is held back, a stream
        that ends early or says nothing for ``stall_timeout``) raises ``Failed``; and the job is not
        ended here, but by the answer that may go on on another node.
        """
        node = claim.node
        now = self.registry.clock()
        node.use(claim.key, now + WARM_FOR_S, now)  # Ollama has the model now
        streams = self.streams.setdefault(node.node_id, set())
        streams.add(resp)
        body = self.nodes.body(resp)
        if leg is not None:
            leg.watch = Watch(leg.plan.stall, resp.close)
        return Owned(self._relay(claim, body, job, protocol, leg), claim.release, lambda: streams.discard(resp),
                     body.aclose)  # closing the node's response tells it to stop: a client that left cancels the job

    async def _relay(self, claim: Claim, body: Body, job: Job, protocol: bool,
                     leg: Optional[Leg] = None) -> AsyncIterator[bytes]:
        node = claim.node
        lines = _Lines(job) if protocol else None
        tail = Tail() if not protocol else None
        units = leg.units if leg is not None and not protocol else None
        hide_usage = units is not None and leg is not None and leg.plan.hides_usage  # (whole events)
        watch = leg.watch if leg is not None else None
        out = hashlib.sha256()  # the node's answer as it sent it, which its receipt must name
        ended = answered = False
        try:
            async for chunk in body:
                out.update(chunk)
                if watch is not None:
                    watch.heard()
                if job.audit is not None:
                    job.audit.add(chunk)
                if lines is not None:
                    chunk = lines.take(chunk)
                    if not chunk:
                        if watch is not None:
                            watch.asking()
                        continue
                    if lines.ended:  # Ollama is done: the slot is free before the client hears so (it may
                        claim.release()  # ask again at once, and must find it free)
                        if leg is not None and job.error is not None:  # failed: its error line is held back
                            if lines.start:
                                yield chunk[:lines.start]
                            node.outcome(False, self.registry.clock())
                            raise Failed(f"node {node.node_id} failed mid-answer: {job.error}", chunk[lines.start:])
                else:
                    if units is not None:
                        chunk = units.take(chunk)
                        if units.error:
                            if chunk:  # the tokens before the error line
                                job.delivered += door_tokens(chunk)
                                job.first()
                                yield chunk
                            node.outcome(False, self.registry.clock())
                            message = message_of(units.error.removeprefix(b"data: "), 502)
                            raise Failed(f"node {node.node_id} failed mid-answer: {message}", units.error)
                        if not chunk:
                            if watch is not None:
                                watch.asking()
                            continue
                    tail.add(chunk)
                    job.delivered += door_tokens(chunk)
                    if job.first_token is None and not chunk.startswith(b'{"error"'):
                        job.first()
                    if hide_usage:
                        chunk = without_usage(chunk)
                if not answered and job.first_token is not None:
                    answered = True  # it answers: what the node does at once bounds the slots it claims
                    if node.answered(claim.key):  # more slots: the jobs waiting, here and in the cluster
                        self.scheduler.wake(claim.key, grown=True)
                yield chunk
                if lines is not None and lines.ended or tail is not None and _door_ended(chunk):
                    ended = True
                    break  # the last line went to the client: the job is done, whatever comes after it
                if watch is not None:
                    watch.asking()
        except NodeUnreachable as exc:
            if self.closing:
                raise StreamBroken("the operator is shutting down") from exc
            stalled = watch is not None and watch.stalled
            log.warning("node %s failed mid-stream (%s)", node.node_id, "stalled" if stalled else exc)
            self.failed(node)
            why = f"sent nothing for {watch.stall:g}s (stall_timeout)" if stalled else "connection lost"
            raise (Failed if leg is not None else StreamBroken)(f"node {node.node_id} failed mid-stream: {why}") from exc
        finally:
            claim.release()
            if watch is not None:
                watch.stop()
            job.output_hash = "0x" + out.hexdigest()
        if lines is not None and not lines.ended:
            node.outcome(False, self.registry.clock())
            raise (Failed if leg is not None else StreamBroken)(f"node {node.node_id} ended the stream without a final line")
        if leg is not None:
            if tail is not None and not ended:
                node.outcome(False, self.registry.clock())
                raise Failed(f"node {node.node_id} ended the answer early")
            leg.usage = tail.usage() if tail is not None else job.usage
            leg.complete(leg)
        else:
            if tail is not None:
                job.usage, job.error = tail.usage(), tail.error()
            self.ended(node, job)
        await _drain(body)

    def _check_warm(self, node: Node, key: str, job: Job) -> None:
        """Was the node's word that the model was loaded true? Judged by when the first token came, as
        this operator saw it (the node's own ``load_duration`` could say anything)."""
        said = job.prediction
        if said is None or said.node != node.node_id or job.first_token is None:
            return
        came = job.first_token - job.started - (job.queue_wait or 0.0)
        load, now = self.scheduler.forecast.load_time(node, key), self.registry.clock()
        began = now - (time.time() - job.started)  # on the registry's clock
        loading = node.load_began.get(key, -math.inf) > began - load - LOADED_LATE_S  # a load this operator began
        node.checked_warm(key, said.load_s == 0 and not loading, came - said.prompt_s, load, now)

    def ended(self, node: Node, job: Job, learn: bool = True) -> None:
        """The job's answer is complete (an error in its last line: Ollama failed mid-stream); how
        fast its tokens came is the node's speed, as this operator sees it (``learn``: and how long
        such answers are, unless it was the rest of a resumed one)."""
        if job.outcome is None:
            node.outcome(job.error is None, self.registry.clock())
            if job.error is None and job.first_token is not None:
                key = model_key(job.model)
                node.saw(key, job.delivered, time.time() - job.first_token)
                self._check_warm(node, key, job)
                if learn:
                    self.scheduler.forecast.learn(node, key, job.usage.output_tokens or job.delivered, job.limited,
                                                  job.usage.load_duration, job.usage.prompt_tokens,
                                                  job.usage.prompt_eval_duration)
                if job.conversation is not None:
                    node.served(key, job.conversation)
        job.end("node_error" if job.error else "ok")


def predicted(node_id: str, prediction: Prediction) -> p.JobPrediction:
    """A prediction as the job's receipt shows it."""
    return p.JobPrediction.model_construct(node=node_id, finish_s=round(prediction.total, 3),
                                           wait_s=round(prediction.wait, 3), load_s=round(prediction.load, 3),
                                           prompt_s=round(prediction.prompt, 3), run_s=round(prediction.run, 3),
                                           tokens=prediction.tokens)


async def _passed_on(body: Body) -> AsyncIterator[bytes]:
    try:
        async for chunk in body:
            yield chunk
    except NodeUnreachable as exc:
        raise StreamBroken("the node failed mid-answer: connection lost") from exc


async def _drain(body: Body) -> None:
    """Read what follows an answer's last line (the end of its HTTP body, or of its link job), so
    the connection goes back to the pool; a node that sends more than ``MAX_LINE`` bytes there,
    or breaks, is cut (its answer is complete either way)."""
    extra = 0
    try:
        async for chunk in body:
            extra += len(chunk)
            if extra > MAX_LINE:
                break
    except NodeUnreachable:
        pass


def _door_ended(chunk: bytes) -> bool:
    """Does this piece end a door's streamed answer? Ollama's last line says ``"done":true`` (or is
    an error), an OpenAI stream ends with ``data: [DONE]``. (A whole document ends with its body.)"""
    if chunk.endswith(b"data: [DONE]\n\n"):
        return True
    if not chunk.endswith(b"\n"):
        return False
    last = chunk[chunk.rfind(b"\n", 0, len(chunk) - 1) + 1:]
    return last.startswith(b"{") and (b'"done":true' in last or last.startswith(b'{"error"'))


MAX_LINE = 1 << 20
"The longest line a node's /run stream may send (a token is a few bytes; its final line a few hundred)."


class _Lines:
    """A node's ``/run`` stream, passed on whole lines at a time, its final line noted."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.partial = b""
        self.ended = False
        self.start = 0
        "Where the last line of the last piece taken begins."

    def take(self, chunk: bytes) -> bytes:
        """The whole lines ``chunk`` completes, the last one's ``stats`` taken off."""
        if self.partial:
            chunk = self.partial + chunk
        end = chunk.rfind(b"\n") + 1
        chunk, self.partial = (chunk[:end], chunk[end:]) if end < len(chunk) else (chunk, b"")
        if len(self.partial) > MAX_LINE:  # a node that never ends its line must not fill memory
            raise StreamBroken(f"node sent a line longer than {MAX_LINE} bytes")
        if not chunk:
            return chunk
        self.job.delivered += chunk.count(b'"done": false')  # a token line each
        start = self.start = chunk.rfind(b"\n", 0, len(chunk) - 1) + 1
        last = chunk[start:]
        final = p.final_line(last) if b'"done": true' in last else None
        self.ended = final is not None
        if final is None or start:  # a token came
            self.job.first()
        if final is None:
            return chunk
        if "stats" in final:
            self.job.usage = Usage.from_stats(final["stats"])
            return chunk[:start] + p.DONE_LINE
        if "error" in final:
            self.job.error = message_of(last, 502)
        return chunk
