"""``client.py chat``: a conversation with a model through the operator's ``/api/chat``, as ``ollama run`` has one.

The conversation is kept here and sent whole with each message (Ollama's chat API is
stateless). Each answer runs in its own ``asyncio.run``: Ctrl-C cancels it, which closes the
connection (and so stops the job at the node and at Ollama) and leaves the chat going.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import httpx

from odla.core.errors import error_in
from odla.core.protocol import JOB_HEADER, JobReceipt
from odla.client.tables import verbose_stats
from odla.client.terminal import Spinner, is_terminal
from odla.core.times import iso
from odla.core.usage import Usage

HELP = """Available commands:
  /clear          Forget the conversation so far
  /bye            Leave (Ctrl-D does too)
  /?, /help       This help

Ctrl-C stops an answer; the conversation goes on."""


class ChatError(Exception):
    """The operator or Ollama refused or broke off an answer."""


@dataclass
class Answer:
    text: str = ""
    final: dict = field(default_factory=dict)
    "Ollama's final message: done_reason and its counts."
    job_id: str = ""
    node: str = ""


async def ask(operator: str, headers: dict[str, str], body: dict[str, Any],
              on_token: Callable[[str], None]) -> Answer:
    """One answer from ``/api/chat``, streamed to ``on_token``."""
    answer = Answer()
    async with httpx.AsyncClient(base_url=operator, headers=headers, timeout=httpx.Timeout(10, read=None)) as http:
        async with http.stream("POST", "/api/chat", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise ChatError(error_in(resp.content) or resp.text.strip() or f"HTTP {resp.status_code}")
            answer.job_id, answer.node = resp.headers.get(JOB_HEADER, ""), resp.headers.get("x-odla-node", "")
            async for line in resp.aiter_lines():
                if not line.strip():
                    continue
                try:
                    data = json.loads(line)
                except ValueError:
                    raise ChatError(f"the operator sent a line that is not Ollama's chat API: {line[:80]!r}") from None
                if data.get("error"):
                    raise ChatError(str(data["error"]))
                piece = (data.get("message") or {}).get("content") or ""
                if piece:
                    answer.text += piece
                    on_token(piece)
                if data.get("done"):
                    answer.final = data
                    return answer
    raise ChatError("the answer ended before Ollama's final message")


def run_chat(operator: str, headers: dict[str, str], model: str, extras: dict[str, Any],
             system: Optional[str] = None, verbose: bool = False) -> None:
    """The conversation loop, until ``/bye`` or the end of input. Raises ``httpx.HTTPError``
    when the operator cannot be reached."""
    interactive = is_terminal(sys.stdin)
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            importlib.import_module("readline")  # line editing and history for input()
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    if interactive:
        print(f"Chatting with {model} through {operator}. /? for help, /bye to leave.", file=sys.stderr)
    while True:
        try:
            text = input(">>> " if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.", file=sys.stderr)
            continue
        command = text.strip()
        if not command:
            continue
        if command in ("/bye", "/exit"):
            return
        if command in ("/?", "/help"):
            print(HELP, file=sys.stderr)
            continue
        if command == "/clear":
            messages = list(start)
            print("Cleared session context", file=sys.stderr)
            continue
        if command.startswith("/") and " " not in command:
            print(f"Unknown command '{command}'. Type /? for help", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        reply = _answer(operator, headers, {"model": model, "messages": messages, "stream": True, **extras})
        if reply is None:  # stopped or refused: as if it had not been asked
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": reply.text})
        if verbose:
            usage = Usage.from_ollama(reply.final)
            job = JobReceipt(id=reply.job_id or "-", model=model, node=reply.node or None, door="ollama",
                             started_at=iso(0), **usage.stats())
            print(verbose_stats(job) + "\n", file=sys.stderr)


def _answer(operator: str, headers: dict[str, str], body: dict[str, Any]) -> Optional[Answer]:
    spinner = Spinner()

    def on_token(piece: str) -> None:
        spinner.stop()
        sys.stdout.write(piece)
        sys.stdout.flush()

    with spinner:
        try:
            answer = asyncio.run(ask(operator, headers, body, on_token))
        except KeyboardInterrupt:
            spinner.stop()
            print("\n[stopped]", file=sys.stderr)
            return None
        except ChatError as exc:
            spinner.stop()
            print(f"\nerror: {exc}", file=sys.stderr)
            return None
    print("\n")
    return answer
