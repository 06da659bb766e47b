"""Resuming an answer on another node when its node fails mid-answer.

    plan = plan_for(path, body, settings, headers)   # None: this job is not resumed (it runs as before)
    answer = Resumed(router, plan, job)              # after router.open() sent plan.body() to a node
    Opened(answer.body(claim, resp), ...)            # the client's one stream, whatever nodes it takes

A resumable job's answer is passed on whole lines (server-sent events) at a time, so that the
client always holds what it was sent in full. When its node fails after that (the connection
lost, a dial link dropped, an error line from Ollama in place of the next token, or nothing for
``stall_timeout`` seconds), the rest of the answer is asked of another healthy node whose Ollama
reports the same model digest: the original request, with what the client already has as a
trailing assistant message, which Ollama's ``/api/chat`` continues (a generate-style request is
resumed as the equivalent chat: the system prompt, then the prompt as the user's message), the
same options and seed (every resumable job gets one), and ``num_predict`` less what was sent.
That node's tokens go on in the door's own shape, and one final line counts the whole answer.

A whole (non-streamed) answer is asked of the node as a stream, so that there is something to
resume from, and given to the client in the door's non-streamed shape.

Each node's leg is proven and paid on its own: the first node's receipt is the job's; the n-th node
after it is sent the id ``{id}.{n}``, and its leg is a record of its own (``Job.parts``, ``part_of`` the
job) with the request it was sent, its answer, its receipt, its charge (for its output tokens only:
the client pays for the prompt once) and, when the job was sampled, its audit. The job keeps the
client's view: its last node, the whole answer.

Not resumed, so exactly as before: ``resume`` off, a job that opts out (``"odla_resume": false``
in ``/inference`` options, the header ``X-ODLA-Resume: off`` on the doors), structured output
(``format``, ``response_format``), tools, thinking, raw or templated prompts, several choices or
log probabilities, and embeddings. When no other node has the digest, or ``resume_attempts`` are
spent, the answer ends with the failure as it did before.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Mapping, Optional

from odla.core import protocol as p
from odla.core.errors import ODLAError, message_of
from odla.core.names import limit_in, model_key, prompt_of
from odla.core.usage import DURATIONS, Usage
from odla.operator.audits import Capture
from odla.serving.jobs import Job
from odla.serving.responses import Owned, StreamBroken

if TYPE_CHECKING:  # the router imports this module
    from odla.operator.relay import Router
    from odla.operator.scheduler import Claim

log = logging.getLogger("odla.operator")

KINDS = {"/inference": "inference", "/api/generate": "generate", "/api/chat": "chat",
         "/v1/chat/completions": "openai_chat", "/v1/completions": "openai_completion"}
"The paths whose answers can be resumed, and the shape each answer takes."
RESUME_HEADER = "x-odla-resume"
OPT_OUT = "odla_resume"
"The ``/inference`` option that turns resuming off for one job (taken off before Ollama sees it)."
RESUME_PATH = "/ollama/api/chat"
"Where a resumed answer's rest is asked: the node's relay to its Ollama's chat, which continues a trailing assistant message."
MAX_UNIT = 1 << 20
"The longest line or event a resumable answer may send (a token's is some hundred bytes)."
OPENAI_OPTIONS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "stop": "stop",
                  "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty"}
"OpenAI's sampling fields as Ollama's options, as Ollama's OpenAI layer maps them (``max_tokens``: ``num_predict``)."


class Failed(StreamBroken):
    """A node failed mid-answer; ``unit`` is the error line it ended with, when it sent one."""

    def __init__(self, message: str, unit: bytes = b"") -> None:
        super().__init__(message)
        self.unit = unit


@dataclass
class Plan:
    """How one job's answer is asked for and resumed."""

    kind: str
    "One of ``KINDS``' values: the shape of the answer."
    request: dict[str, Any]
    "The request as the client sent it, with a seed; its first node is asked for a stream."
    stream: bool
    "The client reads a stream (else one document)."
    attempts: int
    stall: float

    @property
    def openai(self) -> bool:
        return self.kind.startswith("openai")

    @property
    def separator(self) -> bytes:
        """What ends one unit of the answer: a line, or a server-sent event."""
        return b"\n\n" if self.openai else b"\n"

    @property
    def limit(self) -> Optional[int]:
        """The most output tokens the job asked for, when it did."""
        return limit_in(self.request)

    @property
    def hides_usage(self) -> bool:
        """An OpenAI chat stream whose client did not ask for ``include_usage``: it is asked of Ollama
        anyway, for the counts (the prompt's tokens are in no other event), and its event is not
        passed on. Not on ``/v1/completions``, where Ollama would add a usage to every event."""
        return (self.kind == "openai_chat" and self.stream
                and not (self.request.get("stream_options") or {}).get("include_usage"))

    def body(self) -> bytes:
        """What the first node is sent: the request, streamed."""
        request = dict(self.request)
        request["stream"] = True
        if self.openai and not self.stream or self.hides_usage:  # the counts come in a last event
            request["stream_options"] = {**(request.get("stream_options") or {}), "include_usage": True}
        return _compact(request)

    def continuation(self, text: str, sent: int) -> dict[str, Any]:
        """The request for the rest of the answer, after ``text`` (``sent`` tokens): a chat for
        Ollama's own API, whatever the door, its last message the answer so far."""
        r = self.request
        if self.kind in ("chat", "openai_chat"):
            messages = [m for m in r.get("messages") or [] if isinstance(m, dict)]
        else:
            messages = [{"role": "system", "content": r["system"]}] if r.get("system") else []
            user: dict[str, Any] = {"role": "user", "content": r.get("prompt") or ""}
            if r.get("images"):
                user["images"] = r["images"]
            messages.append(user)
        if text:
            messages = [*messages, {"role": "assistant", "content": text}]
        if self.openai:
            options = {OPENAI_OPTIONS[k]: v for k, v in r.items() if k in OPENAI_OPTIONS and v is not None}
        else:
            options = dict(r.get("options") or {})
        limit = self.limit
        if limit is not None:
            options["num_predict"] = max(1, limit - sent)
        else:
            options.pop("num_predict", None)
        out: dict[str, Any] = {"model": r["model"], "messages": messages, "stream": True, "options": options}
        if r.get("keep_alive") is not None and not self.openai:
            out["keep_alive"] = r["keep_alive"]
        return out


