"""Times on the wire: ISO 8601 in UTC, written with a ``Z``; read from RFC 3339 as Ollama writes it."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Optional


def iso(epoch: float, timespec: str = "seconds") -> str:
    """Epoch seconds as ISO 8601 UTC: ``2026-11-28T15:04:05Z`` (``timespec`` as ``isoformat``'s)."""
    return datetime.fromtimestamp(epoch, tz=timezone.utc).isoformat(timespec=timespec).replace("+00:00", "Z")


def epoch(stamp: Optional[str]) -> Optional[float]:
    """An RFC 3339 / ISO 8601 time (Ollama's ``expires_at``, nanoseconds and all) as epoch
    seconds; None if unreadable. A time without a zone is taken as UTC."""
    if not stamp:
        return None
    try:
        head, dot, rest = stamp.strip().replace("Z", "+00:00").partition(".")
        zone = rest[rest.find("+"):] if "+" in rest else (rest[rest.rfind("-"):] if "-" in rest else "")
        fraction = rest[:len(rest) - len(zone)][:6]  # Python reads microseconds, Ollama writes nanoseconds
        when = datetime.fromisoformat(head + (dot + fraction if fraction else "") + zone)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()
