"""What a job cost, in Ollama's counts: tokens in and out, and Ollama's durations.

Ollama puts them in its final message (``prompt_eval_count``, ``eval_count``,
``total_duration``, ``load_duration``, ``prompt_eval_duration``, ``eval_duration``, in
nanoseconds); its OpenAI API in ``usage`` (``prompt_tokens``, ``completion_tokens``).
On ``/inference`` the node forwards them in its final line's ``stats``, which the operator
takes off before the client sees the line. On the Ollama and OpenAI doors the answer is
relayed byte for byte, so they are read from the end of it (``Tail``).
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping, Optional

DURATIONS = ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")


@dataclass
class Usage:
    """One job's counts; None where Ollama did not say."""

    prompt_tokens: Optional[int] = None
    output_tokens: Optional[int] = None
    total_duration: Optional[int] = None
    "Nanoseconds, as Ollama gives them; so are the other durations."
    load_duration: Optional[int] = None
    prompt_eval_duration: Optional[int] = None
    eval_duration: Optional[int] = None

    @classmethod
    def from_ollama(cls, message: Any) -> "Usage":
        """From Ollama's final message: an SDK response object or its JSON as a dict."""
        get = message.get if isinstance(message, Mapping) else lambda key: getattr(message, key, None)
        return cls(_count(get("prompt_eval_count")), _count(get("eval_count")),
                   *(_count(get(name)) for name in DURATIONS))

    @classmethod
    def from_stats(cls, stats: Any) -> "Usage":
        """From a node's ``stats`` (this class's own fields); whatever is not a count is dropped."""
        if not isinstance(stats, Mapping):
            return cls()
        return cls(**{f.name: _count(stats.get(f.name)) for f in fields(cls)})

    def stats(self) -> dict[str, int]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __bool__(self) -> bool:
        return any(v is not None for v in asdict(self).values())


MAX_COUNT = (1 << 63) - 1
"The largest count or duration taken from a node (what SQLite and Prometheus hold); a larger one is dropped."


def _count(value: Any) -> Optional[int]:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_COUNT else None


# A key of a JSON object, not text inside a string (where its quotes would be escaped).
_FIELD = re.compile(rb'[{,]\s*"(prompt_eval_count|eval_count|total_duration|load_duration|prompt_eval_duration|'
                    rb'eval_duration|prompt_tokens|completion_tokens)"\s*:\s*(\d+)')
_OPENAI = {b"prompt_tokens": b"prompt_eval_count", b"completion_tokens": b"eval_count"}


class Tail:
    """The last ``limit`` bytes of a relayed answer, kept as it passes (no copy per piece).

    Ollama ends every answer with its counts: the last line of a stream, the last fields of
    a whole document (after ``context`` or the embeddings), OpenAI's ``usage`` near the end.
    """

    def __init__(self, limit: int = 1 << 16) -> None:
        self.limit = limit
        self.pieces: deque[bytes] = deque()
        self.size = 0

    def add(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)
        while self.size - len(self.pieces[0]) >= self.limit:
            self.size -= len(self.pieces.popleft())

    def bytes(self) -> bytes:
        return b"".join(self.pieces)

    def usage(self) -> Usage:
        found: dict[bytes, int] = {}
        for match in _FIELD.finditer(self.bytes()):
            found[_OPENAI.get(match[1], match[1])] = int(match[2][:20])  # the last one of each counts
        return Usage.from_ollama({k.decode(): v for k, v in found.items()})

    def error(self) -> Optional[str]:
        """The error an answer ended with, when it did: Ollama's ``{"error": ...}`` line, or an
        OpenAI stream's ``data: {"error": {...}}`` event."""
        lines = [line.strip() for line in self.bytes().splitlines()]
        lines = [line for line in lines if line and line != b"data: [DONE]"]
        if not lines:
            return None
        last = lines[-1].removeprefix(b"data:").strip()
        if not last.startswith(b'{"error"'):
            return None
        try:
            error = json.loads(last)["error"]
        except (ValueError, KeyError):
            return None
        if isinstance(error, Mapping):
            error = error.get("message")
        return str(error) if error else "error"


def door_tokens(chunk: bytes) -> int:
    """Tokens in a piece of a door's answer: Ollama's stream has one line per token (``"done":false``),
    its OpenAI API one event per token (``"finish_reason":null``; the last one says why it stopped)."""
    return chunk.count(b'"done":false') + chunk.count(b'"finish_reason":null')


_USAGE_EVENT = b'"choices":[],"usage":'


def without_usage(events: bytes) -> bytes:
    """Whole events of an OpenAI chat stream less its usage event (Ollama's last before ``[DONE]``,
    the only one with no choices): for a client that did not ask for it."""
    at = events.find(_USAGE_EVENT)
    if at < 0:
        return events
    start, end = events.rfind(b"data: ", 0, at), events.find(b"\n\n", at)
    return events[:start] + (events[end + 2:] if end >= 0 else b"")
