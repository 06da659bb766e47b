"""A stand-in for Ollama's HTTP API, for tests, ``make demo`` and the benchmark.

    python sim/ollama_sim.py --port 11434 --models llama3,mistral --tokens 20 --delay 0.05

Answers as Ollama does (``server/routes.go``, ``docs/api.md``): ``GET|HEAD /``,
``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/generate``,
``/api/chat``, ``/api/embed`` and ``/api/embeddings``, streaming or not, and the
OpenAI-compatible ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` (server-sent events ending ``data: [DONE]``); 404
``model 'x' not found``; 503 when more requests wait than ``--max-queue``; a
mid-stream ``{"error": ...}`` line. Names resolve as Ollama resolves them.

Failure injection (flags, or ``POST /_sim/config`` with the same names at run time):
``crash_after`` K tokens (connection cut; ``--fail-after``), ``crash_rate`` (that share of streams
cut after a random number of tokens), ``error_after`` K tokens (error line), ``stall_after`` K
tokens (nothing more is sent, as from a generation that hangs, until the client leaves): K counts
the answer's tokens, so a continuation that starts past K is not cut,
``busy`` (503 to everything), ``hold_last`` (the last token waits for
``POST /_sim/release``), ``load_delay`` (seconds before the first token, as while Ollama
loads a model), ``num_parallel`` (requests beyond it queue, as with OLLAMA_NUM_PARALLEL),
``list_delay`` (seconds ``/api/tags`` takes; it answers with the models as they were when it began).
Tokens come ``delay`` apart at a steady rate, as a GPU makes them: a late wake-up of the host
delays one token, not every one after it. ``GET /_sim/stats`` counts requests, finished and cancelled ones, streams generating now
(``active``) and at most at once (``most_active``), ``queued``: requests that found
``num_parallel`` of their model running and had to wait (``queue_s``: the seconds they waited, all
together, so that its growth over a time is the queue's mean length), and ``cancelled_early``:
clients that left before the first token (queued, loading, or ``"stream": false``), which
Ollama, too, stops working for, and ``connections``: the client connections requests came on (a
client that keeps its connection open between requests makes one), and ``listing``: listings of
``/api/tags`` under way. With ``record`` on,
``GET /_sim/sent`` tells how many tokens each prompt's streams were sent (written to the
connection before any cut). The answer to a prompt is deterministic: ``sim_tokens(prompt, n)``.

A chat whose last message is the assistant's is continued as Ollama continues it: the answer picks
up after that message. The simulator's answer to a prompt and seed has a fixed length (``--tokens``)
that ``num_predict`` only cuts short, so an answer resumed from any of its token boundaries ends
exactly as the unbroken answer does.

A bare ASGI app, no framework: the benchmark drives thousands of tokens a second
through it, and what it costs falls on the direct and the relayed runs alike.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import sys
import time
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterator, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from odla.core.keep_alive import seconds_of  # noqa: E402
from odla.core.names import display_name, model_key  # noqa: E402

VERSION = "0.12.6"
CHEATS = ("substitute", "pad", "truncate")
DRIFT_AFTER = 4
PAD = 10
KEEP_ALIVE_S = 300.0
BUSY_MESSAGE = "server busy, please try again.  maximum pending requests exceeded"
Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


WORDS = (
    "nodes packets gossip quorum replicas latency tokens streams shards leaders followers "
    "clocks drift heartbeats routers queues caches models weights gradients kernels threads "
    "sockets bytes frames lines clusters racks fibers links paths hops peers votes logs "
    "entries commits snapshots batches epochs layers tensors prompts answers networks "
    "machines servers cores memory pages buffers signals timers events loops tasks jobs "
    "workers lanes rivers mountains clouds stars"
).split()


def sim_tokens(prompt: str, n: int) -> list[str]:
    """The simulator's answer to ``prompt``: ``n`` word tokens, deterministic and unique to the prompt."""
    seed = hashlib.blake2b(prompt.encode(), digest_size=16).digest()
    out = []
    for i in range(n):
        if i % 16 == 0:
            seed = hashlib.blake2b(seed, digest_size=16).digest()
        word = WORDS[seed[i % 16] % len(WORDS)]
        out.append(word.capitalize() if i == 0 else f" {word}")
    return out


LOAD_LOG = 100
"Loads kept by name in the stats (the count goes on)."


@dataclass
class Behaviour:
    """What the simulator does; every field can change at run time."""

    models: list[str] = field(default_factory=lambda: ["llama3"])
    tokens: int = 12
    delay: float = 0.0
    crash_after: Optional[int] = None
    crash_rate: float = 0.0
    "The share of streams cut after a random number of tokens (at least one, fewer than all)."
    record: bool = False
    "Count the tokens sent per prompt (``GET /_sim/sent``)."
    error_after: Optional[int] = None
    error_message: str = "an error was encountered while running the model: unexpected EOF"
    build: str = ""
    "Another build of the same models: it changes every model's digest (``--build``)."
    library: dict[str, int] = field(default_factory=lambda: dict(LIBRARY))
    "What ``/api/pull`` can fetch: model name -> its size in bytes (anything else: ``file does not exist``)."
    pull_rate: float = 2e9
    "Bytes a second that a pull downloads."
    disk: int = 0
    "Bytes of disk for models (0: no limit); a pull past it fails with ``no space left on device``."
    stall_after: Optional[int] = None
    "After K tokens send nothing more, until the client leaves (a generation that hangs)."
    busy: bool = False
    hold_last: bool = False
    load_delay: float = 0.0
    "Seconds before every first token (a long prompt being read)."
    load_ms: float = 0.0
    "Milliseconds to load a model that is not in memory."
    list_delay: float = 0.0
    "Seconds ``/api/tags`` takes (a slow disk): a listing begun before a pull ends answers after it, without it."
    max_loaded: int = 0
    "Models in memory at once (OLLAMA_MAX_LOADED_MODELS; 0: no limit); the least recently used idle one goes."
    num_parallel: int = 0
    "Requests that run at once (0: no limit)."
    max_queue: int = 512
    cheat: Optional[str] = None
    """A dishonest node (``CHEATS``): ``substitute`` answers with another model's tokens under the
    claimed name; ``pad`` reports ``PAD`` more ``eval_count`` than it sent tokens; ``truncate`` stops
    after half its tokens and says it finished."""
    seeded: bool = False
    "Answers follow ``options.seed`` (OpenAI: ``seed``), as Ollama's on one build do; no seed: a new answer each time."
    drift: float = 0.0
    "Each token after the first few differs with this probability (an honest GPU of another make)."
    prompt_ms_per_token: float = 0.0
    """Milliseconds to read each prompt token its slot's cache does not hold (0: prompts cost nothing).
    Each of a model's ``num_parallel`` slots (4 without a limit) keeps the tokens of its last
    request and answer, and a request takes the free slot sharing the longest prefix with its
    prompt, as Ollama's runner does (``findLongestCacheSlot``)."""

    def update(self, values: dict[str, Any]) -> None:
        names = {f.name for f in fields(self)}
        for key, value in values.items():
            if key not in names:
                raise ValueError(f"unknown setting {key!r}")
            setattr(self, key, value)


