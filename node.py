"""ODLA node agent: runs inference jobs on this machine's Ollama (its answers read with aiohttp, listings
with the ollama SDK).

    python node.py          (NODE_ID, NODE_PORT, NODE_URL, COORDINATOR_URL, OLLAMA_HOST)
    python node.py claim    (take what the node earned from the escrow on chain: odla/node/claim.py)

Endpoints:
    POST /run       {job_id, prompt, model?} -> JSON-lines token stream (operator only)
    GET  /health    {status, node_id, models}; 503 while Ollama does not answer
    GET  /models    {node_id, models}
    *    /ollama/…  Ollama's inference and listing API, relayed as is (for the operator's
                    Ollama/OpenAI doors; nothing that pulls, deletes or creates models)

It registers with the operator on start-up, re-registers every ``heartbeat_interval``
(so an operator restart or an ``ollama pull`` shows within one interval), and
deregisters on shutdown. With ``link: dial`` (NODE_LINK=dial) it listens on no port: it
dials the operator and serves these same endpoints down that link (``odla.node.dial``).
"""

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, AsyncIterator, Callable, Optional
from urllib.parse import urlsplit

import aiohttp
import httpx
import ollama
from fastapi import Depends, FastAPI, Request
from fastapi.responses import Response

from odla.core import protocol as p
from odla.serving.auth import join_headers, join_token_dependency
from odla.node.capacity import Capacity, Running, num_parallel
from odla.core.config import Settings, script_settings
from odla.node.dial import Dialer, run_dialled
from odla.node.generation import GenerateLines
from odla.core.errors import ODLAError, UpstreamError
from odla.serving.errors import shape_for
from odla.serving.lifespan import background, serve, stop_serving, tune_gc
from odla.serving.inbound import build_app, openapi_body, read_body
from odla.core.keep_alive import bound_body, bounded
from odla.node.ollama_clients import OLLAMA_FAILURES, STREAM_FAILURES, Streams, ollama_failure, sdk_client
from odla.core.logs import setup_logging
from odla.core.names import model_key, model_named
from odla.serving.responses import STREAM_RESPONSES, LineStream, Opened, Owned, StreamBroken
from odla.core.usage import Tail, Usage, door_tokens
from odla.node.receipts import Asked, ReceiptBook, new_output
from odla.proofs.identity import BadSignature, Identity, KeyFileError
from odla.proofs.reports import request_signer, signed

log = logging.getLogger("odla.node")
SHUTTING_DOWN = "the node is shutting down"
"Why a job ends, or is refused, while the node stops (Ctrl-C, SIGTERM)."
GENERATING = frozenset({"/api/generate", "/api/chat", "/v1/chat/completions", "/v1/completions"})
"Ollama's paths that run a model on a slot: counted while they run, for the slots a node learns."
REPORT_GAP_S = 0.2
DEFAULT_NODE_PORT = 8001

# What /ollama/* relays: what the operator's doors need, and nothing that changes the machine.
OLLAMA_DOORS = {("GET", path) for path in ("/api/tags", "/api/ps", "/api/version", "/v1/models")} | {
    ("POST", path) for path in ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
                                "/v1/chat/completions", "/v1/completions", "/v1/embeddings")}
MANAGING = {("POST", "/api/pull"), ("DELETE", "/api/delete"), ("POST", "/api/copy")}
"Ollama's model management, relayed for the operator when the owner allows it (``manage_models``)."


@dataclass
class NodeState:
    """What this node knows about itself and its Ollama."""

    node_id: str
    url: str
    models: list[str] = field(default_factory=list)
    ollama_error: Optional[str] = "not checked yet"
    digests: dict[str, str] = field(default_factory=dict)
    "Each model's digest, as Ollama lists it: what the node's receipts name."
    disk_free: Optional[int] = None
    "Bytes free where Ollama keeps its models (``OLLAMA_MODELS``), when it can be read."
    registered_with: set[str] = field(default_factory=set)
    "The operators the last registration with went through."
    joined: bool = False
    "A registration ever went through: on shutdown there is a row of ours to remove."

    @property
    def healthy(self) -> bool:
        return self.ollama_error is None


