"""One job's record, from the request that asked for it to its end: what the metrics count
and what its receipt says. Every job ends exactly once, with one of ``OUTCOMES``."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, get_args

from odla.core.errors import NoNodeError, ODLAError, QueueFull, QueueTimeout
from odla.core.protocol import JobLeg, JobPrediction, JobReceipt, Outcome
from odla.core.times import iso
from odla.core.usage import Usage
from odla.proofs.receipts import RECEIPT

OUTCOMES = get_args(Outcome)
JOB_PATHS = frozenset({"/inference", "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
                       "/v1/chat/completions", "/v1/completions", "/v1/embeddings"})
"The operator's paths that run a model: each request to one is a job."


def new_job_id() -> str:
    """A job's id: in the ``X-ODLA-Job`` header and the node's log line for it. 128 random
    bits in hex, as ``uuid4().hex`` gives but without building a UUID, a tenth of the cost."""
    return os.urandom(16).hex()


def door_of(path: str) -> str:
    return "openai" if path.startswith("/v1/") else "ollama" if path.startswith("/api/") else "inference"


@dataclass
class Job:
    """A job as the operator saw it."""

    door: str
    model: str = ""
    caller: str = ""
    id: str = field(default_factory=new_job_id)
    started: float = field(default_factory=time.time)
    first_token: Optional[float] = None
    finished: Optional[float] = None
    node: str = ""
    outcome: Optional[str] = None
    error: Optional[str] = None
    failovers: int = 0
    queue_wait: Optional[float] = None
    "Seconds it waited for a free slot, when it had to."
    usage: Usage = field(default_factory=Usage)
    """Ollama's counts, as the node forwarded them; ``output_tokens`` is what the client was sent
    unless the answer was complete and Ollama counted it."""
    delivered: int = 0
    "Tokens relayed to the client (one per token line or event), whatever Ollama's final message says."
    limited: bool = False
    "It asked for at most some tokens (``num_predict``, ``max_tokens``)."
    conversation: Optional[str] = None
    "The conversation it goes on (a hash of its first messages), when it has one."
    prediction: Optional[JobPrediction] = None
    "When the scheduler predicted it would finish, on the node it picked first."
    node_address: Optional[str] = None
    "The key of the node that ran it (None: an unsigned node, whose jobs have no signed receipt)."
    request_hash: Optional[str] = None
    "SHA-256 of the request sent to that node (0x-hex), as its receipt must name it."
    output_hash: Optional[str] = None
    "SHA-256 of the answer that node sent, as far as it was read (0x-hex)."
    audit: Any = None
    "Sampled for an audit: the request and the first bytes of its answer (``odla.operator.audits.Capture``)."
    signed: Optional[tuple[str, str, str, Optional[str], str]] = None
    """The node's receipt once checked: (its EIP-712 message as JSON, node's signature, operator's, why
    it is disputed, its EIP-712 digest)."""
    legs: list[tuple[str, int]] = field(default_factory=list)
    """When its answer was resumed: each node that gave part of it, and the tokens it gave, in order. The
    job's own receipt is then the first node's; each later node's is a part's (``parts``)."""
    parts: list["Job"] = field(default_factory=list, repr=False)
    """A resumed answer's later legs, each a record of its own (id ``{id}.{n}``, ``part_of`` this job): the
    request that node was sent, its answer, its receipt and charge. Kept beside the job, never counted twice."""
    part_of: Optional[str] = None
    "The job whose answer this record is a later leg of (``parts``)."
    resumes: list[str] = field(default_factory=list)
    "What came of each failure of its node mid-answer (``ok``: resumed to the end; ``odla.operator.resume``)."
    charge: Any = None
    "What its countersigned receipt moves in the ledger (``odla.settlement.ledger.Charge``), when priced."
    on_end: Callable[["Job"], None] = field(default=lambda job: None, repr=False)

    @property
    def sent(self) -> int:
        """Output tokens the client was sent: those relayed, counted; for a whole answer (nothing
        counted), Ollama's count as the node forwarded it."""
        return self.delivered or self.usage.output_tokens or 0

    @property
    def runner(self) -> str:
        """The node whose receipt this record holds: the first of a resumed answer's (``node`` is its last)."""
        return self.legs[0][0] if self.legs else self.node

    @property
    def own_tokens(self) -> int:
        """The output tokens the client was sent from ``runner``: what its receipt may be paid for."""
        return self.legs[0][1] if self.legs else self.sent

    def billed_prompt(self, counted: int) -> int:
        """Of the prompt tokens ``counted`` for this record, those charged: none on a resumed answer's
        later leg (the client pays for its prompt once, on the first node's record)."""
        return 0 if self.part_of is not None else counted

    def first(self) -> None:
        if self.first_token is None:
            self.first_token = time.time()

    def end(self, outcome: str, error: Optional[str] = None) -> None:
        """Record how the job ended; only the first call counts."""
        if self.outcome is not None:
            return
        self.outcome, self.finished = outcome, time.time()
        self.error = error if error is not None else self.error
        if self.delivered and (outcome != "ok" or self.usage.output_tokens is None):
            self.usage.output_tokens = self.delivered  # cut short, or Ollama did not count: what was sent
        self.on_end(self)

    def refused(self, exc: ODLAError) -> None:
        """The job ended before any answer, with ``exc``."""
        if isinstance(exc, QueueFull):
            outcome = "queue_full"
        elif isinstance(exc, QueueTimeout):
            outcome = "queue_timeout"
        elif isinstance(exc, NoNodeError) or exc.status_code == 404 and not self.node:
            outcome = "no_node"
        elif exc.status_code in (400, 413, 422):
            outcome = "bad_request"
        elif exc.status_code == 402:  # its client's balance could not cover it (odla.settlement.purse)
            outcome = "unpaid"
        else:
            outcome = "node_error"
        self.end(outcome, exc.message)

    def receipt(self) -> JobReceipt:
        stamp = lambda t: iso(t, "milliseconds") if t is not None else None  # noqa: E731
        message, node_signature, operator_signature, disputed, _ = self.signed or (None,) * 5
        return JobReceipt(receipt=RECEIPT.typed_data(json.loads(message)) if message else None,
                          node_signature=node_signature,
                          operator_signature=operator_signature, disputed=disputed,id=self.id, model=self.model, node=self.node or None, door=self.door, outcome=self.outcome,
                          error=self.error, caller=self.caller or None, started_at=stamp(self.started),
                          first_token_at=stamp(self.first_token), finished_at=stamp(self.finished),
                          failovers=self.failovers, queue_wait_s=self.queue_wait, prediction=self.prediction,
                          legs=[JobLeg(node=node, tokens=tokens, job=f"{self.id}.{n}" if n else self.id)
                                for n, (node, tokens) in enumerate(self.legs)] or None, part_of=self.part_of,
                          **self.usage.stats())