def plan_for(path: str, body: Any, resume: str, attempts: int, stall: float,
             headers: Mapping[str, str] = {}) -> Optional[Plan]:
    """How the job at ``path`` is resumed, or None when it is not: ``body`` is its request (bytes, or
    for ``/inference`` the validated fields as a dict)."""
    kind = KINDS.get(path)
    if kind is None or resume != "on" or attempts < 1 or headers.get(RESUME_HEADER, "").lower() == "off":
        return None
    if isinstance(body, (bytes, bytearray)):
        try:
            request = json.loads(body)
        except (ValueError, RecursionError):
            return None
    else:
        request = dict(body)
    if not isinstance(request, dict) or not isinstance(request.get("model"), str):
        return None
    options = request.get("options")
    if options is not None and not isinstance(options, dict):
        return None
    if options and OPT_OUT in options:  # ODLA's, not Ollama's
        request["options"] = {k: v for k, v in options.items() if k != OPT_OUT}
        if options[OPT_OUT] is False or str(options[OPT_OUT]).lower() in ("off", "false", "no"):
            return None
    if not resumable(kind, request):
        return None
    if kind.startswith("openai"):
        stream = bool(request.get("stream"))
        if request.get("seed") is None:
            request["seed"] = random.getrandbits(31)
    else:
        stream = kind == "inference" or request.get("stream") is not False
        options = dict(request.get("options") or {})
        if options.get("seed") is None:
            options["seed"] = random.getrandbits(31)
        request["options"] = options
    return Plan(kind, request, stream, attempts, stall)


