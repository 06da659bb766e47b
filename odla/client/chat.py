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
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import httpx

from odla.core.errors import error_in
from odla.core.protocol import JOB_HEADER, JobReceipt
from odla.client.tables import model_details, verbose_stats
from odla.client.terminal import Spinner, is_terminal
from odla.core.times import iso
from odla.core.usage import Usage

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /load <model>   Load a session or model
  /save <file>    Save your current session
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command
  /? shortcuts    Help for keyboard shortcuts

Use \"\"\" to begin a multi-line message."""

HELP_SET = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set format json       Enable JSON mode
  /set noformat          Disable formatting
  /set verbose           Show the answer's stats
  /set quiet             Disable stats"""

HELP_PARAMETERS = """Parameters (Ollama's options), for example:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter stop <string> ...      Set the stop parameters"""

HELP_SHOW = """Available Commands:
  /show info         Show details for this model
  /show parameters   Show parameters for this model
  /show system       Show system message"""

HELP_SHORTCUTS = """Available keyboard shortcuts:
  Ctrl + c            Stop the answer (the conversation goes on)
  Ctrl + d            Exit (on an empty line)
  Up / Down           Earlier lines (where readline is available)"""

QUOTES = '"""'


class ChatError(Exception):
    """The operator or Ollama refused or broke off an answer."""


@dataclass
class Answer:
    text: str = ""
    final: dict = field(default_factory=dict)
    "Ollama's final message: done_reason and its counts."
    job_id: str = ""
    node: str = ""


class Stop:
    """Ctrl-C during an answer: the answer's task is cancelled, and the stream is left at its next
    line even if the cancellation was swallowed on the way (asyncio.run's own Ctrl-C handling relies
    on the cancellation reaching it, and a cancel scope inside the HTTP client can take it as its
    own: the answer then went on to its end, the Ctrl-C lost)."""

    def __init__(self) -> None:
        self.asked = False
        self.task: Optional[asyncio.Task] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None

    def __call__(self, signum: int, frame: object) -> None:
        self.asked = True
        if self.loop is not None and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)

    @contextlib.contextmanager
    def installed(self) -> Any:
        try:
            previous = signal.signal(signal.SIGINT, self)
        except ValueError:  # not the main thread: Python's KeyboardInterrupt as it is
            yield self
            return
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, previous)


async def ask(operator: str, headers: dict[str, str], body: dict[str, Any],
              on_token: Callable[[str], None], stop: Optional[Stop] = None) -> Answer:
    """One answer from ``/api/chat``, streamed to ``on_token``; ``stop`` ends it (Ctrl-C)."""
    if stop is not None:
        stop.task, stop.loop = asyncio.current_task(), asyncio.get_running_loop()
    answer = Answer()
    async with httpx.AsyncClient(base_url=operator, headers=headers, timeout=httpx.Timeout(10, read=None)) as http:
        async with http.stream("POST", "/api/chat", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                raise ChatError(error_in(resp.content) or resp.text.strip() or f"HTTP {resp.status_code}")
            answer.job_id, answer.node = resp.headers.get(JOB_HEADER, ""), resp.headers.get("x-odla-node", "")
            async for line in resp.aiter_lines():
                if stop is not None and stop.asked:
                    raise KeyboardInterrupt
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


@dataclass
class Session:
    """What ``ollama run`` keeps between messages: the model, the system message, parameters, the
    conversation; ``/save`` writes it to a file and ``/load`` reads it back."""

    model: str
    system: Optional[str] = None
    options: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    "``format`` and ``keep_alive``, as given on the command line or by /set."
    messages: list[dict[str, str]] = field(default_factory=list)
    verbose: bool = False

    def body(self) -> dict[str, Any]:
        start = [{"role": "system", "content": self.system}] if self.system else []
        body: dict[str, Any] = {"model": self.model, "messages": start + self.messages, "stream": True, **self.extras}
        if self.options:
            body["options"] = {**body.get("options", {}), **self.options}
        return body

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"model": self.model, "system": self.system, "options": self.options,
                                    "messages": self.messages}, indent=2))

    def load(self, path: Path) -> None:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or not isinstance(data.get("model"), str):
            raise ValueError("not a session saved by /save")
        self.model, self.system = data["model"], data.get("system")
        self.options, self.messages = dict(data.get("options") or {}), list(data.get("messages") or [])


def run_chat(operator: str, headers: dict[str, str], model: str, extras: dict[str, Any],
             system: Optional[str] = None, verbose: bool = False) -> None:
    """The conversation loop, until ``/bye`` or the end of input. Raises ``httpx.HTTPError``
    when the operator cannot be reached."""
    interactive = is_terminal(sys.stdin)
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform
            importlib.import_module("readline")  # line editing and history for input()
    options = dict(extras.pop("options", {}) or {})
    session = Session(model, system, options, extras, verbose=verbose)
    if interactive:
        print(f"Chatting with {model} through {operator}. /? for help, /bye to leave.", file=sys.stderr)
    while True:
        try:
            text = read_message(interactive)
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            return
        except KeyboardInterrupt:
            print("\nUse Ctrl + d or /bye to exit.", file=sys.stderr)
            continue
        if not text.strip():
            continue
        if text.lstrip().startswith("/"):
            if command(text.strip(), session, operator, headers) == "bye":
                return
            continue
        session.messages.append({"role": "user", "content": text})
        reply = _answer(operator, headers, session.body())
        if reply is None:  # stopped or refused: as if it had not been asked
            session.messages.pop()
            continue
        session.messages.append({"role": "assistant", "content": reply.text})
        if session.verbose:
            usage = Usage.from_ollama(reply.final)
            job = JobReceipt(id=reply.job_id or "-", model=session.model, node=reply.node or None, door="ollama",
                             started_at=iso(0), **usage.stats())
            print(verbose_stats(job) + "\n", file=sys.stderr)