def now_rfc3339() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


LIBRARY = {"llama3": 4661224676, "mistral": 4113301824, "qwen2": 4431400262, "phi3": 2176178913,
           "gemma2": 5443152417, "tinyllama": 637700138}
"The registry the simulator pulls from: names and sizes as Ollama's library has them."
SIZE = 4661224676
"A model's size when the simulator was started with it."


def digest(name: str, build: str = "") -> str:
    return hashlib.sha256((model_key(name) + build).encode()).hexdigest()


def _compact(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


class Simulator:
    """The ASGI app."""

    def __init__(self, behaviour: Behaviour) -> None:
        self.b = behaviour
        # cancelled_early: clients gone before the first token (queued, loading, or "stream": false)
        self.stats = {"requests": 0, "completed": 0, "cancelled": 0, "cancelled_early": 0, "active": 0,
                      "most_active": 0, "errors": 0, "loads": 0, "queued": 0, "stalled": 0, "pulls": 0, "pulls_cut": 0,
                      "queue_s": 0.0, "prompt_tokens": 0, "cached_tokens": 0, "loaded": [], "listing": 0}
        # loaded: the first LOAD_LOG models it loaded, each with the one it pushed out ("llama3:latest<-mistral:latest")
        self.peers: set[tuple] = set()  # the client addresses requests came from: ``connections`` in the stats
        self.sent: dict[str, int] = {}  # prompt -> tokens its streams were sent (``record``)
        self.random = random.Random(0)
        self.release = asyncio.Event()
        self.loaded: dict[str, float] = {}  # model key -> when Ollama would unload it (epoch seconds)
        self.last_request: dict = {}  # the last /api/generate or /api/chat body, for tests: GET /_sim/last
        self._running: dict[str, int] = {}  # per model key
        self.caches: dict[str, list[list[str]]] = {}  # per model key: each slot's cached tokens
        self.cache_busy: dict[str, set[int]] = {}  # per model key: the slots in use
        self._waiting = 0
        self._cond: Optional[asyncio.Condition] = None
        self.loading_until: dict[str, float] = {}  # model key -> when its load ends (epoch seconds)
        self.last_used: dict[str, float] = {}
        self.sizes: dict[str, int] = {}  # model key -> bytes on disk, when not SIZE (pulled, copied)

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        method, path = scope["method"], scope["path"]
        peer = tuple(scope.get("client") or ())
        if peer and not path.startswith("/_sim/"):
            self.peers.add(peer)
        handler = ROUTES.get(path)
        if handler is None:
            await respond(send, 404, b"404 page not found", "text/plain")
            return
        if method == "HEAD" and path == "/":
            await respond(send, 200, b"", "text/plain; charset=utf-8")
            return
        allowed = "GET" if path in GET_ROUTES else "DELETE" if path == "/api/delete" else "POST"
        if method != allowed:
            await respond(send, 405, b"405 method not allowed", "text/plain")
            return
        body = await read_body(receive) if method != "GET" else b""
        await handler(self, body, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return

    def find(self, name: str) -> Optional[str]:
        key = model_key(name)
        return next((m for m in self.b.models if model_key(m) == key), None)

    # --- the routes ------------------------------------------------------------

    async def root(self, body: bytes, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"Ollama is running", "text/plain; charset=utf-8")

    async def version(self, body: bytes, receive: Receive, send: Send) -> None:
        await respond_json(send, 200, {"version": VERSION})

    async def tags(self, body: bytes, receive: Receive, send: Send) -> None:
        models = [self.model_entry(m) for m in self.b.models]  # as they are when the listing begins
        self.stats["listing"] += 1  # listings under way
        try:
            if self.b.list_delay:
                await asyncio.sleep(self.b.list_delay)
        finally:
            self.stats["listing"] -= 1
        await respond_json(send, 200, {"models": models})

    async def ps(self, body: bytes, receive: Receive, send: Send) -> None:
        now = time.time()
        models = []
        for name in [m for m in self.b.models if self.loaded.get(model_key(m), 0) > now]:
            entry = self.model_entry(name)
            entry.pop("modified_at")
            expires = datetime.fromtimestamp(self.loaded[model_key(name)], tz=timezone.utc)
            entry.update(expires_at=expires.isoformat().replace("+00:00", "Z"), size_vram=entry["size"],
                         context_length=4096)
            models.append(entry)
        await respond_json(send, 200, {"models": models})

    def used(self, model: str, keep_alive: Any = None) -> None:
        """A request ran ``model``: it stays loaded for ``keep_alive`` (Ollama's default 5 minutes)."""
        seconds = seconds_of(keep_alive)
        seconds = KEEP_ALIVE_S if seconds is None else seconds
        self.loaded[model_key(model)] = min(time.time() + seconds, 1e10)  # -1 (forever): shown as a far date, as Ollama does

    def model_entry(self, name: str) -> dict:
        shown = display_name(name)
        family = model_key(name).split(":")[0].rsplit("/", 1)[-1]
        return {
            "name": shown,
            "model": shown,
            "modified_at": "2026-01-01T00:00:00Z",
            "size": self.sizes.get(model_key(name), SIZE),
            "digest": digest(name, self.b.build),
            "details": self.details(family),
        }

    @staticmethod
    def details(family: str) -> dict:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": family,
            "families": [family],
            "parameter_size": "8.0B",
            "quantization_level": "Q4_0",
        }

    # --- model management, as Ollama's PullHandler, DeleteHandler and CopyHandler answer -------------

    def disk_used(self) -> int:
        return sum(self.sizes.get(model_key(m), SIZE) for m in self.b.models)

    async def pull(self, body: bytes, receive: Receive, send: Send) -> None:
        """Progress lines: the manifest, each layer with its bytes, the checks, ``success``; an error
        line once lines have gone (a 500 before); ``"stream": false``: the last line alone."""
        req = await self.parse(body, send)
        if req is None:
            return
        name = req.get("model") or req.get("name")
        if not isinstance(name, str) or not name:
            await respond_json(send, 400, {"error": "model is required"})
            return
        stream = req.get("stream") is not False
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        started = False
        self.stats["pulls"] += 1

        async def say(obj: dict) -> None:
            nonlocal started
            if stream:
                if not started:
                    started = True
                    await send_start(send, 200, "application/x-ndjson")
                await send_body(send, _compact(obj) + b"\n")

        async def fail(message: str) -> None:
            if started:
                await send_body(send, _compact({"error": message}) + b"\n", more=False)
            else:
                await respond_json(send, 500, {"error": message})

        try:
            await say({"status": "pulling manifest"})
            size = self.b.library.get(model_key(name).split(":")[0].rsplit("/", 1)[-1])
            if size is None:
                await fail("pull model manifest: file does not exist")
                return
            present = self.find(name)
            layers = [(size - 12_400, "model"), (12_000, "license"), (400, "params")]
            room = self.b.disk - (self.disk_used() - (self.sizes.get(model_key(name), SIZE) if present else 0)) \
                if self.b.disk else None
            for i, (total, kind) in enumerate(layers):
                layer = "sha256:" + hashlib.sha256(f"{model_key(name)}{self.b.build}{kind}".encode()).hexdigest()
                done, step = 0, max(1, int(self.b.pull_rate * 0.05))  # a line each 50 ms of download
                while True:
                    if room is not None and done > room:
                        await fail(f"write /root/.ollama/models/blobs/{layer.replace(':', '-')}-partial: "
                                   "no space left on device")
                        return
                    await say({"status": f"pulling {layer[7:19]}", "digest": layer, "total": total,
                               "completed": done})
                    if done >= total:
                        break
                    await first_of(asyncio.sleep(min(step, total - done) / self.b.pull_rate), watcher)
                    if watcher.done():  # the client left: the pull stops, nothing is written
                        self.stats["pulls_cut"] += 1
                        return
                    done = min(total, done + step)
                if room is not None:
                    room -= total
            await say({"status": "verifying sha256 digest"})
            await say({"status": "writing manifest"})
            if not present:
                self.b.models.append(display_name(name))
            self.sizes[model_key(name)] = size
            if stream:
                await say({"status": "success"})
                await send_body(send, b"", more=False)
            else:
                await respond_json(send, 200, {"status": "success"})
        finally:
            watcher.cancel()

    async def delete(self, body: bytes, receive: Receive, send: Send) -> None:
        req = await self.parse(body, send)
        if req is None:
            return
        name = req.get("model") or req.get("name") or ""
        present = self.find(str(name))
        if present is None:
            await respond_json(send, 404, {"error": f"model '{name}' not found"})
            return
        self.b.models.remove(present)
        self.sizes.pop(model_key(present), None)
        self.loaded.pop(model_key(present), None)
        await respond(send, 200, b"", "text/plain; charset=utf-8")

    async def copy(self, body: bytes, receive: Receive, send: Send) -> None:
        req = await self.parse(body, send)
        if req is None:
            return
        source, destination = req.get("source"), req.get("destination")
        if not isinstance(destination, str) or not destination:
            await respond_json(send, 400, {"error": f"destination {json.dumps(destination or '')} is invalid"})
            return
        present = self.find(str(source or ""))
        if present is None:
            await respond_json(send, 404, {"error": f"model {json.dumps(source)} not found"})
            return
        if self.find(destination) is None:
            self.b.models.append(display_name(destination))
        self.sizes[model_key(destination)] = self.sizes.get(model_key(present), SIZE)
        await respond(send, 200, b"", "text/plain; charset=utf-8")

    async def show(self, body: bytes, receive: Receive, send: Send) -> None:
        req = await self.parse(body, send)
        if req is None or not await self.check_model(req, send, field_names=("model", "name")):
            return
        name = req.get("model") or req.get("name")
        family = model_key(name).split(":")[0].rsplit("/", 1)[-1]
        await respond_json(send, 200, {
            "license": "simulated",
            "modelfile": f"FROM {display_name(name)}\n",
            "parameters": "stop \"<|eot_id|>\"",
            "template": "{{ .Prompt }}",
            "details": self.details(family),
            "model_info": {"general.architecture": family, "general.parameter_count": 8030261248},
            "capabilities": ["embedding"] if "embed" in family else ["completion"],
            "modified_at": "2026-01-01T00:00:00Z",
        })

    async def generate(self, body: bytes, receive: Receive, send: Send) -> None:
        await self.complete(body, receive, send, chat=False)

    async def chat(self, body: bytes, receive: Receive, send: Send) -> None:
        await self.complete(body, receive, send, chat=True)

    async def embed(self, body: bytes, receive: Receive, send: Send) -> None:
        req = await self.parse(body, send)
        if req is None or not await self.check_model(req, send):
            return
        inputs = req.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else inputs
        await respond_json(send, 200, {
            "model": req["model"],
            "embeddings": [vector(text) for text in inputs],
            "total_duration": 1000000, "load_duration": 1000, "prompt_eval_count": len(inputs),
        })

    async def embeddings(self, body: bytes, receive: Receive, send: Send) -> None:
        req = await self.parse(body, send)
        if req is None or not await self.check_model(req, send):
            return
        await respond_json(send, 200, {"embedding": vector(req.get("prompt", ""))})

    # --- OpenAI-compatible doors (Ollama's openai/openai.go shapes) ----------------------

    async def v1_models(self, body: bytes, receive: Receive, send: Send) -> None:
        data = [{"id": display_name(m), "object": "model", "created": 1767225600,
                 "owned_by": model_key(m).rsplit("/", 1)[0] if "/" in model_key(m) else "library"}
                for m in self.b.models]
        await respond_json(send, 200, {"object": "list", "data": data})

    async def v1_embeddings(self, body: bytes, receive: Receive, send: Send) -> None:
        req = await self.parse_openai(body, send)
        if req is None:
            return
        inputs = req.get("input", [])
        inputs = [inputs] if isinstance(inputs, str) else inputs
        data = [{"object": "embedding", "embedding": vector(text), "index": i} for i, text in enumerate(inputs)]
        await respond_json(send, 200, {"object": "list", "data": data, "model": req["model"],
                                       "usage": {"prompt_tokens": len(inputs), "total_tokens": len(inputs)}})

    async def v1_chat(self, body: bytes, receive: Receive, send: Send) -> None:
        await self.v1_complete(body, receive, send, chat=True)

    async def v1_completions(self, body: bytes, receive: Receive, send: Send) -> None:
        await self.v1_complete(body, receive, send, chat=False)

    async def parse_openai(self, body: bytes, send: Send) -> Optional[dict]:
        try:
            req = json.loads(body or b"null")
        except ValueError as exc:
            await respond_json(send, 400, openai_error(400, str(exc)))
            return None
        if not isinstance(req, dict) or not req.get("model"):
            await respond_json(send, 400, openai_error(400, "model is required"))
            return None
        if self.b.busy:
            await respond_json(send, 503, openai_error(503, BUSY_MESSAGE))
            return None
        if self.find(req["model"]) is None:
            await respond_json(send, 404, openai_error(404, f"model '{req['model']}' not found"))
            return None
        return req

    async def v1_complete(self, body: bytes, receive: Receive, send: Send, *, chat: bool) -> None:
        req = await self.parse_openai(body, send)
        if req is None:
            return
        self.stats["requests"] += 1
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            async with self.slot(watcher, req["model"]) as slot:
                if not slot.held or not await self.load(watcher):
                    self.stats["cancelled"] += 1
                    self.stats["cancelled_early"] += 1
                    return
                self.used(req["model"])
                await self.v1_answer(req, watcher, send, chat=chat)
        finally:
            watcher.cancel()

    async def v1_answer(self, req: dict, watcher: asyncio.Future, send: Send, *, chat: bool) -> None:
        prompt = self.prompt_of(req, chat)
        tokens, at = self.answer_of(req, prompt, chat, openai=True)
        ident = ("chatcmpl-" if chat else "cmpl-") + hashlib.blake2b(prompt.encode(), digest_size=4).hexdigest()
        completion = len(tokens) + (PAD if self.b.cheat == "pad" else 0)
        usage = {"prompt_tokens": 1, "completion_tokens": completion, "total_tokens": completion + 1}
        base = {"id": ident, "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": req["model"], "system_fingerprint": "fp_ollama"}
        if not req.get("stream"):
            await first_of(asyncio.sleep(self.b.delay * len(tokens)), watcher)
            if watcher.done():
                self.stats["cancelled"] += 1
                self.stats["cancelled_early"] += 1
                return
            text = "".join(tokens)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
                      if chat else {"text": text, "index": 0, "finish_reason": "stop"})
            await respond_json(send, 200, {**base, "choices": [choice], "usage": usage})
            self.stats["completed"] += 1
            return
        if chat:
            base["object"] = "chat.completion.chunk"
        cut, _, stall = self.cuts(len(tokens), at)
        with_usage = bool((req.get("stream_options") or {}).get("include_usage"))
        pace = Pace(self.b.delay)
        for i, token in enumerate([*tokens, ""]):
            if i == cut:
                raise ConnectionAbortedError("simulated crash")
            if i == stall and i:
                await self.stall(watcher)
                return
            if self.b.delay and token:
                await pace.next(watcher)
            if watcher.done():
                self.stats["cancelled"] += 1
                self.stats["cancelled_early"] += i == 0
                return
            if i == 0:  # Ollama's headers leave with its first output
                await send_start(send, 200, "text/event-stream")
            reason = None if token else "stop"
            choice = ({"index": 0, "delta": {"role": "assistant", "content": token}, "finish_reason": reason}
                      if chat else {"text": token, "index": 0, "finish_reason": reason})
            event = {**base, "choices": [choice]}
            if not chat and with_usage:  # Ollama's CompleteWriter gives every event an empty usage then
                event["usage"] = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
            await send_body(send, b"data: " + _compact(event) + b"\n\n")
            if token:
                self.sent_one(prompt)
        if with_usage:
            await send_body(send, b"data: " + _compact({**base, "choices": [], "usage": usage}) + b"\n\n")
        await send_body(send, b"data: [DONE]\n\n", more=False)
        self.stats["completed"] += 1

    async def sim_config(self, body: bytes, receive: Receive, send: Send) -> None:
        try:
            self.b.update(json.loads(body or b"{}"))
        except (ValueError, TypeError) as exc:
            await respond_json(send, 400, {"error": str(exc)})
            return
        self.release.clear()
        await respond_json(send, 200, {f.name: getattr(self.b, f.name) for f in fields(self.b)})

    async def sim_release(self, body: bytes, receive: Receive, send: Send) -> None:
        self.release.set()
        await respond_json(send, 200, {"released": True})

    async def sim_stats(self, body: bytes, receive: Receive, send: Send) -> None:
        await respond_json(send, 200, {**self.stats, "connections": len(self.peers)})

    async def sim_sent(self, body: bytes, receive: Receive, send: Send) -> None:
        await respond_json(send, 200, self.sent)

    async def sim_last(self, body: bytes, receive: Receive, send: Send) -> None:
        await respond_json(send, 200, self.last_request)

    # --- generation --------------------------------------------------------------

    async def parse(self, body: bytes, send: Send) -> Optional[dict]:
        if not body:
            await respond_json(send, 400, {"error": "missing request body"})
            return None
        try:
            req = json.loads(body)
        except ValueError as exc:
            await respond_json(send, 400, {"error": str(exc)})
            return None
        if not isinstance(req, dict):
            await respond_json(send, 400, {"error": "json: cannot unmarshal into Go value"})
            return None
        options = req.get("options")
        if options is not None and not isinstance(options, dict):  # Go's binding refuses it: 400, as Ollama does
            kind = {str: "string", list: "array", bool: "bool"}.get(type(options), "number")
            await respond_json(send, 400, {"error": f"json: cannot unmarshal {kind} into Go struct field "
                                                    ".options of type map[string]interface {{}}"})
            return None
        return req

    async def check_model(self, req: dict, send: Send, field_names: tuple = ("model",)) -> bool:
        name = next((req.get(f) for f in field_names if req.get(f)), None)
        if not name:
            await respond_json(send, 400, {"error": "model is required"})
            return False
        if self.b.busy:
            await respond_json(send, 503, {"error": BUSY_MESSAGE})
            return False
        if self.find(name) is None:
            await respond_json(send, 404, {"error": f"model '{name}' not found"})
            return False
        return True

    async def complete(self, body: bytes, receive: Receive, send: Send, *, chat: bool) -> None:
        req = await self.parse(body, send)
        if req is None or not await self.check_model(req, send):
            return
        if self._waiting >= self.b.max_queue:
            await respond_json(send, 503, {"error": BUSY_MESSAGE})
            return
        self.stats["requests"] += 1
        self.last_request = req
        prompt = self.prompt_of(req, chat)
        watcher = asyncio.ensure_future(wait_disconnect(receive))
        try:
            async with self.slot(watcher, req["model"]) as slot:  # Ollama drops a queued request whose client left
                if not slot.held or not await self.load(watcher):
                    self.stats["cancelled"] += 1
                    self.stats["cancelled_early"] += 1
                    return
                self.used(req["model"], req.get("keep_alive"))
                await self.answer(req, prompt, watcher, send, chat=chat, waited_s=slot.waited_s)
        finally:
            watcher.cancel()

    async def load(self, watcher: asyncio.Future) -> bool:
        """The wait before the first token; False when the client left during it."""
        if self.b.load_delay:
            await first_of(asyncio.sleep(self.b.load_delay), watcher)
        return not watcher.done()

    def answer_of(self, req: dict, prompt: str, chat: bool, openai: bool = False) -> tuple[list[str], int]:
        """The tokens to send: the answer (``--tokens`` long), after a trailing assistant message
        when the request continues one, at most as many as the request allows (``num_predict``;
        OpenAI's ``max_tokens``); and how many of the answer's tokens that message held."""
        tokens = self.tokens_for(req, prompt, self.b.tokens, openai)
        messages = req.get("messages") if chat else None
        last = messages[-1] if isinstance(messages, list) and messages and isinstance(messages[-1], dict) else {}
        at = 0
        if last.get("role") == "assistant" and last.get("content"):
            rest = continued(tokens, str(last["content"]))
            tokens, at = rest, len(tokens) - len(rest)
        cap = req.get("max_tokens") if openai else (req.get("options") or {}).get("num_predict")
        return (tokens[:cap] if isinstance(cap, int) and cap >= 0 else tokens), at

    def cuts(self, count: int, at: int) -> tuple[Optional[int], Optional[int], Optional[int]]:
        """Where a stream of ``count`` tokens that starts at the answer's token ``at`` is cut: the
        connection (``crash_after``, ``crash_rate``), an error line, a stall. Each counts the answer's
        tokens: a continuation is cut only past where it starts (so another node can finish it)."""
        def here(k: Optional[int]) -> Optional[int]:
            return None if k is None or at and k <= at else k - at
        crash = here(self.b.crash_after) if self.b.crash_after is not None else self.cut_at(count)
        return crash, here(self.b.error_after), here(self.b.stall_after)

    @staticmethod
    def prompt_of(req: dict, chat: bool) -> str:
        if not chat:
            return str(req.get("prompt", ""))
        messages = [m for m in req.get("messages") or [] if isinstance(m, dict)]
        if messages and messages[-1].get("role") == "assistant":  # continued: the prompt is what came before
            messages = messages[:-1]
        return str(messages[-1].get("content", "")) if messages else ""

    def cut_at(self, count: int) -> Optional[int]:
        """Where a stream of ``count`` tokens is cut: ``crash_after``, or by ``crash_rate`` a random place."""
        if self.b.crash_after is not None or not self.b.crash_rate or count < 2:
            return self.b.crash_after
        return self.random.randrange(1, count) if self.random.random() < self.b.crash_rate else None

    def sent_one(self, prompt: str) -> None:
        if self.b.record:
            self.sent[prompt] = self.sent.get(prompt, 0) + 1

    def slot(self, watcher: asyncio.Future, model: str) -> "_Slot":
        return _Slot(self, watcher, model)

    def is_loaded(self, key: str) -> bool:
        return self.loaded.get(key, 0.0) > time.time()

    async def answer(self, req: dict, prompt: str, watcher: asyncio.Future, send: Send, *, chat: bool,
                     waited_s: float = 0.0) -> None:
        b = self.b
        tokens, at = self.answer_of(req, prompt, chat)
        started = time.perf_counter_ns()
        if b.prompt_ms_per_token:
            with self.cache_slot(req, chat, tokens) as read:
                await first_of(asyncio.sleep(read * b.prompt_ms_per_token / 1000), watcher)
                if watcher.done():
                    self.stats["cancelled"] += 1
                    self.stats["cancelled_early"] += 1
                    return
                await self._answer(req, prompt, tokens, started, watcher, send, chat=chat, waited_s=waited_s,
                                   read=read, at=at)
            return
        await self._answer(req, prompt, tokens, started, watcher, send, chat=chat, waited_s=waited_s, at=at)

    @contextlib.contextmanager
    def cache_slot(self, req: dict, chat: bool, answer: list[str]) -> Iterator[int]:
        """The free slot whose cache shares the longest prefix with the request's prompt, held while
        it answers; gives the count of prompt tokens to read. The slot then caches prompt and answer."""
        key = model_key(req["model"])
        slots = self.caches.setdefault(key, [[] for _ in range(self.b.num_parallel or 4)])
        busy = self.cache_busy.setdefault(key, set())
        prompt = prompt_tokens(req, chat)
        free = [i for i in range(len(slots)) if i not in busy] or list(range(len(slots)))
        shared = {i: _shared(slots[i], prompt) for i in free}
        slot = max(free, key=lambda i: (shared[i], -len(slots[i])))  # longest prefix, else the emptiest
        read = len(prompt) - shared[slot]
        self.stats["prompt_tokens"] += len(prompt)
        self.stats["cached_tokens"] += shared[slot]
        busy.add(slot)
        try:
            yield read
        finally:
            busy.discard(slot)
            slots[slot] = prompt + (["assistant:"] if chat else []) + "".join(answer).split()

    async def _answer(self, req: dict, prompt: str, tokens: list[str], started: int, watcher: asyncio.Future,
                      send: Send, *, chat: bool, waited_s: float, read: int = 1, at: int = 0) -> None:
        model, b = req["model"], self.b
        if req.get("stream") is False:
            await self.answer_whole(model, tokens, started, chat, watcher, waited_s, read)(send)
            return
        self.stats["active"] += 1
        self.stats["most_active"] = max(self.stats["most_active"], self.stats["active"])
        cut, error, stall = self.cuts(len(tokens), at)
        pace = Pace(b.delay)
        try:
            for i, token in enumerate(tokens):
                if i in (error, cut) and i == 0:
                    await send_start(send, 200, "application/x-ndjson")
                if i == error:
                    self.stats["errors"] += 1
                    await send_body(send, _compact({"error": b.error_message}) + b"\n", more=False)
                    return
                if i == cut:
                    raise ConnectionAbortedError("simulated crash")
                if i == stall and i:
                    await self.stall(watcher)
                    return
                if b.hold_last and i == len(tokens) - 1:
                    await first_of(self.release.wait(), watcher)
                elif b.delay:
                    await pace.next(watcher)
                if watcher.done():
                    self.stats["cancelled"] += 1
                    self.stats["cancelled_early"] += i == 0
                    return
                if i == 0:  # Ollama's headers leave with its first output
                    await send_start(send, 200, "application/x-ndjson")
                await send_body(send, self.part(model, token, chat) + b"\n")
                self.sent_one(prompt)
            if not tokens:
                await send_start(send, 200, "application/x-ndjson")
            final = self.cheated(self.final(model, tokens, started, chat, waited_s, read, self.b.prompt_ms_per_token))
            await send_body(send, _compact(final) + b"\n", more=False)
            self.stats["completed"] += 1
        finally:
            self.stats["active"] -= 1

    async def stall(self, watcher: asyncio.Future) -> None:
        """Send nothing more until the client leaves, as a generation that hangs does."""
        self.stats["stalled"] += 1
        await asyncio.wait((watcher,))
        self.stats["cancelled"] += 1

    def answer_whole(self, model: str, tokens: list[str], started: int, chat: bool, watcher: asyncio.Future,
                     waited_s: float = 0.0, read: int = 1):
        """``"stream": false``: the whole answer, sent once generated (nothing before it)."""
        async def whole(send: Send) -> None:
            if self.b.error_after is not None and self.b.error_after < len(tokens):
                await respond_json(send, 500, {"error": self.b.error_message})
                return
            await first_of(asyncio.sleep(self.b.delay * len(tokens)), watcher)
            if watcher.done():
                self.stats["cancelled"] += 1
                self.stats["cancelled_early"] += 1
                return
            final = self.cheated(self.final(model, tokens, started, chat, waited_s, read, self.b.prompt_ms_per_token))
            if chat:
                final["message"]["content"] = "".join(tokens)
            else:
                final["response"] = "".join(tokens)
            body = _compact(final)
            if self.b.crash_after is not None:  # cut mid-body: Content-Length promises more than comes
                await send({"type": "http.response.start", "status": 200, "headers": [
                    (b"content-type", b"application/json; charset=utf-8"), (b"content-length", b"%d" % len(body))]})
                await send_body(send, body[: len(body) // 2])
                raise ConnectionAbortedError("simulated crash")
            await respond_json(send, 200, final)
            self.stats["completed"] += 1
        return whole

    def tokens_for(self, req: dict, prompt: str, n: int, openai: bool = False) -> list[str]:
        """The answer: ``sim_tokens(prompt, n)``; with ``seeded``, one that follows the request's seed
        as Ollama's sampling does (the same model, prompt, options and seed: the same tokens; no seed:
        new ones each time); a cheat's or a drifting node's as they would differ."""
        b, key = self.b, prompt
        if b.seeded:
            options = dict(req.get("options") or {}) if not openai else {
                k: req[k] for k in ("seed", "temperature", "top_p", "max_tokens") if k in req}
            seed = options.pop("seed", None)
            options.pop("num_predict", None)  # a limit, not a way of sampling: the answer is cut, not changed
            options.pop("max_tokens", None)
            seed = seed if seed is not None else random.getrandbits(64)  # sampled: an answer of its own
            key = f"{model_key(str(req.get('model', '')))}\x00{prompt}\x00{json.dumps(options, sort_keys=True)}\x00{seed}"
        if b.cheat == "substitute":  # a smaller model under the claimed name: other words
            key = "a smaller model\x00" + key
        tokens = sim_tokens(key, n)
        if b.cheat == "truncate":  # stops early and says it finished
            tokens = tokens[:max(1, n // 2)]
        if b.drift:  # an honest GPU of another make: now and then a different token, after the first few
            tokens = [t if i < DRIFT_AFTER or random.random() >= b.drift else f" {WORDS[random.randrange(len(WORDS))]}"
                      for i, t in enumerate(tokens)]
        return tokens

    def cheated(self, final: dict) -> dict:
        """A cheating node's final message: ``pad`` counts more tokens than it sent."""
        if self.b.cheat == "pad":
            final["eval_count"] += PAD
        return final

    @staticmethod
    def part(model: str, token: str, chat: bool) -> bytes:
        now = now_rfc3339()
        if chat:
            return _compact({"model": model, "created_at": now,
                             "message": {"role": "assistant", "content": token}, "done": False})
        return _compact({"model": model, "created_at": now, "response": token, "done": False})

    @staticmethod
    def final(model: str, tokens: list[str], started: int, chat: bool, waited_s: float = 0.0, read: int = 1,
              ms_per_token: float = 0.0) -> dict:
        took = time.perf_counter_ns() - started
        out: dict[str, Any] = {"model": model, "created_at": now_rfc3339()}
        if chat:
            out["message"] = {"role": "assistant", "content": ""}
        else:
            out["response"] = ""
        out.update(done=True, done_reason="stop")
        if not chat:
            out["context"] = list(range(1, len(tokens) + 1))
        read_ns = max(1000, int(read * ms_per_token * 1e6))  # the prompt tokens read, not those cached
        out.update(total_duration=took, load_duration=max(1000, int(waited_s * 1e9)), prompt_eval_count=max(1, read),
                   prompt_eval_duration=read_ns, eval_count=len(tokens), eval_duration=max(took - read_ns, 1))
        return out


def continued(tokens: list[str], before: str) -> list[str]:
    """What follows ``before`` in the answer ``tokens``: the rest of a token it ends inside, then the
    whole ones after it; a text the answer does not begin with is followed by no more tokens than
    it leaves (a model carries on from any text, just not with this answer)."""
    if not "".join(tokens).startswith(before):
        return tokens[min(len(tokens), len(before.split())):]
    out, at = [], 0
    for token in tokens:
        end = at + len(token)
        if end > len(before):
            out.append(token[max(0, len(before) - at):])
        at = end
    return out


def prompt_tokens(req: dict, chat: bool) -> list[str]:
    """A request's prompt as the simulator's tokens (words): a chat's messages in order, each after
    its role; a generate request's system prompt and prompt."""
    if not chat:
        return str(req.get("system") or "").split() + str(req.get("prompt", "")).split()
    out: list[str] = []
    for message in req.get("messages") or []:
        if isinstance(message, dict):
            out.append(f"{message.get('role', '')}:")
            out += str(message.get("content", "")).split()
    return out


def _shared(a: list[str], b: list[str]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class _Slot:
    """A runner slot for one model, as Ollama's scheduler gives it.

    ``num_parallel`` requests run per model at once (OLLAMA_NUM_PARALLEL); the rest wait, in
    arrival order, and a waiter whose client leaves is dropped. A model that is not in memory
    is loaded first (``load_ms``), after evicting the least recently used idle model when
    ``max_loaded`` are loaded already (OLLAMA_MAX_LOADED_MODELS); with none idle, the request
    waits for one. ``waited_s`` is the time spent waiting and loading: Ollama counts it in
    ``load_duration``.
    """

    def __init__(self, sim: Simulator, watcher: asyncio.Future, model: str) -> None:
        self.sim = sim
        self.watcher = watcher
        self.key = model_key(model)
        self.held = False
        self.waited_s = 0.0

    async def __aenter__(self) -> "_Slot":
        sim = self.sim
        began = time.perf_counter()
        if sim._cond is None:
            sim._cond = asyncio.Condition()
        waiting = asyncio.ensure_future(self._wait())
        await asyncio.wait((waiting, self.watcher), return_when=asyncio.FIRST_COMPLETED)
        sim.stats["queue_s"] += time.perf_counter() - began  # time in Ollama's queue, all requests together
        if not waiting.done():
            waiting.cancel()
            await asyncio.wait((waiting,))
        self.held = waiting.done() and not waiting.cancelled()
        if self.held and not self.watcher.done():
            loading = sim.loading_until.get(self.key, 0.0) - time.time()
            if loading > 0:
                await first_of(asyncio.sleep(loading), self.watcher)
        if self.held and self.watcher.done():  # got the slot as the client left: give it back
            await self._release()
        self.waited_s = time.perf_counter() - began
        return self

    def _can_run(self) -> bool:
        sim, b = self.sim, self.sim.b
        if b.num_parallel and sim._running.get(self.key, 0) >= b.num_parallel:
            return False
        return sim.is_loaded(self.key) or not b.max_loaded or self._room() is not None

    def _room(self) -> Optional[str]:
        """"" when a model can be loaded as it is, else the idle model to evict first; None: wait."""
        sim = self.sim
        loaded = [k for k in sim.loaded if sim.is_loaded(k)]
        if len(loaded) < sim.b.max_loaded:
            return ""
        idle = [k for k in loaded if not sim._running.get(k)]
        return min(idle, key=lambda k: sim.last_used.get(k, 0.0)) if idle else None

    async def _wait(self) -> None:
        sim, b = self.sim, self.sim.b
        async with sim._cond:
            if b.num_parallel and sim._running.get(self.key, 0) >= b.num_parallel:
                # Ollama queues it: its model's slots are all running. Counted under the lock, where the
                # requests before it have taken their slots (at arrival, one still on its way to its
                # slot was not yet counted as running, and a request that did wait went uncounted)
                sim.stats["queued"] += 1
            sim._waiting += 1
            try:
                await sim._cond.wait_for(self._can_run)
            finally:
                sim._waiting -= 1
            sim._running[self.key] = sim._running.get(self.key, 0) + 1
            if not sim.is_loaded(self.key):
                evict = self._room() if b.max_loaded else ""
                if evict:
                    sim.loaded.pop(evict, None)
                sim.loaded[self.key] = time.time() + KEEP_ALIVE_S
                sim.loading_until[self.key] = time.time() + b.load_ms / 1000
                sim.stats["loads"] += 1
                if len(sim.stats["loaded"]) < LOAD_LOG:
                    sim.stats["loaded"].append(f"{self.key}<-{evict}" if evict else self.key)

    async def __aexit__(self, *exc: object) -> None:
        await self._release()

    async def _release(self) -> None:
        sim = self.sim
        if not self.held or sim._cond is None:
            return
        self.held = False
        async with sim._cond:
            sim._running[self.key] -= 1
            sim.last_used[self.key] = time.time()
            sim._cond.notify_all()


def openai_error(status: int, message: str) -> dict:
    """Ollama's openai.NewError: the type follows the status."""
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


def vector(text: str) -> list[float]:
    raw = hashlib.sha256(str(text).encode()).digest()
    return [round(b / 255 - 0.5, 6) for b in raw[:8]]


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class Pace:
    """Tokens at a GPU's steady rate: the n-th is due ``n × delay`` after the first was asked for,
    however late the host woke for the one before (a sleep of ``delay`` per token would add every
    late wake-up of a busy machine to the answer, and make two equal simulated nodes unequal)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.due: Optional[float] = None

    async def next(self, watcher: asyncio.Future) -> None:
        now = asyncio.get_running_loop().time()
        self.due = (now if self.due is None else self.due) + self.delay
        await first_of(asyncio.sleep(max(0.0, self.due - now)), watcher)


async def first_of(awaitable: Awaitable, watcher: asyncio.Future) -> None:
    task = asyncio.ensure_future(awaitable)
    await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    task.cancel()


async def read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def send_start(send: Send, status: int, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode())]})


async def send_body(send: Send, body: bytes, more: bool = True) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": more})


async def respond(send: Send, status: int, body: bytes, content_type: str) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()),
                            (b"content-length", str(len(body)).encode())]})
    await send_body(send, body, more=False)


async def respond_json(send: Send, status: int, obj: Any) -> None:
    await respond(send, status, _compact(obj), "application/json; charset=utf-8")


ROUTES = {
    "/": Simulator.root,
    "/api/version": Simulator.version,
    "/api/tags": Simulator.tags,
    "/api/ps": Simulator.ps,
    "/api/show": Simulator.show,
    "/api/pull": Simulator.pull,
    "/api/delete": Simulator.delete,
    "/api/copy": Simulator.copy,
    "/api/generate": Simulator.generate,
    "/api/chat": Simulator.chat,
    "/api/embed": Simulator.embed,
    "/api/embeddings": Simulator.embeddings,
    "/v1/models": Simulator.v1_models,
    "/v1/chat/completions": Simulator.v1_chat,
    "/v1/completions": Simulator.v1_completions,
    "/v1/embeddings": Simulator.v1_embeddings,
    "/_sim/config": Simulator.sim_config,
    "/_sim/release": Simulator.sim_release,
    "/_sim/stats": Simulator.sim_stats,
    "/_sim/last": Simulator.sim_last,
    "/_sim/sent": Simulator.sim_sent,
}
GET_ROUTES = {"/", "/api/version", "/api/tags", "/api/ps", "/v1/models", "/_sim/stats", "/_sim/last", "/_sim/sent"}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Ollama API simulator for ODLA's tests, demo and benchmark.")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=11434, help="0 picks a free port (printed on start)")
    p.add_argument("--models", default="llama3", help="comma-separated model names")
    p.add_argument("--tokens", type=int, default=12, help="tokens per answer")
    p.add_argument("--delay", type=float, default=0.0, help="seconds between tokens")
    p.add_argument("--crash-after", "--fail-after", type=int, help="cut the connection after K tokens")
    p.add_argument("--error-after", type=int, help="send an error line after K tokens")
    p.add_argument("--pull-rate", type=float, default=2e9, help="bytes a second that /api/pull downloads")
    p.add_argument("--disk", type=int, default=0, help="bytes of disk for models (0: no limit)")
    p.add_argument("--build", default="", help="another build of the same models: other digests")
    p.add_argument("--stall-after", type=int, help="after K tokens send nothing more (a generation that hangs)")
    p.add_argument("--busy", action="store_true", help="answer 503 to every request")
    p.add_argument("--cheat", choices=CHEATS, help="cheat as a dishonest node would: substitute (another model's "
                   "tokens), pad (count more tokens than sent), truncate (stop at half, saying it finished)")
    p.add_argument("--seeded", action="store_true", help="answers follow options.seed; none: a new answer each time")
    p.add_argument("--drift", type=float, default=0.0, help="probability that a token after the first few differs")
    p.add_argument("--load-delay", type=float, default=0.0, help="seconds before the first token")
    p.add_argument("--num-parallel", "--parallel", type=int, default=0,
                   help="requests each model runs at once (0: no limit)")
    p.add_argument("--load-ms", type=float, default=0.0, help="milliseconds to load a model not in memory")
    p.add_argument("--max-loaded", type=int, default=0, help="models in memory at once (0: no limit)")
    p.add_argument("--preload", default="", help="comma-separated models in memory at start")
    p.add_argument("--max-queue", type=int, default=512, help="requests that may wait before 503")
    p.add_argument("--prompt-ms-per-token", type=float, default=0.0,
                   help="milliseconds to read each prompt token a slot's cache does not hold (0: free)")
    return p.parse_args(argv)


def build(args: argparse.Namespace) -> Simulator:
    sim = Simulator(Behaviour(
        models=[m.strip() for m in args.models.split(",") if m.strip()],
        tokens=args.tokens, delay=args.delay, crash_after=args.crash_after,
        error_after=args.error_after, stall_after=args.stall_after, build=args.build, pull_rate=args.pull_rate, disk=args.disk, busy=args.busy, cheat=args.cheat, seeded=args.seeded, drift=args.drift, load_delay=args.load_delay, load_ms=args.load_ms,
        max_loaded=args.max_loaded,
        num_parallel=args.num_parallel, max_queue=args.max_queue, prompt_ms_per_token=args.prompt_ms_per_token,
    ))
    for model in filter(None, (m.strip() for m in args.preload.split(","))):
        sim.used(model)
    return sim


def main(argv: Optional[list[str]] = None) -> None:
    import uvicorn

    args = parse_args(argv)
    config = uvicorn.Config(build(args), host=args.host, port=args.port, log_level="warning",
                            access_log=False, lifespan="on", timeout_keep_alive=30)
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.create_task(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            print(f"ollama simulator listening on http://{args.host}:{port}", flush=True)
        await task

    asyncio.run(serve())


if __name__ == "__main__":
    main()