def resumable(kind: str, r: dict) -> bool:
    """Can another node go on from where this answer stopped? Not for structured output, tools,
    thinking, a raw or templated prompt, a generate with its own context, or several choices."""
    if r.get("format") or r.get("tools") or r.get("functions") or r.get("think") or r.get("raw") or \
            r.get("template") or r.get("context") or r.get("suffix") or r.get("logprobs") or r.get("echo"):
        return False
    form = r.get("response_format")
    if isinstance(form, dict) and form.get("type") not in (None, "text"):
        return False
    if r.get("n") not in (None, 1) or r.get("top_logprobs"):
        return False
    if kind in ("chat", "openai_chat"):
        messages = r.get("messages")
        return isinstance(messages, list) and bool(messages)
    return isinstance(r.get("prompt"), str)


# --- the answer's units, as the relay passes them ---------------------------------------------------


class Units:
    """A resumable answer passed on whole units (lines, or events) at a time; the error unit a node
    ends with is held back, and what the answer was sent whole is kept until it is read."""

    def __init__(self, separator: bytes, limit: int = MAX_UNIT) -> None:
        self.separator = separator
        self.limit = limit
        "The longest unit taken (a node that never ends its line must not fill memory)."
        self.partial = b""
        self.error = b""
        "The error line (event) the node ended with, not passed on."

    def take(self, chunk: bytes) -> bytes:
        """The whole units ``chunk`` completes; an error unit among them is kept in ``error``."""
        if self.partial:
            chunk = self.partial + chunk
        end = chunk.rfind(self.separator)
        if end < 0:
            self.partial = chunk
            if len(chunk) > self.limit:
                raise Failed(f"the node sent a line longer than {self.limit} bytes")
            return b""
        end += len(self.separator)
        chunk, self.partial = chunk[:end], chunk[end:]
        before = chunk.rfind(self.separator, 0, end - len(self.separator))
        start = 0 if before < 0 else before + len(self.separator)
        last = chunk[start:]
        if last.startswith(b'{"error"') or last.startswith(b'data: {"error"'):
            self.error = last
            return chunk[:start]
        return chunk


class Watch:
    """Cuts a leg whose node sends nothing for ``stall`` seconds while the relay waits for it (a
    client slow to read is not the node's silence); one timer per leg, moved only when it fires."""

    def __init__(self, stall: float, cut: Callable[[], None]) -> None:
        self.stall, self.cut = stall, cut
        self.last = 0.0
        self.waiting = False
        self.stalled = False
        self.timer: Optional[asyncio.TimerHandle] = None
        self.loop = asyncio.get_running_loop()

    def heard(self) -> None:
        """A piece came from the node."""
        self.waiting = False
        if self.timer is None and not self.stalled:  # armed by the first piece: a model may take minutes to load
            self.timer = self.loop.call_at(self.loop.time() + self.stall, self._check)

    def asking(self) -> None:
        """The relay waits for the node's next piece."""
        if self.timer is not None:
            self.waiting, self.last = True, self.loop.time()

    def _check(self) -> None:
        now = self.loop.time()
        if self.waiting and now - self.last >= self.stall:
            self.stalled = True
            self.timer = None
            self.cut()
            return
        self.timer = self.loop.call_at((self.last if self.waiting else now) + self.stall, self._check)

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


@dataclass
class Leg:
    """One node's part of a resumable answer, as the router's relay passes it."""

    plan: Plan
    separator: bytes
    "What ends a unit of what this node sends: the door's for the first node, a line for the rest (Ollama's chat)."
    units: Units = field(init=False)
    watch: Optional[Watch] = None
    usage: Usage = field(default_factory=Usage)
    "Ollama's counts for this leg, when it ended with them."
    complete: Callable[["Leg"], None] = lambda leg: None
    "Called when the node has given its whole part, before the relay reads the rest of its body."

    def __post_init__(self) -> None:
        self.units = Units(self.separator)


