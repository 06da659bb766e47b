"""The client's streaming core: JSON lines in, tokens out. No I/O of its own."""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Union

from odla.core.protocol import DoneLine, ErrorLine, QueuedLine, parse_line


class StreamError(Exception):
    """The stream ended with an error line, or without a final line."""


def tokens(lines: Iterable[Union[str, bytes]], on_queued: Callable[[int], None] = lambda place: None) -> Iterator[str]:
    """Yield each token as its line arrives; return at the final line. ``on_queued`` hears a
    waiting job's place in the queue.

    Raises ``StreamError`` for an error line, a line that is not the protocol, or a
    stream that stops before its final line.
    """
    for raw in lines:
        if not raw.strip():
            continue
        try:
            line = parse_line(raw)
        except ValueError as exc:
            raise StreamError(f"the operator sent a line that is not ODLA's protocol: {raw[:80]!r}") from exc
        if isinstance(line, ErrorLine):
            raise StreamError(line.error or "unknown error")
        if isinstance(line, DoneLine):
            return
        if isinstance(line, QueuedLine):
            on_queued(line.queued)
            continue
        yield line.token
    raise StreamError("the stream ended before its final line")