def read_message(interactive: bool) -> str:
    """One message: a line, or the lines between \"\"\" and \"\"\" (the quotes dropped), as ``ollama run`` reads them."""
    text = input(">>> " if interactive else "")
    if text.count(QUOTES) % 2 == 0:
        return text.replace(QUOTES, "") if text.lstrip().startswith(QUOTES) else text
    lines = [text]
    while True:
        line = input("... " if interactive else "")
        lines.append(line)
        if QUOTES in line:
            break
    return "\n".join(lines).replace(QUOTES, "").strip("\n")


def command(text: str, session: Session, operator: str, headers: dict[str, str]) -> Optional[str]:
    """A ``/`` command, run here: never sent to the model. ``"bye"`` to leave."""
    say = lambda *lines: print(*lines, sep="\n", file=sys.stderr)  # noqa: E731
    words = text.split()
    name, args = words[0], words[1:]
    if name in ("/bye", "/exit"):
        return "bye"
    if name in ("/?", "/help"):
        topic = args[0] if args else ""
        say({"set": HELP_SET, "/set": HELP_SET, "show": HELP_SHOW, "/show": HELP_SHOW,
             "shortcuts": HELP_SHORTCUTS, "shortcut": HELP_SHORTCUTS}.get(topic, HELP))
    elif name == "/clear":
        session.messages.clear()
        say("Cleared session context")
    elif name == "/set":
        _set(text, args, session, say)
    elif name == "/show":
        _show(args, session, operator, headers, say)
    elif name == "/load":
        if len(args) != 1:
            say("Usage:\n  /load <model or file saved by /save>")
        elif Path(args[0]).is_file():
            try:
                session.load(Path(args[0]))
            except (OSError, ValueError) as exc:
                say(f"error: cannot load {args[0]}: {exc}")
            else:
                say(f"Loaded session from '{args[0]}': {session.model}, {len(session.messages)} messages")
        else:
            session.model = args[0]
            session.messages.clear()
            say(f"Loading model '{args[0]}'")
    elif name == "/save":
        if len(args) != 1:
            say("Usage:\n  /save <file>")
        else:
            try:
                session.save(Path(args[0]))
            except OSError as exc:
                say(f"error: cannot save to {args[0]}: {exc.strerror or exc}")
            else:
                say(f"Saved the session to '{args[0]}' (/load {args[0]} brings it back)")
    else:
        say(f"Unknown command '{name}'. Type /? for help")
    return None


def _set(text: str, args: list[str], session: Session, say: Callable[..., None]) -> None:
    what = args[0] if args else ""
    if what == "parameter":
        if len(args) < 3:
            say("Usage:\n  /set parameter <name> <value>", "", HELP_PARAMETERS)
            return
        name, values = args[1], args[2:]
        session.options[name] = values if name == "stop" else _value(" ".join(values))
        say(f"Set parameter '{name}' to '{', '.join(values)}'")
    elif what == "system":
        message = text.split("system", 1)[1].strip()
        if not message:
            say("Usage:\n  /set system <string>")
            return
        session.system = message
        say("Set system message.")
    elif what == "format" and args[1:] == ["json"]:
        session.extras["format"] = "json"
        say("Set format to 'json' mode.")
    elif what == "noformat":
        session.extras.pop("format", None)
        say("Disabled format.")
    elif what in ("verbose", "quiet"):
        session.verbose = what == "verbose"
        say(f"Set '{what}' mode.")
    else:
        say(HELP_SET if not what else f"Unknown command '/set {what}'. Type /? for help")


def _value(raw: str) -> Any:
    """A parameter's value as Ollama takes it: a number or true/false where it is one, else the text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _show(args: list[str], session: Session, operator: str, headers: dict[str, str],
          say: Callable[..., None]) -> None:
    what = args[0] if args else ""
    if what == "system":
        say(session.system or "No system message was specified for this model.")
    elif what == "parameters":
        if session.options:
            say("User defined parameters:", *(f"{k:<16}{v}" for k, v in session.options.items()))
        info = _model_info(operator, headers, session.model, say)
        if info is not None:
            say("Model defined parameters:", info.get("parameters") or "No parameters were specified for this model.")
    elif what == "info":
        info = _model_info(operator, headers, session.model, say)
        if info is not None:
            say(model_details(info))
    else:
        say(HELP_SHOW if not what else f"Unknown command '/show {what}'. Type /? for help")


def _model_info(operator: str, headers: dict[str, str], model: str, say: Callable[..., None]) -> Optional[dict]:
    try:
        resp = httpx.post(f"{operator}/api/show", json={"model": model}, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        say(f"error: cannot ask the operator about {model} ({type(exc).__name__})")
        return None
    if resp.status_code != 200:
        say(f"error: {error_in(resp.content) or f'HTTP {resp.status_code}'}")
        return None
    return resp.json()


def _answer(operator: str, headers: dict[str, str], body: dict[str, Any]) -> Optional[Answer]:
    spinner = Spinner()

    def on_token(piece: str) -> None:
        spinner.stop()
        sys.stdout.write(piece)
        sys.stdout.flush()

    with spinner, Stop().installed() as stop:
        try:
            answer = asyncio.run(ask(operator, headers, body, on_token, stop))
            if stop.asked:  # the cancellation was swallowed: the answer ended all the same
                raise KeyboardInterrupt
        except (KeyboardInterrupt, asyncio.CancelledError):
            spinner.stop()
            print("\n[stopped]", file=sys.stderr)
            return None
        except ChatError as exc:
            spinner.stop()
            print(f"\nerror: {exc}", file=sys.stderr)
            return None
    print("\n")
    return answer
