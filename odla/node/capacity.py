"""What a node tells the operator it can run: slots per model, models in memory, measured speed.

Ollama's API cannot be asked how many requests a model runs at once. Configured, the node says
so: ``num_parallel`` from config.json, else ``OLLAMA_NUM_PARALLEL`` read as Ollama reads it (an
unsigned integer; anything else is warned about and taken as 1; 0 means 1). Not configured (the
owner set OLLAMA_NUM_PARALLEL for the Ollama service only, as Ollama's docs say), the node
**learns** it, per model, from its own jobs (``Learning``): it starts at one slot and takes one
more each time ``RAISE_AFTER`` jobs in a row ran with every slot busy, none queued at Ollama and
the node's output not slower in total than with one job fewer; a job that queued at Ollama (its
``load_duration`` counts that wait: on a model already in memory, longer than a lone job's by more
than two tokens' time) or added nothing to the total
takes the slots back to what ran well, and that level is not probed again for ``FIRST_RETRY_S``,
twice as long each time it fails again, up to ``RETRY_S``. At
most ``max_slots``. Embedding models: 1 (Ollama runs those one at a time). Models in memory come
from ``/api/ps``; speed is a moving average of eval tokens per second from Ollama's final messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Mapping, Optional

import ollama

from odla.core.config import Settings
from odla.core.names import display_name, model_key
from odla.node.ollama_clients import OLLAMA_FAILURES
from odla.core.protocol import LoadedModel
from odla.core.usage import Usage

log = logging.getLogger("odla.node")
ALPHA = 0.3  # weight of the newest measurement in the moving average
PARALLEL_ENV = "OLLAMA_NUM_PARALLEL"  # read here, as Ollama reads it, not through config.ENV_KEYS
MAX_LOADED_ENV = "OLLAMA_MAX_LOADED_MODELS"
RAISE_AFTER = 2
"Jobs in a row that ran well with every slot busy before a learning node takes one more slot."
RETRY_S = 300.0
"How long, at most, a level at which Ollama queued (or slowed down) is not tried again."
FIRST_RETRY_S = 15.0
"The first time a level fails, it is tried again after this; each time after, twice as late (a wait can be noise)."
QUEUED_S = 0.05
"""A wait before the first token (Ollama's ``load_duration``, on a model in memory) longer than a job's
that ran alone, by this and by two tokens' time, is a wait in Ollama's queue."""
MORE_BY = 1.05
"With one job more, the node's total output per second must grow by this much to count as running well."


def num_parallel(settings: Settings, env: Mapping[str, str] = os.environ) -> Optional[int]:
    """Requests a (completion) model runs at once on this node's Ollama, as configured; None: not
    configured, so the node learns it."""
    if settings.num_parallel is not None:
        return settings.num_parallel
    raw = env.get(PARALLEL_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        log.warning("OLLAMA_NUM_PARALLEL=%r is not a whole number; taking 1, as Ollama does", raw)
        return 1
    return min(max(1, int(raw)), 65536)


def max_loaded(env: Mapping[str, str] = os.environ) -> Optional[int]:
    """Models this node's Ollama holds in memory at once, when its owner set OLLAMA_MAX_LOADED_MODELS
    (Ollama's default depends on its GPUs: None, and the operator learns it from what it sees held)."""
    raw = env.get(MAX_LOADED_ENV, "").strip()
    if not raw.isdigit() or int(raw) < 1:
        if raw:
            log.warning("OLLAMA_MAX_LOADED_MODELS=%r is not a count of models; not reported", raw)
        return None
    return min(int(raw), 4096)


@dataclass
class Learning:
    """What a node has learned of one model's parallelism at its Ollama."""

    slots: int = 1
    ceiling: Optional[int] = None
    "The fewest jobs at once at which Ollama queued or slowed down, until ``retry_at``."
    retry_at: float = 0.0
    good: int = 0
    "Jobs in a row that ran well with every slot busy."
    speed: dict[int, float] = field(default_factory=dict)
    "Per-stream output tokens per second with so many jobs at once (a moving average)."
    strikes: Counter[int] = field(default_factory=Counter)
    "Per level (jobs at once): how often Ollama queued or slowed down there."
    alone_wait: Optional[float] = None
    "The least wait before the first token of a job that ran alone: Ollama's own, with no queue."

    def queued(self, running: int, waited: float, per_token: float) -> bool:
        """Did a job that ran with ``running`` at once (itself included) wait in Ollama's queue?"""
        if running == 1:  # alone: whatever it waited was not a queue
            self.alone_wait = waited if self.alone_wait is None else min(self.alone_wait, waited)
            return False
        return waited > (self.alone_wait or 0.0) + max(QUEUED_S, 2 * per_token)

    def judge(self, running: int, queued: Optional[bool], speed: Optional[float], max_slots: int,
              now: float) -> bool:
        """One job that ran with ``running`` jobs at once (itself included) has ended; True when
        the slots changed. ``queued`` None: it cannot be told (the model was loaded for it)."""
        if queued is None:
            return False
        if speed:
            old = self.speed.get(running)
            self.speed[running] = speed if old is None else ALPHA * speed + (1 - ALPHA) * old
        fewer = self.speed.get(running - 1)
        slower = running > 1 and speed is not None and fewer is not None and \
            running * self.speed[running] <= (running - 1) * fewer * MORE_BY
        if queued or slower:
            before = self.slots
            self.strikes[running] += 1
            self.slots, self.good = max(1, running - 1), 0
            self.ceiling = running
            self.retry_at = now + min(RETRY_S, FIRST_RETRY_S * 2 ** (self.strikes[running] - 1))
            return self.slots != before
        if running < self.slots:
            return False  # a slot was free: this says nothing of one more
        self.good += 1
        may = self.ceiling is None or self.slots + 1 < self.ceiling or now >= self.retry_at
        if self.good >= RAISE_AFTER and self.slots < max_slots and may:
            self.slots, self.good = self.slots + 1, 0
            return True
        return False


@dataclass
class Running:
    """A job on this node's Ollama, counted from before it is sent until it ends."""

    model: str
    running: int
    "Jobs of its model at once, itself included, when it was sent."
    warm: bool
    "Its model was in Ollama's memory when it was sent (so a wait before its first token was a queue)."
    over: bool = False


class Capacity:
    """The node's report of what its Ollama can run, refreshed with its models."""

    def __init__(self, api: ollama.AsyncClient, parallel: Optional[int], max_slots: int = 16) -> None:
        self.api = api
        self.parallel = parallel
        "Configured; None: learned per model."
        self.max_slots = max_slots
        self.learning: dict[str, Learning] = {}
        self.running: Counter[str] = Counter()
        self.slots: dict[str, int] = {}
        self.loaded: list[LoadedModel] = []
        self.tokens_per_s: dict[str, float] = {}
        self._embedding: dict[str, bool] = {}
        self.max_loaded = max_loaded()
        "Models its Ollama holds at once, as configured (OLLAMA_MAX_LOADED_MODELS); None: not known here."

    @property
    def learned(self) -> bool:
        return self.parallel is None

    def slots_for(self, model: str) -> int:
        if self._embedding.get(model):
            return 1
        if self.parallel is not None:
            return self.parallel
        return self.learning.setdefault(model_key(model), Learning()).slots

    def started(self, model: str) -> Running:
        """A job for ``model`` is about to be sent to Ollama."""
        key = model_key(model)  # however the job spelled it
        self.running[key] += 1
        return Running(key, self.running[key], any(model_key(m.name) == key for m in self.loaded))

    def ended(self, job: Running, usage: Optional[Usage] = None) -> bool:
        """``job`` has ended, with Ollama's counts if it completed; True when the model's learned
        slots changed (the operator should hear so soon). Only its first call counts."""
        if job.over:
            return False
        job.over = True
        self.running[job.model] -= 1
        if self.running[job.model] <= 0:
            del self.running[job.model]
        if not self.learned or self._embedding.get(display_name(job.model)) or usage is None:
            return False
        load, count, generating = usage.load_duration, usage.output_tokens, usage.eval_duration
        if load is None or not count or not generating:
            return False
        waited, generated = load / 1e9, generating / 1e9
        learning = self.learning.setdefault(job.model, Learning())
        queued = learning.queued(job.running, waited, generated / count) if job.warm else None
        changed = learning.judge(job.running, queued, count / generated, self.max_slots, time.monotonic())
        if changed:
            log.info("%s: %d slot(s) on this node's Ollama (learned)", display_name(job.model), learning.slots)
            self.slots = {m: self.slots_for(m) for m in self.slots}
        return changed

    async def refresh(self, models: list[str], timeout: float) -> None:
        """Ask Ollama what is in memory, and what kind each new model is (once per model)."""
        try:
            ps = await asyncio.wait_for(self.api.ps(), timeout)
            self.loaded = [LoadedModel(name=m.model, expires_at=_stamp(m.expires_at)) for m in ps.models if m.model]
            for model in [m for m in models if m not in self._embedding]:
                shown = await asyncio.wait_for(self.api.show(model), timeout)
                capabilities = shown.capabilities or []
                self._embedding[model] = bool(capabilities) and "completion" not in capabilities
        except (asyncio.TimeoutError, *OLLAMA_FAILURES) as exc:
            log.info("could not read Ollama's loaded models or capabilities (%s)", type(exc).__name__)
        self.slots = {m: self.slots_for(m) for m in models}

    def measured(self, model: str, eval_count: Optional[int], eval_duration_ns: Optional[int]) -> None:
        """Fold one job's speed (Ollama's final message) into the model's moving average."""
        if not eval_count or not eval_duration_ns:
            return
        speed = eval_count / (eval_duration_ns / 1e9)
        old = self.tokens_per_s.get(model)
        self.tokens_per_s[model] = round(speed if old is None else ALPHA * speed + (1 - ALPHA) * old, 2)


def _stamp(value: object) -> Optional[str]:
    """The SDK gives ``expires_at`` as a datetime; the wire carries RFC 3339."""
    if value is None:
        return None
    iso = getattr(value, "isoformat", None)
    return iso() if iso is not None else str(value)
