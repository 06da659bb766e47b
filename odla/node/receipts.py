"""The node's side of receipts: it signs one at the end of every job, and hands them to the
operator that sent the job with its next report (a registration, or a status on its link).

    book = ReceiptBook(identity, digest_of)           # digest_of(model): its Ollama digest
    asked = book.asked(request.headers, body)          # None: no operator named (nothing to sign)
    out = new_output(); out.update(piece) ...          # each piece of the answer as it is sent
    book.sign(asked, model, out, usage, sent, outcome) # sent: tokens counted, when Ollama gives no count
    book.take(operator_address) -> [SignedReceipt]; book.put_back(...) when the report failed

Receipts wait in memory, ``MAX_WAITING`` per operator at most (the oldest go first): an operator
that stays away for hours loses those it could not be given, and marks them so.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional

from odla.core import protocol as p
from odla.proofs.identity import Identity, checksum
from odla.core.usage import Usage
from odla.proofs.receipts import UINT32, Receipt, digest_hex, sha256_hex

log = logging.getLogger("odla.node")
MAX_WAITING = 10_000


@dataclass
class Asked:
    """A job as it reached the node: whose it is, and what was asked."""

    operator: str
    job_id: str
    request_hash: str
    started: float = field(default_factory=time.time)


class ReceiptBook:
    def __init__(self, identity: Identity, digest_of: Callable[[str], Optional[str]] = lambda model: None) -> None:
        self.identity = identity
        self.digest_of = digest_of
        self.waiting: dict[str, collections.deque[p.SignedReceipt]] = {}
        self.known: set[str] = set()
        "The operators (addresses) this node reports to: only their receipts are kept."
        self.said: set[str] = set()
        "Operators whose receipts were dropped, said once each."

    def asked(self, headers: Mapping[str, str], body: bytes) -> Optional[Asked]:
        """The job in this request, when an operator sent it (its address and the job's id in the headers)."""
        operator, job_id = headers.get(p.OPERATOR_HEADER), headers.get(p.JOB_HEADER)
        if not operator or not job_id:
            return None
        try:
            return Asked(checksum(operator), job_id[:128], sha256_hex(body))
        except ValueError:
            return None

    def sign(self, asked: Optional[Asked], model: str, output: "hashlib._Hash", usage: Usage, sent: int,
             outcome: str) -> None:
        """Sign the receipt of a job that ended and keep it for its operator: Ollama's counts (``sent``,
        the tokens the node counted, when Ollama gives none); ``outcome`` as the node's log line says it."""
        if asked is None:
            return
        if asked.operator not in self.known:  # an operator sharing this node through Redis, which it never reports to
            if asked.operator not in self.said:
                self.said.add(asked.operator)
                log.warning("jobs come from operator %s, which this node does not report to: their receipts are not "
                            "kept (add it to COORDINATOR_URL)", asked.operator)
            return
        receipt = Receipt(job_id=asked.job_id, operator=asked.operator, node=self.identity.address, model=model,
                          model_digest=digest_hex(self.digest_of(model)), request_hash=asked.request_hash,
                          output_hash="0x" + output.hexdigest(), prompt_tokens=min(usage.prompt_tokens or 0, UINT32),
                          output_tokens=min(usage.output_tokens if usage.output_tokens is not None else sent, UINT32),
                          started_ms=int(asked.started * 1000), ended_ms=int(time.time() * 1000),
                          outcome=outcome_of(outcome))
        signed = p.SignedReceipt.model_construct(receipt=receipt.message(),
                                                 signature="0x" + self.identity.sign(receipt.digest()).hex())
        queue = self.waiting.setdefault(asked.operator, collections.deque(maxlen=MAX_WAITING))
        if len(queue) == MAX_WAITING and asked.operator not in self.said:
            self.said.add(asked.operator)
            log.warning("receipts for operator %s are not being collected: the oldest go", asked.operator)
        queue.append(signed)

    def take(self, operator: Optional[str], limit: int = p.MAX_RECEIPTS) -> list[p.SignedReceipt]:
        """Up to ``limit`` receipts for ``operator`` (its address), oldest first; they leave the book."""
        queue = self.waiting.get(operator) if operator else None
        if not queue:
            return []
        return [queue.popleft() for _ in range(min(limit, len(queue)))]

    def put_back(self, operator: Optional[str], receipts: list[p.SignedReceipt]) -> None:
        """Receipts whose report did not go through: first in line for the next one."""
        if operator and receipts:
            queue = self.waiting.setdefault(operator, collections.deque(maxlen=MAX_WAITING))
            queue.extendleft(reversed(receipts[:MAX_WAITING - len(queue)]))


def outcome_of(text: str) -> str:
    """The node's log outcome (``ok``, ``cancelled``, ``error: …``) as a receipt's."""
    return "ok" if text == "ok" else "cancelled" if text == "cancelled" else "error"


def new_output() -> "hashlib._Hash":
    return hashlib.sha256()
