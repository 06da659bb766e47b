"""How long a client may ask a node's Ollama to keep a model loaded (``keep_alive``), bounded by the
node owner's ``min_keep_alive`` and ``max_keep_alive``: on a shared node one client's ``-1`` would pin
a model for ever, and its ``0`` would unload it under everyone else.

Ollama takes a number of seconds or a Go duration (``"10m"``, ``"1h30m"``, ``"-1"``); a negative one
means for ever. What the node passes on is a number of seconds within the bounds.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Optional

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def seconds_of(value: Any) -> Optional[float]:
    """``keep_alive`` in seconds (``inf`` for a negative one); None when it is not one Ollama takes."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return math.inf if value < 0 else float(value)
    if not isinstance(value, str) or not value.strip():
        return None
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        return math.inf if number < 0 else number
    sign, rest = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    parts = _PART.findall(rest)
    if not parts or "".join(a + u for a, u in parts) != rest:
        return None
    total = sum(float(amount) * _UNITS[unit] for amount, unit in parts)
    return math.inf if sign < 0 and total > 0 else total


def bounded(value: Any, low: float, high: float) -> Any:
    """``value`` within [low, high] seconds: as it was when it is, else the nearer bound as a number; a
    value Ollama would refuse is left as it is (Ollama's own 400 says why)."""
    seconds = seconds_of(value)
    if seconds is None or low <= seconds <= high:
        return value  # as the client said it
    kept = min(max(seconds, low), high)
    return int(kept) if kept == int(kept) else kept


def bound_body(body: bytes, low: float, high: float) -> bytes:
    """An Ollama API request body with its ``keep_alive`` bounded; the bytes as they were without one."""
    if b'"keep_alive"' not in body:
        return body
    try:
        data = json.loads(body)
    except ValueError:
        return body  # Ollama answers it with its own error
    if not isinstance(data, dict) or "keep_alive" not in data:
        return body
    data["keep_alive"] = bounded(data["keep_alive"], low, high)
    return json.dumps(data).encode()