class StartupError(Exception):
    """The node cannot join the network as configured."""


def default_node_id(settings: Settings) -> str:
    """NODE_ID, else the hostname (SPEC.md), with the port when it is not the default 8001, so two
    nodes on one machine are two nodes, not one row that flips between them."""
    if settings.node_id:
        return settings.node_id
    host = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:120] or "node"
    return host if settings.node_port == DEFAULT_NODE_PORT else f"{host}-{settings.node_port}"


def public_url(settings: Settings) -> str:
    """The URL the operator should use for this node: NODE_URL, or the address routing to it."""
    if settings.node_url:
        return settings.node_url
    if settings.node_host not in ("0.0.0.0", "::", ""):
        return f"http://{settings.node_host}:{settings.node_port}"
    target = urlsplit(settings.operator_url)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # no packet is sent
            s.connect((target.hostname or "127.0.0.1", target.port or 80))
            ip = s.getsockname()[0]
    except OSError:  # the operator's name does not resolve (yet): our own address, then loopback
        try:
            ip = socket.gethostbyname(socket.gethostname())
        except OSError:
            ip = "127.0.0.1"
    return f"http://{ip}:{settings.node_port}"


class Node:
    """The node's long-lived parts, owned by the app's lifespan."""

    def __init__(self, settings: Settings, ollama_api: ollama.AsyncClient, streams: Streams,
                 http: httpx.AsyncClient, identity: Identity) -> None:
        self.settings = settings
        self.identity = identity  # signs its reports (and receipts)
        self.receipts = ReceiptBook(identity, lambda model: self.state.digests.get(model_key(model)))
        self.operator_addresses: dict[str, str] = {}  # operator URL -> its key, from its answers
        self.ollama = ollama_api  # jobs and listings, through the SDK
        self.streams = streams  # jobs' answers and the /ollama/... relay, read as they arrive
        self.http = http  # the operator
        self.state = NodeState(node_id=default_node_id(settings), url=public_url(settings))
        self.capacity = Capacity(ollama_api, num_parallel(settings), settings.max_slots)
        self.report_soon = asyncio.Event()  # a job ended: what is loaded, and how fast, has changed
        self.listings = self.listed = 0  # listings of Ollama's models begun; the newest one taken
        self.refused: dict[str, str] = {}  # operator -> why it will not have this node
        self.closing = False  # stopping (Ctrl-C, SIGTERM): jobs end now, with a last line saying so
        self.on_refused: Callable[[str], None] = lambda reason: None
        "Called when every operator has refused this node (the process then stops, saying why)."

    async def refresh_models(self) -> bool:
        """Ask Ollama for its models; records whether it answered. A listing that began before the
        one last taken is dropped: it may predate a pull or a delete that one saw."""
        self.listings += 1
        listing_no = self.listings
        failure: Optional[BaseException] = None
        try:
            listing = await asyncio.wait_for(self.ollama.list(), self.settings.health_check_timeout)
        except (asyncio.TimeoutError, *OLLAMA_FAILURES) as exc:
            failure = exc
        if listing_no < self.listed:  # one begun later was taken already
            return self.state.ollama_error is None
        self.listed = listing_no
        if failure is not None:
            error = ollama_failure(failure, self.settings.ollama_host).message if not isinstance(
                failure, asyncio.TimeoutError) else f"Ollama at {self.settings.ollama_host} timed out"
            if self.state.ollama_error != error:
                log.warning("Ollama unavailable: %s", error)
            self.state.ollama_error = error
            return False
        models = [m.model for m in listing.models if m.model]
        self.state.digests = {model_key(m.model): m.digest for m in listing.models if m.model and m.digest}
        if models != self.state.models or self.state.ollama_error:
            log.info("Ollama at %s has %d model(s): %s", self.settings.ollama_host, len(models),
                     ", ".join(models) or "none")
        self.state.models, self.state.ollama_error = models, None
        self.state.disk_free = disk_free(models_dir())
        return True

    async def refresh(self) -> None:
        """Models, then what is loaded and each model's slots: what a report carries."""
        if await self.refresh_models():
            await self.capacity.refresh(self.state.models, self.settings.health_check_timeout)

    async def register(self, operator: str) -> None:
        if not self.settings.node_url:  # derived again each time: the route may change, or resolve late
            self.state.url = await asyncio.to_thread(public_url, self.settings)  # (a name lookup blocks)
        cap = self.capacity
        whose = self.operator_addresses.get(operator)
        receipts = self.receipts.take(whose)
        body = p.RegisterRequest(node_id=self.state.node_id, url=self.state.url, models=self.state.models,
                                 healthy=self.state.healthy, slots=cap.slots, loaded=cap.loaded,
                                 tokens_per_s=cap.tokens_per_s, slots_learned=cap.learned,
                                 digests=self.state.digests, disk_free=self.state.disk_free,
                                 max_models=cap.max_loaded,
                                 address=self.identity.address, signed_at=time.time(),
                                 receipts=receipts)
        content = signed(body.model_dump_json(exclude_none=True).encode(), self.identity)
        try:
            resp = await self.http.post(f"{operator}/register", content=content, headers=self._headers())
            resp.raise_for_status()
        except BaseException:
            self.receipts.put_back(whose, receipts)  # for the next report
            raise
        with contextlib.suppress(ValueError, AttributeError):
            if address := resp.json().get("operator_address"):
                self.operator_addresses[operator] = address
                self.receipts.known.add(address)
                if address != whose and self.receipts.waiting.get(address):
                    self.report_soon.set()  # its receipts, now that the node knows whose they are
        if operator not in self.state.registered_with:
            log.info("registered as %s (%s) with operator %s", self.state.node_id, self.state.url, operator)
        self.state.registered_with.add(operator)
        self.state.joined = True

    async def leave(self) -> None:
        """The process is stopping: leave every operator first (no job is sent here after), then end
        the jobs running here. Closing the clients of Ollama breaks their streams, which end with a
        last line that says why, so that the process exits at once rather than after its answers."""
        self.closing = True
        await self.deregister()
        await self.ollama.close()
        await self.streams.aclose()

    async def deregister(self) -> None:
        if not self.state.joined:  # never joined, or left already: nothing of ours to remove
            return
        self.state.joined = False
        body = p.DeregisterRequest(node_id=self.state.node_id, url=self.state.url)
        for operator in self.settings.operator_urls:
            with contextlib.suppress(httpx.HTTPError):
                await self.http.post(f"{operator}/deregister", content=body.model_dump_json(),
                                     headers=self._headers(), timeout=2)
                log.info("deregistered from %s", operator)

    def _headers(self) -> dict[str, str]:
        return {"content-type": "application/json", **join_headers(self.settings.join_token)}

    async def join(self) -> None:
        """The first registration, at start-up, with each operator: a node whose id is taken does not start."""
        await self.refresh()
        for operator in self.settings.operator_urls:
            try:
                await self.register(operator)
            except httpx.HTTPStatusError as exc:
                if refusal := _refusal(operator, exc):
                    raise StartupError(refusal) from None
            except httpx.HTTPError:
                pass  # that operator is not there yet: its heartbeat keeps trying

    async def heartbeat(self, operator: str) -> None:
        """Re-register with ``operator`` every interval and soon after each job (right away when not
        registered, as when ``join`` could not reach it); back off (capped) while it is away."""
        backoff = 0.5
        while True:
            if self.closing:  # left the network: no registering again on the way out
                return
            if operator in self.state.registered_with:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.report_soon.wait(), self.settings.heartbeat_interval)
                    await asyncio.sleep(REPORT_GAP_S)  # jobs that end together make one report
            try:
                self.report_soon.clear()
                await self.refresh()
                await self.register(operator)
            except httpx.HTTPStatusError as exc:
                if refusal := _refusal(operator, exc):  # retrying cannot help: say why and stop
                    log.error("%s; not retrying", refusal)
                    self.state.registered_with.discard(operator)
                    self.refused[operator] = refusal
                    if len(self.refused) == len(self.settings.operator_urls):
                        self.on_refused(refusal)
                    return
                reason = _describe_http_error(exc)
                log.warning("cannot register with operator at %s (%s); retrying in %.1fs", operator, reason, backoff)
                self.state.registered_with.discard(operator)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.heartbeat_interval)
                continue
            except Exception as exc:  # noqa: BLE001 - the heartbeat must outlive any one failure
                reason = _describe_http_error(exc) if isinstance(exc, httpx.HTTPError) else repr(exc)
                if not isinstance(exc, httpx.HTTPError):
                    log.exception("heartbeat failed unexpectedly")
                log.warning("cannot register with operator at %s (%s); retrying in %.1fs", operator, reason, backoff)
                self.state.registered_with.discard(operator)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.settings.heartbeat_interval)
                continue
            backoff = 0.5

    async def open_job(self, job: p.RunRequest, asked: Optional[Asked] = None) -> Opened:
        """Start the job on Ollama and wait for its first line, so refusals become statuses."""
        if self.closing:
            raise UpstreamError(SHUTTING_DOWN, 503)
        model = job.model or (self.state.models[0] if self.state.models else None)
        if model is None:
            raise ODLAError("this node has no models", 404)
        fields = job.ollama_fields()
        if "keep_alive" in fields:  # within the owner's bounds
            fields["keep_alive"] = bounded(fields["keep_alive"], self.settings.min_keep_alive,
                                           self.settings.max_keep_alive)
        body = json.dumps({"model": model, "prompt": job.prompt, "stream": True, **fields}).encode()
        lines = GenerateLines(model)
        running = self.capacity.started(model)
        resp: Optional[aiohttp.ClientResponse] = None
        try:
            resp = await self.streams.send("POST", "/api/generate", body)
            if resp.status != 200:  # refused (no such model, busy): as the SDK reads it
                raise ollama.ResponseError(await resp.text(errors="replace"), resp.status)
            chunks = resp.content.iter_any()
            first = await lines.read(chunks)
            if lines.error is not None and not first:
                raise lines.error
            if not first and not lines.ended:
                raise ODLAError("Ollama ended the stream before any output", 502)
        except BaseException as exc:  # refused, or the operator left while Ollama was starting
            self.capacity.ended(running)
            if resp is not None:
                self.streams.done(resp)
            if not isinstance(exc, OLLAMA_FAILURES):
                raise
            failure = ollama_failure(exc, self.settings.ollama_host)
            if self.closing:  # its Ollama request was closed on the way out: another node may take it
                failure = UpstreamError(SHUTTING_DOWN, 503)
            if failure.status_code >= 500:
                log.warning("job %s: %s", job.job_id, failure.message)
            raise failure from exc

        def close() -> None:  # whether or not it streamed: Ollama's request, and the job's count
            self.capacity.ended(running)
            self.streams.done(resp)

        return Opened(Owned(self.relay(job.job_id, first, lines, resp, running, asked), close))

    async def relay(self, job_id: str, piece: bytes, lines: GenerateLines, resp: aiohttp.ClientResponse,
                    running: Optional[Running] = None, asked: Optional[Asked] = None) -> AsyncIterator[bytes]:
        """Ollama's answer as protocol lines, a piece per arrival; always ends with one final line,
        which carries Ollama's counts for the operator (``stats``). Logs one line per job, and signs
        its receipt."""
        outcome, usage = "cancelled", Usage()
        out = new_output()  # what the operator is sent, as its receipt names it
        chunks = resp.content.iter_any()
        try:
            while True:
                if lines.ended:
                    if lines.final is not None:
                        final = lines.final
                        usage, outcome = Usage.from_ollama(final), "ok"
                        self.capacity.measured(lines.model, final.get("eval_count"), final.get("eval_duration"))
                        if running is not None:
                            self.capacity.ended(running, usage)
                        piece += p.node_done_line(usage.stats())
                    elif lines.error is not None:
                        outcome = f"error: {lines.error.error}"
                        piece += p.error_line(lines.error.error)
                    await _read_end(chunks)  # first: the last piece and the response's end then go in one write
                    out.update(piece)
                    yield piece
                    return
                out.update(piece)
                yield piece
                piece = await lines.read(chunks)
                if not piece and not lines.ended:
                    outcome = "error: Ollama ended the stream without a final message"
                    out.update(line := p.error_line(outcome[len("error: "):]))
                    yield line
                    return
        except OLLAMA_FAILURES as exc:
            message = ollama_failure(exc, self.settings.ollama_host).message
            message = SHUTTING_DOWN if self.closing else message
            outcome = f"error: {message}"
            out.update(line := p.error_line(message))
            yield line
        finally:
            if running is not None:
                self.capacity.ended(running)  # (a no-op once counted above)
            log.info("%s", summary(job_id, lines.model, usage, lines.tokens, outcome))
            self.receipts.sign(asked, lines.model, out, usage, lines.tokens, outcome)
            self.report_soon.set()
            self.streams.done(resp)  # a caller that left stops the work at Ollama too

    def may_manage(self, request: Request, method: str, path: str, body: bytes) -> None:
        """Only this node's operator changes its models: over the node's own link, with the join token
        (checked already), or signed by an operator the node reports to; and only if the owner lets it."""
        if not self.settings.manage_models:
            raise ODLAError(f"this node's owner does not let the operator manage its models ({path})", 403)
        if self.settings.join_token or (request.client is not None and request.client.host == "link"):
            return
        try:
            who = request_signer(request.headers, method, path, body)
        except BadSignature as exc:
            raise ODLAError(f"the request's signature does not hold: {exc}", 403) from None
        if who is None or who not in self.receipts.known:
            raise ODLAError("only this node's operator may manage its models (a request signed by its key, "
                            "or the join token)", 403)

    async def open_ollama(self, method: str, path: str, query: str, body: bytes, job_id: str = "",
                          asked: Optional[Asked] = None) -> Opened:
        """Send a request to Ollama's own API as it came (the operator's Ollama and OpenAI doors), its
        ``keep_alive`` within the owner's bounds."""
        if method == "POST":
            body = bound_body(body, self.settings.min_keep_alive, self.settings.max_keep_alive)
        running = None
        if method == "POST" and path in GENERATING:  # a job on Ollama: counted while it runs
            with contextlib.suppress(ValueError):
                running = self.capacity.started(model_named(body))
        try:
            if self.closing:
                raise UpstreamError(SHUTTING_DOWN, 503)
            resp = await self.streams.send(method, path, body, query)
        except BaseException as exc:
            if running is not None:
                self.capacity.ended(running)
            if not isinstance(exc, STREAM_FAILURES):
                raise
            if self.closing:
                raise UpstreamError(SHUTTING_DOWN, 503) from exc
            raise ollama_failure(exc, self.settings.ollama_host) from exc
        media = resp.headers.get("content-type", "application/json")
        job = None
        if method == "POST" and resp.status == 200:  # a job: its log line names the model, if it can
            try:
                job = (job_id, model_named(body))
            except ValueError:
                job = (job_id, "")

        async def close() -> None:  # whether or not it streamed
            if running is not None:
                self.capacity.ended(running)
            if (method, path) in MANAGING:  # the operator hears of the node's models now, not at the next beat
                self.report_soon.set()
            self.streams.done(resp)

        return Opened(Owned(self.ollama_body(resp, job, running, asked if job is not None else None), close),
                      resp.status, media)

    async def ollama_body(self, resp: aiohttp.ClientResponse, job: Optional[tuple[str, str]] = None,
                          running: Optional[Running] = None, asked: Optional[Asked] = None) -> AsyncIterator[bytes]:
        """Ollama's answer as it comes; for a job (its id and model), a log line at its end, and its receipt."""
        tail, outcome, out, sent = Tail(), "cancelled", new_output(), 0
        try:
            async for data in resp.content.iter_any():
                if job is not None:
                    tail.add(data)
                    out.update(data)
                    sent += door_tokens(data)
                yield data
            outcome = f"error: {error}" if job is not None and (error := tail.error()) else "ok"
        except STREAM_FAILURES as exc:
            outcome = "error: " + (SHUTTING_DOWN if self.closing else "lost connection to Ollama")
            if self.closing:
                raise StreamBroken(SHUTTING_DOWN) from exc
            raise StreamBroken(f"lost connection to Ollama at {self.settings.ollama_host}") from exc
        finally:  # what must happen comes before the one wait, which a client that left may cut short
            if running is not None:  # its counts judge the node's slots, when Ollama's API gave them
                self.capacity.ended(running, tail.usage() if outcome == "ok" and job is not None else None)
                self.report_soon.set()
            if job is not None:
                usage = tail.usage()
                log.info("%s", summary(job[0], job[1], usage, None, outcome))
                self.receipts.sign(asked, job[1], out, usage, sent, outcome)
            self.streams.done(resp)  # (its owner closes it too)


