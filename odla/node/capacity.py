"""What a node tells the operator it can run: slots per model, models in memory, measured speed.

Ollama's API cannot be asked how many requests a model runs at once, so the node says:
``num_parallel`` from config.json, else ``OLLAMA_NUM_PARALLEL`` read as Ollama reads it (an
unsigned integer, default 1; anything else is warned about and taken as 1; 0 means 1), and 1
for embedding models (Ollama runs those one at a time). Models in memory come from
``/api/ps``; speed is a moving average of eval tokens per second from Ollama's final messages.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Mapping, Optional

import ollama

from odla.core.config import Settings
from odla.serving.errors import OLLAMA_FAILURES
from odla.core.protocol import LoadedModel

log = logging.getLogger("odla.node")
ALPHA = 0.3  # weight of the newest measurement in the moving average
PARALLEL_ENV = "OLLAMA_NUM_PARALLEL"  # read here, as Ollama reads it, not through config.ENV_KEYS


def num_parallel(settings: Settings, env: Mapping[str, str] = os.environ) -> int:
    """Requests a (completion) model runs at once on this node's Ollama."""
    if settings.num_parallel is not None:
        return settings.num_parallel
    raw = env.get(PARALLEL_ENV, "").strip()
    if not raw:
        return 1
    if not raw.isdigit():
        log.warning("OLLAMA_NUM_PARALLEL=%r is not a whole number; taking 1, as Ollama does", raw)
        return 1
    return min(max(1, int(raw)), 65536)


class Capacity:
    """The node's report of what its Ollama can run, refreshed with its models."""

    def __init__(self, api: ollama.AsyncClient, parallel: int) -> None:
        self.api = api
        self.parallel = parallel
        self.slots: dict[str, int] = {}
        self.loaded: list[LoadedModel] = []
        self.tokens_per_s: dict[str, float] = {}
        self._embedding: dict[str, bool] = {}

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
        self.slots = {m: 1 if self._embedding.get(m) else self.parallel for m in models}

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
