"""Ollama model names: ``[host/][namespace/]model[:tag]``, matched the way Ollama matches them."""

from __future__ import annotations

import json
from typing import NamedTuple, Optional

DEFAULT_HOST = "registry.ollama.ai/"
DEFAULT_NAMESPACE = "library/"
DEFAULT_TAG = "latest"
MAX_MODEL_NAME = 512
"The longest model name taken from anyone (Ollama's are tens of characters)."


def model_key(name: str) -> str:
    """The canonical form two names share when Ollama treats them as one model.

    ``llama3``, ``llama3:latest``, ``library/llama3`` and ``Llama3`` all give
    ``llama3:latest``; ``user/model`` keeps its namespace.
    """
    key = name.strip().lower()
    if key.startswith(DEFAULT_HOST):
        key = key[len(DEFAULT_HOST):]
    if key.startswith(DEFAULT_NAMESPACE):
        key = key[len(DEFAULT_NAMESPACE):]
    if ":" not in key.rsplit("/", 1)[-1]:
        key = f"{key}:{DEFAULT_TAG}"
    return key


def display_name(name: str) -> str:
    """How ``/api/tags`` shows a name: with a tag, without ``library/``, case kept."""
    shown = name.strip()
    if shown.lower().startswith(DEFAULT_HOST):
        shown = shown[len(DEFAULT_HOST):]
    if shown.lower().startswith(DEFAULT_NAMESPACE):
        shown = shown[len(DEFAULT_NAMESPACE):]
    if ":" not in shown.rsplit("/", 1)[-1]:
        shown = f"{shown}:{DEFAULT_TAG}"
    return shown


def listed(names: "list[str]", shown: int = 5) -> str:
    """Names for a log line or a message: the first ``shown``, then how many more (a node may
    list thousands: a line per (re)link must not carry them all)."""
    head = ", ".join(names[:shown]) or "no models"
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def model_named(body: bytes) -> str:
    """The ``model`` (or ``/api/show``'s older ``name``) an Ollama API request names;
    ``ValueError`` saying why when it names none."""
    return requested(body).model


class Requested(NamedTuple):
    """What the scheduler reads of an Ollama or OpenAI API request."""

    model: str
    max_tokens: Optional[int]
    "The most output tokens it asks for (``options.num_predict``, ``max_tokens``, ``max_completion_tokens``)."


def requested(body: bytes) -> Requested:
    """The model an Ollama or OpenAI API request names, and the most tokens it asks for;
    ``ValueError`` saying why when it names no model."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("request body must be a JSON object")
    model = data.get("model") or data.get("name")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model is required")
    if len(model) > MAX_MODEL_NAME:  # it would be stored with every receipt and log line
        raise ValueError(f"model name is longer than {MAX_MODEL_NAME} characters")
    options = data.get("options")
    limit = options.get("num_predict") if isinstance(options, dict) else None
    if limit is None:
        limit = data.get("max_completion_tokens", data.get("max_tokens"))
    return Requested(model, output_limit(limit))


def output_limit(value: object) -> Optional[int]:
    """A request's limit on its output as a count of tokens; None for none (Ollama's -1 and -2, or no number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