async def _read_end(chunks: AsyncIterator[bytes]) -> None:
    """Read the end of an answer whose last line came (Ollama sends nothing after it), so that its
    connection goes back to the pool: one whose body was not read to its end is closed."""
    with contextlib.suppress(*OLLAMA_FAILURES):
        async for _ in chunks:
            break


def models_dir() -> Path:
    """Where Ollama keeps its models, as Ollama reads it: ``OLLAMA_MODELS``, else ``~/.ollama/models``."""
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def disk_free(path: Path) -> Optional[int]:
    """Bytes free on the disk that holds ``path`` (or, before Ollama made it, its nearest parent)."""
    for place in (path, *path.parents):
        try:
            return shutil.disk_usage(place).free
        except OSError:
            continue
    return None


def summary(job_id: str, model: str, usage: Usage, tokens: Optional[int], outcome: str) -> str:
    """One job's log line: ``job 3f2a… llama3: 26 prompt + 290 output tokens, 64.4 tok/s, ok``."""
    output = usage.output_tokens if usage.output_tokens is not None else tokens
    counts = [f"{usage.prompt_tokens} prompt"] if usage.prompt_tokens is not None else []
    counts += [f"{output} output"] if output is not None else []
    speed = (f", {usage.output_tokens / (usage.eval_duration / 1e9):.1f} tok/s"
             if usage.output_tokens and usage.eval_duration else "")
    return f"job {job_id or '-'} {model or '?'}: {' + '.join(counts) or 'no'} tokens{speed}, {outcome}"


