"""Ollama model names: ``[host/][namespace/]model[:tag]``, matched the way Ollama matches them."""

from __future__ import annotations

import hashlib
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


class Prompt(NamedTuple):
    """A job's prompt as the scheduler sees it: how long, and which conversation it goes on."""

    tokens: int = 0
    "Its length in tokens, estimated (a token is about 4 characters)."
    history: int = 0
    "Of those, the tokens before its newest message: what a node that served the last turn has cached."
    conversation: Optional[str] = None
    "A hash of the conversation's first messages, up to its first user message: the same on every turn."


class Requested(NamedTuple):
    """What the scheduler reads of an Ollama or OpenAI API request."""

    model: str
    max_tokens: Optional[int]
    "The most output tokens it asks for (``options.num_predict``, ``max_tokens``, ``max_completion_tokens``)."
    prompt: Prompt = Prompt()


CHARS_PER_TOKEN = 4


def prompt_of(data: dict) -> Prompt:
    """The prompt of a request's body: a chat's ``messages``, or ``system`` and ``prompt``."""
    messages = data.get("messages")
    if isinstance(messages, list) and messages:
        sizes = [len(str(m.get("content", ""))) + 8 if isinstance(m, dict) else 0 for m in messages]
        first_user = next((i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"), 0)
        opening = json.dumps(messages[:first_user + 1], sort_keys=True, default=str).encode()
        conversation = hashlib.blake2b(opening, digest_size=12).hexdigest()
        return Prompt(sum(sizes) // CHARS_PER_TOKEN, sum(sizes[:-1]) // CHARS_PER_TOKEN, conversation)
    text = sum(len(v) for v in (data.get("system"), data.get("prompt")) if isinstance(v, str))
    return Prompt(text // CHARS_PER_TOKEN)


def requested(body: bytes) -> Requested:
    """The model an Ollama or OpenAI API request names, and the most tokens it asks for;
    ``ValueError`` saying why when it names no model."""
    return requested_in(json_object(body))


def json_object(body: bytes) -> dict:
    """A request's body as the JSON object it must be; ``ValueError`` saying why it is not one."""
    try:
        data = json.loads(body or b"null")
    except ValueError as exc:
        raise ValueError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise ValueError("invalid JSON: nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("request body must be a JSON object")
    return data


def requested_in(data: dict) -> Requested:
    """``requested`` of a body already parsed."""
    model = data.get("model") or data.get("name")
    if not isinstance(model, str) or not model.strip():
        raise ValueError("model is required")
    if len(model) > MAX_MODEL_NAME:  # it would be stored with every receipt and log line
        raise ValueError(f"model name is longer than {MAX_MODEL_NAME} characters")
    return Requested(model, limit_in(data), prompt_of(data))


def limit_in(data: dict) -> Optional[int]:
    """The most output tokens a request asks for: Ollama's ``options.num_predict``, OpenAI's
    ``max_completion_tokens`` or ``max_tokens``; None for no limit."""
    options = data.get("options")
    limit = options.get("num_predict") if isinstance(options, dict) else None
    if limit is None:
        limit = data.get("max_completion_tokens", data.get("max_tokens"))
    return output_limit(limit)


def output_limit(value: object) -> Optional[int]:
    """A request's limit on its output as a count of tokens; None for none (Ollama's -1 and -2, or no number)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None
