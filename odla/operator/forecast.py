"""How long a job would take on a node: what the scheduler ranks nodes by.

    finish = wait for a slot + model load (after an eviction, if one is needed) + prompt + output / speed

- **wait**: none with a free slot. Else the moment the node's earliest job for the model ends:
  each job's end is predicted when it is claimed, and one that has run past its predicted end
  is expected to run as long again as it has overrun already. Jobs the queue has planned on the
  node ahead of this one count as running there.
- **load**: none when the model is in memory. Else the node's measured load time for it
  (Ollama's ``load_duration`` of a job that loaded it), else the network's mean for the model,
  else the node's mean for any model, else ``DEFAULT_LOAD_S``. When the node already holds
  as many models as it holds at most (``Node.max_models``: as seen when it dropped one to load
  another) and none of them is idle, Ollama waits for one to be idle before it evicts it: the wait
  until the first of them has ended its jobs. While a model that may need room (the node holds as
  many as it was ever seen to hold) loads, the node gets no jobs of the others (``Node.loading``).
- **prompt**: the prompt's length (estimated from its characters) at the node's measured reading
  speed (Ollama's ``prompt_eval_duration`` per ``prompt_eval_count``), but without the history of a
  conversation whose last turn the node served: Ollama keeps each slot's prompt and answer cached
  and reuses the longest shared prefix (``Node.cached``: as many conversations as it has slots).
- **run**: the job's output length (``num_predict``, ``max_tokens``; else the model's running
  mean of answers that set no limit; else ``DEFAULT_TOKENS``) over the node's speed for the
  model as the operator measured it. A node not measured yet is taken to be as fast as the
  fastest one measured (so it gets jobs, and so a measure), ``DEFAULT_SPEED`` if none is.

The operator sees only its own jobs: with several operators on one cluster, a node's other jobs
show as a busy node rather than as predicted ends (odla/operator/scheduler.py).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

from odla.core.names import Prompt
from odla.operator.registry import Node

DEFAULT_TOKENS = 256
"An answer's length before any of the model's answers was measured (Ollama's own default is no limit)."
DEFAULT_SPEED = 30.0
"Tokens per second of a model no node has been measured for yet."
DEFAULT_LOAD_S = 5.0
"Seconds to load a model no load of which was measured yet (a few GB from disk to a GPU)."
MEAN_WEIGHT = 0.1
"Weight of the newest answer in a model's mean output length, and of the newest load in a load time."
LOADED_S = 0.25
"An Ollama ``load_duration`` above this loaded the model (a warm model's is a few milliseconds)."
MIN_OVERRUN_S = 0.05
DEFAULT_PROMPT_S = 0.0005
"Seconds per prompt token read, before any was measured (a GPU reads a few thousand a second)."
MIN_READ = 16
"A prompt shorter than this tells no reading speed."


class Prediction(NamedTuple):
    """When a job would finish on one node, in seconds from when it was asked, and why."""

    wait: float
    "For a free slot on the node (and, to load the model, for a loaded one to be idle)."
    load: float
    "To load the model."
    run: float
    "To produce the answer: ``tokens`` at the node's speed."
    tokens: int
    "The answer's predicted length."
    prompt: float = 0.0
    "To read the prompt, but for what the node has cached of its conversation."

    @property
    def total(self) -> float:
        return self.wait + self.load + self.prompt + self.run


class Forecaster:
    """Predicts jobs' finish times on nodes, and learns the network's means from jobs that ended."""

    def __init__(self, affinity: bool = True) -> None:
        self.affinity = affinity
        "Count what a node has cached of a job's conversation (off: every node reads the whole prompt)."
        self.prompt_rates: dict[str, float] = {}
        "Per model key: running mean of seconds per prompt token read, over every node."
        self.tokens: dict[str, float] = {}
        "Per model key: running mean output length of answers that set no limit."
        self.loads: dict[str, float] = {}
        "Per model key: running mean of its measured load times, over every node."

    def length(self, key: str, asked: Optional[int]) -> int:
        """The output length to plan for: what the job asked for at most, else the model's mean."""
        if asked is not None and asked > 0:
            return asked
        return round(self.tokens.get(key, DEFAULT_TOKENS))

    def prompt_time(self, node: Node, key: str, prompt: Prompt) -> float:
        """Seconds ``node`` would take to read ``prompt``: none of its history when the node served the
        conversation's last turn (Ollama's slot still holds it), else all of it."""
        if not prompt.tokens:
            return 0.0
        read = prompt.tokens
        if self.affinity and prompt.conversation is not None and prompt.history:
            recent = node.cached.get(key)
            if recent is not None and prompt.conversation in recent:
                read -= prompt.history
        rate = node.prompt_s.get(key) or self.prompt_rates.get(key, DEFAULT_PROMPT_S)
        return read * rate

    def load_time(self, node: Node, key: str) -> float:
        if key in node.load_s:
            return node.load_s[key]
        if key in self.loads:
            return self.loads[key]
        if node.load_s:
            return sum(node.load_s.values()) / len(node.load_s)
        return DEFAULT_LOAD_S

    def predict(self, node: Node, key: str, now: float, tokens: int, speed: float,
                planned: Optional[list[float]] = None) -> Prediction:
        """``tokens`` of ``key`` on ``node`` at ``speed``, asked at ``now``; ``planned``: ends of the
        jobs planned there ahead of this one."""
        run = tokens / speed
        busy = node.inflight.get(key, 0)
        if planned:
            busy += len(planned)
        slots = node.slots_for(key)
        wait = 0.0
        if busy >= slots:
            ends = [_left(end, now) for end in node.ends.get(key, ())]
            if planned:
                ends += [end - now for end in planned]
            ends += [run] * (busy - len(ends))  # jobs whose end was not predicted (claimed elsewhere)
            ends.sort()
            wait = max(0.0, ends[busy - slots])
        if node.warm(key, now):
            return Prediction(wait, 0.0, run, tokens)
        return Prediction(max(wait, self._eviction(node, key, now)), self.load_time(node, key), run, tokens)

    @staticmethod
    def _eviction(node: Node, key: str, now: float) -> float:
        """Seconds until Ollama can make room for ``key`` on a node known to hold ``max_models`` at
        most: 0 when it holds fewer, or one of them is idle; else until the first of them is idle."""
        if not node.needs_room(key, now, known=True):
            return 0.0
        idle_at = []
        for k in (k for k in node.loaded if k != key and node.warm(k, now)):
            if not node.inflight.get(k):
                return 0.0
            idle_at.append(max((_left(end, now) for end in node.ends.get(k, ())), default=0.0))
        return min(idle_at)

    def learn(self, node: Node, key: str, output: Optional[int], limited: bool, load_ns: Optional[int],
              read: Optional[int] = None, read_ns: Optional[int] = None) -> None:
        """A job of ``key`` ended on ``node`` with ``output`` tokens (``limited``: it had asked for
        at most some), Ollama's ``load_duration``, and the prompt tokens it read in ``read_ns``."""
        if read and read_ns and read >= MIN_READ:
            rate = read_ns / 1e9 / read
            node.prompt_s[key] = _mean(node.prompt_s.get(key), rate)
            self.prompt_rates[key] = _mean(self.prompt_rates.get(key), rate)
        if output and not limited:
            self.tokens[key] = _mean(self.tokens.get(key), output)
        if load_ns is not None and load_ns / 1e9 > LOADED_S:
            seconds = load_ns / 1e9
            node.load_s[key] = _mean(node.load_s.get(key), seconds)
            self.loads[key] = _mean(self.loads.get(key), seconds)


def _left(end: float, now: float) -> float:
    """Seconds a job predicted to end at ``end`` has left: one past it runs as long again as it has overrun."""
    return end - now if end > now else max(MIN_OVERRUN_S, now - end)


def _mean(before: Optional[float], value: float) -> float:
    return value if before is None else MEAN_WEIGHT * value + (1 - MEAN_WEIGHT) * before