def _refusal(operator: str, exc: httpx.HTTPStatusError) -> Optional[str]:
    """What an operator's refusal to register this node means, when asking again cannot change it:
    a wrong credential, or an id a live node has (its message alone); None for anything else."""
    status = exc.response.status_code
    try:
        message = str(exc.response.json().get("error") or "")
    except (ValueError, AttributeError):
        message = ""
    if status == 409:
        return message or f"the operator at {operator} says this node's id is taken"
    if status in (401, 403):
        return (f"the operator at {operator} refused this node: {message or f'HTTP {status}'}; give the node the "
                "operator's join token (join_token in config.json or ODLA_JOIN_TOKEN)")
    return None


def _describe_http_error(exc: httpx.HTTPError) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        try:
            return f"{exc.response.status_code}: {exc.response.json().get('error')}"
        except ValueError:
            return f"HTTP {exc.response.status_code}"
    return type(exc).__name__ if not str(exc) else str(exc)


def create_app(settings: Settings, *, ollama_api: Optional[ollama.AsyncClient] = None,
               http: Optional[httpx.AsyncClient] = None, identity: Optional[Identity] = None) -> FastAPI:
    """The node agent's app; collaborators default to real clients built from ``settings``, and its
    identity to the key in ``node_key_file`` (made there on first start) or ``NODE_PRIVATE_KEY``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with contextlib.AsyncExitStack() as stack:
            api = ollama_api or await stack.enter_async_context(sdk_client(settings))
            streams = await stack.enter_async_context(Streams(settings))
            client = http or await stack.enter_async_context(
                httpx.AsyncClient(timeout=httpx.Timeout(settings.health_check_timeout,
                                                        connect=settings.connect_timeout)))
            try:
                me = identity or Identity.load(settings.node_key_file, settings.node_private_key)
            except KeyFileError as exc:
                app.state.startup_error = str(exc)
                raise
            node = app.state.node = Node(settings, api, streams, client, me)
            node.on_refused = lambda reason: stop_serving(app, reason)
            app.state.on_exit = node.leave
            if settings.link == "dial":  # no registration: a link to each operator is the node's presence
                dialers = app.state.dialers = [Dialer(app, node, settings, url) for url in settings.operator_urls]
                for dialer in dialers:
                    await stack.enter_async_context(background(dialer.run(), f"link {dialer.operator}"))
                    stack.push_async_callback(dialer.close)  # before the loop stops: a clean close
                yield
                return
            try:
                await node.join()
            except StartupError as exc:
                app.state.startup_error = str(exc)
                raise
            stack.push_async_callback(node.deregister)  # once the heartbeats have stopped
            for operator in settings.operator_urls:
                await stack.enter_async_context(background(node.heartbeat(operator), f"heartbeat {operator}"))
            yield

    app = build_app("ODLA node agent", lifespan, settings, listen_host=settings.node_host)
    operator_only = [Depends(join_token_dependency(settings.join_token))]

    # async: FastAPI runs plain-def dependencies in a thread pool, a hand-off per request
    async def get_node(request: Request) -> Node:
        return request.app.state.node

    NodeDep = Annotated[Node, Depends(get_node)]

    @app.get("/health", response_model=p.HealthResponse)
    async def health(node: NodeDep) -> Response:
        ok = await node.refresh_models()
        state = node.state
        body = p.HealthResponse(status="healthy" if ok else "unhealthy", node_id=state.node_id,
                                models=state.models, error=state.ollama_error)
        return Response(body.model_dump_json(exclude_none=True), status_code=200 if ok else 503,
                        media_type="application/json")

    @app.get("/models", response_model=p.ModelsResponse)
    async def models(node: NodeDep) -> p.ModelsResponse:
        await node.refresh_models()
        return p.ModelsResponse(node_id=node.state.node_id, models=node.state.models)

    @app.post("/run", response_class=LineStream, dependencies=operator_only, responses=STREAM_RESPONSES,
              openapi_extra=openapi_body(p.RunRequest), summary="Execute an inference job (operator only)")
    async def run(request: Request, node: NodeDep) -> LineStream:
        """JSON lines: tokens as Ollama makes them, then one final line."""
        job = await read_body(request, p.RunRequest, settings)
        asked = node.receipts.asked(request.headers, await request.body())
        return LineStream(opening=lambda tell: node.open_job(job, asked))

    @app.api_route("/ollama/{path:path}", methods=["GET", "POST", "DELETE"], dependencies=operator_only,
                   response_class=LineStream, include_in_schema=False)
    async def ollama_door(path: str, request: Request, node: NodeDep) -> LineStream:
        """Ollama's own API relayed as is, for the operator's Ollama and OpenAI doors."""
        method, path = request.method, "/" + path
        if (method, path) not in OLLAMA_DOORS | MANAGING:  # never create or push through a node
            raise ODLAError(f"{method} {path} is not relayed to Ollama", 404)
        body = await request.body()
        if (method, path) in MANAGING:
            node.may_manage(request, method, "/ollama" + path, body)
        query, job_id = request.url.query, request.headers.get(p.JOB_HEADER, "")
        asked = node.receipts.asked(request.headers, body) if method == "POST" else None
        return LineStream(opening=lambda tell: node.open_ollama(method, path, query, body, job_id, asked),
                          shape=shape_for(path))

    return app


def main() -> None:
    if sys.argv[1:2] == ["claim"]:  # python node.py claim [--config FILE]: what this node earned, from the escrow
        from odla.node.claim import claim
        sys.exit(claim(script_settings("node", sys.argv[2:])))
    settings = script_settings("node")
    setup_logging(settings.log_level)
    tune_gc()
    log.info("node agent for Ollama at %s, operator(s) at %s", settings.ollama_host, ", ".join(settings.operator_urls))
    if settings.link == "dial":
        refused = run_dialled(create_app(settings))
        sys.exit(f"node: {refused}" if refused else 0)
    serve(create_app(settings), settings.node_host, settings.node_port, "node", timeout_keep_alive=75,
          request_timeout=settings.request_timeout, header_timeout=settings.header_timeout)


if __name__ == "__main__":
    main()
