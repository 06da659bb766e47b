"""The client on a terminal: a spinner until the first token, and whether colour is wanted."""

from __future__ import annotations

import os
import shutil
import sys
import threading
from typing import Optional, TextIO

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def colour_wanted(stream: TextIO = sys.stdout) -> bool:
    """Colour only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org)."""
    return is_terminal(stream) and not os.environ.get("NO_COLOR")


def width(stream: TextIO = sys.stdout) -> Optional[int]:
    """The terminal's width in columns; None when ``stream`` is not a terminal (nothing is cut)."""
    return shutil.get_terminal_size().columns if is_terminal(stream) else None


class Spinner:
    """Spins on stderr, on a terminal only, until ``stop()``; ``say()`` changes its words
    (a queued job's place). Writes nothing at all when stderr is not a terminal."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 0.1) -> None:
        self.stream, self.interval = stream, interval
        self.active = is_terminal(stream)
        self.words = ""
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "Spinner":
        if self.active:
            self._thread = threading.Thread(target=self._spin, name="spinner", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def say(self, words: str) -> None:
        self.words = words

    def stop(self) -> None:
        """Stop and erase the spinner (at the first token); safe to call more than once."""
        if self._done.is_set():
            return
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            if self.active:
                self.stream.write("\r\x1b[K")
                self.stream.flush()

    def _spin(self) -> None:
        i = 0
        while not self._done.wait(self.interval):
            with self._lock:
                if self._done.is_set():
                    return
                self.stream.write(f"\r{FRAMES[i % len(FRAMES)]} {self.words}\x1b[K")
                self.stream.flush()
            i += 1
