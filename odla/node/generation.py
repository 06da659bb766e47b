"""Ollama's ``/api/generate`` stream, read as it arrives and passed on as ODLA's JSON lines.

The node asks its Ollama for a job's answer over aiohttp (``odla.node.ollama_clients.Streams``)
and turns each piece that arrives into protocol lines in one go: a piece often carries several of
Ollama's lines, and each costs one JSON decode here, not a model object per line and a hop per
token as the SDK's ``generate`` would. The SDK keeps what it is good at on the node: listings,
what is loaded, pulls. What Ollama sends is read as the SDK reads it:

- an answer that is not 200 is an error: ``ollama.ResponseError(text, status)``, parsed by the SDK;
- a line with ``error`` ends the answer with that error (``ollama.ResponseError``, as the SDK raises it);
- a line that is not a JSON object is not Ollama's API (``ValueError``);
- ``response`` is a token; ``done: true`` is the last line, with Ollama's counts.

    lines = GenerateLines(model)
    piece = lines.take(data)      # protocol token lines for the whole lines in data
    piece = await lines.read(chunks)  # the next piece that has any (b"" at the body's end)
    lines.final                   # Ollama's last message (its counts), once it came
    lines.error                   # the error Ollama ended with, once it came
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Optional

import ollama

from odla.core import protocol as p

MAX_LINE = 1 << 20
"The longest line of Ollama's answer held while its end has not come (a token is a few bytes)."


class GenerateLines:
    """Ollama's generate stream, converted piece by piece."""

    __slots__ = ("model", "partial", "tokens", "final", "error")

    def __init__(self, model: str) -> None:
        self.model = model
        "The model, as Ollama's lines name it (the one asked for until a line says)."
        self.partial = b""
        self.tokens = 0
        "Token lines made so far."
        self.final: Optional[dict[str, Any]] = None
        self.error: Optional[ollama.ResponseError] = None

    @property
    def ended(self) -> bool:
        return self.final is not None or self.error is not None

    def take(self, data: bytes) -> bytes:
        """The token lines of the whole lines ``data`` completes; nothing is read past the last
        line or an error. Raises ``ValueError`` on what is not Ollama's API."""
        if self.partial:
            data = self.partial + data
        *whole, self.partial = data.split(b"\n")
        if len(self.partial) > MAX_LINE:
            raise ValueError(f"a line longer than {MAX_LINE} bytes")
        out = []
        for line in whole:
            if not line.strip():
                continue
            message = json.loads(line)
            if not isinstance(message, dict):
                raise ValueError("not a JSON object")
            if error := message.get("error"):
                self.error = ollama.ResponseError(str(error))
                break
            token = message.get("response")
            if token:
                if not isinstance(token, str):
                    raise ValueError("a response that is not text")
                out.append(p.token_line(token))
            if message.get("done"):
                self.final = message
                model = message.get("model")
                self.model = model if isinstance(model, str) and model else self.model
                break
        self.tokens += len(out)
        return b"".join(out)

    async def read(self, chunks: AsyncIterator[bytes]) -> bytes:
        """Read the answer's body (``chunks``) as far as the next piece with token lines, or the last
        line or an error; at the body's end, its last line if it had no newline (``b""``: none)."""
        async for data in chunks:
            piece = self.take(data)
            if piece or self.ended:
                return piece
        return self.end()

    def end(self) -> bytes:
        """The body ended: its last line, if it had no newline."""
        if self.ended or not self.partial.strip():
            return b""
        return self.take(b"\n")
