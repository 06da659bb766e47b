"""Logging set-up shared by the operator and the node agent."""

import logging
import time
from typing import Callable, Hashable, Optional


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is noise at INFO
    logging.getLogger("websockets").setLevel(logging.INFO)  # a line per frame is noise even at DEBUG


class Throttle:
    """At most one log line per key (say, a client address) every ``seconds``: a flood of refused
    requests must not become a flood of log lines. ``throttle(key)`` is None for a line to hold
    back, else how many were held back since the last one said. Keys are bounded: past
    ``max_keys`` the memory of them starts over."""

    def __init__(self, seconds: float = 60.0, max_keys: int = 1024, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds, self.max_keys, self.clock = seconds, max_keys, clock
        self.said: dict[Hashable, list] = {}  # key -> [when last said, held back since]

    def __call__(self, key: Hashable) -> Optional[int]:
        now = self.clock()
        said = self.said.get(key)
        if said is not None and now - said[0] < self.seconds:
            said[1] += 1
            return None
        if said is None and len(self.said) >= self.max_keys:
            self.said.clear()
        self.said[key] = [now, 0]
        return said[1] if said is not None else 0