# --- reading and writing the door's shape ----------------------------------------------------------


def decoded(unit: bytes) -> Optional[dict]:
    """A line or event as JSON (None: an OpenAI stream's ``[DONE]``, or not an object)."""
    unit = unit.strip()
    if unit.startswith(b"data:"):
        unit = unit[5:].strip()
    if not unit.startswith(b"{"):
        return None
    try:
        data = json.loads(unit)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


class Unresumable(Exception):
    """What the node sent cannot be continued by another (thinking, tool calls)."""


def content_of(kind: str, part: dict) -> str:
    """The text a unit of the answer adds."""
    if kind == "inference":
        return part.get("token") or ""
    if kind == "generate":
        if part.get("thinking"):
            raise Unresumable("the answer has thinking")
        return part.get("response") or ""
    if kind == "chat":
        message = part.get("message") or {}
        if message.get("thinking") or message.get("tool_calls"):
            raise Unresumable("the answer has thinking or tool calls")
        return message.get("content") or ""
    choices = part.get("choices") or []
    choice = choices[0] if choices and isinstance(choices[0], dict) else {}
    if kind == "openai_chat":
        delta = choice.get("delta") or {}
        if delta.get("tool_calls") or delta.get("reasoning"):
            raise Unresumable("the answer has tool calls or reasoning")
        return delta.get("content") or ""
    return choice.get("text") or ""


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Shape:
    """Writes the rest of an answer in its door's shape, after what its first node sent."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.kind = plan.kind
        self.model = plan.request["model"]
        self.id = ("chatcmpl-" if self.kind == "openai_chat" else "cmpl-") + os.urandom(4).hex()
        self.created = int(time.time())
        self.fingerprint = "fp_ollama"
        self.finish: Optional[str] = None
        "The first node's last word on why it stopped (OpenAI's ``finish_reason``), when it said."
        self.final: Optional[dict] = None
        "The first node's final line (Ollama's API), when it completed the answer."
        self.usage: Optional[dict] = None
        "The first node's OpenAI ``usage``, when it sent it."

    def saw(self, part: dict) -> None:
        """Take the answer's own names (OpenAI's id and time) from the first node's units."""
        if self.plan.openai:
            if isinstance(part.get("id"), str):
                self.id = part["id"]
            if isinstance(part.get("created"), int):
                self.created = part["created"]
            if isinstance(part.get("system_fingerprint"), str):
                self.fingerprint = part["system_fingerprint"]
            if isinstance(part.get("model"), str):
                self.model = part["model"]
            if isinstance(part.get("usage"), dict):
                self.usage = part["usage"]
            choices = part.get("choices") or []
            if choices and isinstance(choices[0], dict) and choices[0].get("finish_reason"):
                self.finish = choices[0]["finish_reason"]
        elif part.get("done") is True:
            self.final = part

    # a stream's units

    def piece(self, text: str, created_at: str) -> bytes:
        kind = self.kind
        if kind == "inference":
            return p.token_line(text)
        if kind == "generate":
            return _compact({"model": self.model, "created_at": created_at, "response": text, "done": False}) + b"\n"
        if kind == "chat":
            return _compact({"model": self.model, "created_at": created_at,
                             "message": {"role": "assistant", "content": text}, "done": False}) + b"\n"
        return self._event([self._choice(text, None)])

    def end(self, usage: Usage, reason: str, created_at: str) -> bytes:
        """The last line(s) of a resumed stream, counting the whole answer."""
        kind = self.kind
        if kind == "inference":
            return p.DONE_LINE
        if not self.plan.openai:
            return _compact(self._native_final(usage, reason, created_at, "")) + b"\n"
        out = self._event([self._choice("", _finish(reason))])
        if (self.plan.request.get("stream_options") or {}).get("include_usage"):
            out += self._event([], usage=_openai_usage(usage))
        return out + b"data: [DONE]\n\n"

    # a whole answer

    def whole(self, text: str, usage: Usage, reason: str, created_at: str, resumed: bool) -> bytes:
        """The answer as one document, in the door's non-streamed shape."""
        if not self.plan.openai:
            if not resumed and self.final is not None:  # as Ollama gives it: its final message with all the text
                final = dict(self.final)
                if self.kind == "chat":
                    final["message"] = {**(final.get("message") or {"role": "assistant"}), "content": text}
                else:
                    final["response"] = text
                return _compact(final)
            return _compact(self._native_final(usage, reason, created_at, text))
        finish = self.finish if not resumed and self.finish else _finish(reason)
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
                  if self.kind == "openai_chat" else {"text": text, "index": 0, "finish_reason": finish})
        counts = self.usage if not resumed and self.usage else _openai_usage(usage)
        return _compact({"id": self.id, "object": "chat.completion" if self.kind == "openai_chat" else "text_completion",
                         "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
                         "choices": [choice], "usage": counts})

    @property
    def media_type(self) -> str:
        """A whole answer's content type, as Ollama sends it."""
        return "application/json" if self.plan.openai else "application/json; charset=utf-8"

    def _native_final(self, usage: Usage, reason: str, created_at: str, text: str) -> dict:
        out: dict[str, Any] = {"model": self.model, "created_at": created_at}
        if self.kind == "chat":
            out["message"] = {"role": "assistant", "content": text}
        else:
            out["response"] = text
        out.update(done=True, done_reason=reason)
        counts = {"total_duration": usage.total_duration, "load_duration": usage.load_duration,
                  "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": usage.prompt_eval_duration,
                  "eval_count": usage.output_tokens, "eval_duration": usage.eval_duration}
        out.update({k: v for k, v in counts.items() if v is not None})
        return out

    def _choice(self, text: str, finish: Optional[str]) -> dict:
        if self.kind == "openai_chat":
            return {"index": 0, "delta": {"role": "assistant", "content": text}, "finish_reason": finish}
        return {"text": text, "index": 0, "finish_reason": finish}

    def _event(self, choices: list, **extra: Any) -> bytes:
        obj = {"id": self.id, "object": "chat.completion.chunk" if self.kind == "openai_chat" else "text_completion",
               "created": self.created, "model": self.model, "system_fingerprint": self.fingerprint,
               "choices": choices, **extra}
        return b"data: " + _compact(obj) + b"\n\n"


def _finish(reason: str) -> str:
    return "length" if reason == "length" else "stop"


def _openai_usage(usage: Usage) -> dict:
    prompt, output = usage.prompt_tokens or 0, usage.output_tokens or 0
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


# --- the answer across nodes ------------------------------------------------------------------------


class Resumed:
    """One job's answer, from as many nodes as it takes: the first node's units as they come (a
    stream), or gathered (a whole answer); on a failure, the rest from another node."""

    def __init__(self, router: "Router", plan: Plan, job: Job) -> None:
        self.router = router
        self.plan = plan
        self.job = job
        self.shape = Shape(plan)
        self.leg: Optional[Owned] = None
        self.seen: list[bytes] = []
        "The first node's units the client has, not yet read for their text."
        self.text: list[str] = []
        "The answer's text, as far as it has been read."
        self.tried: list[str] = []
        "The nodes that failed this job."

    def body(self, claim: "Claim", resp: Any) -> Owned:
        """The answer, owning the first node's claim and response from now: its ``aclose()`` frees
        them (and a later node's) whether or not the answer was ever read."""
        leg = Leg(self.plan, self.plan.separator, complete=lambda leg: self._first_done(claim, leg))
        self.leg = self.router.relay(claim, resp, self.job, protocol=self.plan.kind == "inference", leg=leg)
        return Owned(self._answer(claim), self._close)

    def _first_done(self, claim: "Claim", leg: Leg) -> None:
        """The first node gave the whole answer: a stream's job ends now, as its last line has gone."""
        self.job.usage = leg.usage
        if self.plan.stream:
            self.router.ended(claim.node, self.job)

    async def _close(self) -> None:
        if self.leg is not None:
            await self.leg.aclose()

    async def _answer(self, claim: "Claim") -> AsyncIterator[bytes]:
        plan, job, router = self.plan, self.job, self.router
        key = model_key(plan.request["model"])
        digest = claim.node.digests.get(key)
        assert self.leg is not None
        node, before, created_at = claim.node.node_id, job.delivered, ""
        try:
            async for chunk in self.leg:
                if plan.stream:
                    self.seen.append(chunk)
                    if len(self.seen) > 4096:  # a long answer: read what it holds, rather than keep its bytes
                        self._read_seen()
                    yield chunk
                else:
                    self._read(chunk, plan.kind)
            failure: Optional[Failed] = None
        except Failed as exc:
            failure = exc
        if failure is None:  # the first node gave all of it
            if not plan.stream:
                yield self.shape.whole("".join(self.text), job.usage, "stop", "", resumed=False)
                router.ended(claim.node, job)
            return
        first = (job.node_address, job.request_hash, job.output_hash)  # what the first node's receipt must name
        sampled, job.audit = job.audit is not None, None  # two nodes' answer is no one node's: each leg is audited
        part: Optional[Job] = None
        usage = Usage()
        reason = "stop"
        try:
            while True:
                job.legs.append((node, job.delivered - before))
                self.tried.append(node)
                await self._close_leg()
                if part is not None:
                    self._part_done(part, job.delivered - before, "node_error", str(failure))
                    part = None
                why = self._why_not(digest, failure)
                if why is None:
                    rest = plan.continuation("".join(self.text), job.delivered)
                    run_id = f"{job.id}.{len(job.legs)}"
                    job.audit = Capture() if sampled else None  # a sampled job's legs are too, as jobs of their own
                    try:
                        claim, resp = await router.open(plan.request["model"], "POST", RESUME_PATH, _compact(rest),
                                                        job, tokens=rest["options"].get("num_predict"),
                                                        prompt=prompt_of(rest), avoid=self._avoid(key, digest),
                                                        run_id=run_id)
                    except ODLAError as exc:
                        why = f"no_node: {exc.message}"
                    else:
                        if resp.status != 200:
                            try:
                                why = f"no_node: {message_of(await router.nodes.read(resp), resp.status)}"
                            finally:
                                claim.release()
                if why is not None:  # it ends as it would have: with the node's own last line, when it sent one
                    job.resumes.append(why.split(":")[0])
                    log.warning("job %s: %s; not resumed (%s)", job.id, failure, why)
                    if failure.unit and plan.stream:
                        job.error = message_of(failure.unit.removeprefix(b"data: "), 502)
                        yield failure.unit
                        return
                    raise StreamBroken(str(failure))
                job.error = None
                node, before = claim.node.node_id, job.delivered
                log.info("job %s: %s; resuming on node %s after %d tokens", job.id, failure, node, before)
                part = self._part(run_id, node)
                leg = Leg(plan, b"\n")
                self.leg = router.relay(claim, resp, job, protocol=False, leg=leg)
                try:
                    async for chunk in self.leg:
                        out = []
                        for unit in chunk.split(b"\n"):
                            said = decoded(unit)
                            if said is None:
                                continue
                            created_at = said.get("created_at") or created_at
                            if said.get("done") is True:
                                reason = said.get("done_reason") or reason
                                continue
                            piece = (said.get("message") or {}).get("content") or ""  # (Ollama's chat)
                            if piece:
                                self.text.append(piece)
                                out.append(self.shape.piece(piece, created_at))
                        if out and plan.stream:
                            yield b"".join(out)
                except Failed as exc:
                    job.resumes.append("failed")
                    failure = exc
                    continue
                job.resumes.append("ok")
                job.legs.append((node, job.delivered - before))
                part.usage = leg.usage
                self._part_done(part, job.delivered - before, "ok")
                part = None
                usage = self._merged(leg.usage, before)
                job.usage = usage
                break
        except BaseException as exc:
            if part is not None:  # the client left, or the operator closes, while a later node answered
                await self._close_leg()
                left = isinstance(exc, (GeneratorExit, asyncio.CancelledError))
                self._part_done(part, job.delivered - before, "client_cancel" if left else "node_error",
                                None if left else str(exc))
            raise
        finally:
            job.node_address, job.request_hash, job.output_hash = first  # the job's own receipt is the first's
            job.audit = None
        if plan.stream:
            yield self.shape.end(usage, reason, created_at)
        else:
            yield self.shape.whole("".join(self.text), usage, reason, created_at, resumed=True)
        router.ended(claim.node, job, learn=False)

    def _part(self, run_id: str, node: str) -> Job:
        """A later node's leg, as a record of its own: the request it was sent (``router.open`` has just
        set it on the job), then its answer; its receipt, charge and audit (its relay fills the job's
        capture, which is the leg's) are its own."""
        job = self.job
        part = Job(door=job.door, model=job.model, caller=job.caller, id=run_id, node=node, part_of=job.id,
                   node_address=job.node_address, request_hash=job.request_hash, audit=job.audit)
        job.output_hash = None  # the leg's relay sets it when it ends
        job.parts.append(part)
        return part

    def _part_done(self, part: Job, tokens: int, outcome: str, error: Optional[str] = None) -> None:
        """The leg ended (its relay closed): what its node sent, and how it ended."""
        part.delivered, part.output_hash = tokens, self.job.output_hash
        part.end(outcome, error)

    def _merged(self, last: Usage, before: int) -> Usage:
        """The whole answer's counts: the prompt as its first node read it (estimated from the last
        node's, which also read what came before it), every token sent, every leg's durations."""
        job = self.job
        first = job.usage if job.usage.prompt_tokens is not None else None
        prompt = first.prompt_tokens if first else (
            max(1, last.prompt_tokens - before) if last.prompt_tokens is not None else None)
        durations = {}
        for name in DURATIONS:
            values = [v for v in (getattr(job.usage, name), getattr(last, name)) if v is not None]
            durations[name] = sum(values) if values else None
        return Usage(prompt_tokens=prompt, output_tokens=job.delivered, **durations)

    def _why_not(self, digest: Optional[str], failure: Failed) -> Optional[str]:
        """Why the answer cannot be resumed now; None when it can."""
        if self.router.closing:
            return "shutting_down"
        if len(self.tried) > self.plan.attempts:
            return "exhausted"
        if not digest:
            return "no_digest"
        try:
            self._read_seen()
        except Unresumable:
            return "unresumable"
        return None

    def _avoid(self, key: str, digest: Optional[str]) -> list[str]:
        """The nodes the rest must not go to: those that failed it, and every one with another build."""
        return [*self.tried, *(n.node_id for n in self.router.registry.nodes()
                               if key in n.keys and n.digests.get(key) != digest)]

    def _read_seen(self) -> None:
        seen, self.seen = self.seen, []
        for chunk in seen:
            self._read(chunk, self.plan.kind)

    def _read(self, chunk: bytes, kind: str) -> None:
        for unit in chunk.split(self.plan.separator):
            part = decoded(unit)
            if part is None:
                continue
            self.shape.saw(part)
            piece = content_of(kind, part)
            if piece:
                self.text.append(piece)

    async def _close_leg(self) -> None:
        if self.leg is not None:
            leg, self.leg = self.leg, None
            await leg.aclose()
