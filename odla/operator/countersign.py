"""The operator's side of receipts: each node's signed receipt, checked against what the operator
saw of the job itself, then countersigned and kept with the job.

    signer = Countersigner(identity, receipts)     # owned by the operator's lifespan
    signer.ended(job)                              # every job that ended (a dict entry, no I/O)
    signer.take(node, report.receipts)             # on each registration and link status

The node sends its receipts with its next report (a heartbeat, sent soon after each job: no
request of its own). The operator checks the node's signature, that the receipt is for one of
its jobs that this node ran, and the facts it saw itself: the model, the request it sent, the
answer it relayed (its hash and its token count) and the times. A receipt that does not match is
countersigned all the same (both signatures show what the node claimed) and marked ``disputed``
with the reason, which counts against the node.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from typing import Any, Callable, Optional

from odla.core.names import model_key
from odla.core.protocol import SignedReceipt
from odla.operator.receipts import Receipts
from odla.operator.registry import Node
from odla.proofs.identity import BadSignature, Identity, hex_signature, recover
from odla.proofs.receipts import Receipt
from odla.serving.jobs import Job
from odla.settlement.ledger import Charge, account_of
from odla.settlement.prices import Prices

AUDIT_CALLER = "odla-audit"
"The caller of an audit's re-run: the operator itself, which no client pays for."

log = logging.getLogger("odla.operator")

WAIT_S = 600.0
"How long a job waits for its node's receipt (a node that went away never sends it)."
MAX_AWAITING = 200_000
"Jobs waiting for their node's receipt at once: past it, the oldest stop waiting."
SLICE = 16
"Receipts checked between two turns of the event loop (each costs some 0.2 ms)."
CLOCK_SKEW_S = 30.0
"How far a node's clock may be from the operator's before its receipt's times are disputed."
PADDING = (1.05, 2)
"""A node may claim up to 5 % + 2 output tokens more than the operator relayed before it is
disputed: Ollama can hold back a token whose bytes end mid-character, and send it with the next."""


class Countersigner:
    def __init__(self, identity: Identity, store: Receipts, clock: Callable[[], float] = time.time) -> None:
        self.identity = identity
        self.store = store
        self.clock = clock
        self.incoming: collections.deque[tuple[Node, list[SignedReceipt]]] = collections.deque()
        self.arrived = asyncio.Event()
        self.awaiting: dict[str, Job] = {}
        "Jobs of signed nodes that ended, by id, oldest first, until their node's receipt comes."
        self.prices: Optional[Prices] = None
        "What jobs cost (``prices`` in config): an undisputed receipt of a priced job moves money in the ledger."
        self.on_charge: Callable[[Job], None] = lambda job: None
        "Hears of each job whose charge was decided (``odla.settlement.purse``: its hold becomes spent)."
        self.auditor: Any = None
        "The operator's auditor (``odla.operator.audits``): hears of each node's model digests and disputes."

    def ended(self, job: Job) -> None:
        if job.node_address is None or job.signed is not None:
            return
        self.awaiting[job.id] = job
        if len(self.awaiting) > MAX_AWAITING:
            del self.awaiting[next(iter(self.awaiting))]
        oldest = next(iter(self.awaiting.values()))
        while oldest.finished is not None and self.clock() - oldest.finished > WAIT_S:
            del self.awaiting[oldest.id]
            if not self.awaiting:
                break
            oldest = next(iter(self.awaiting.values()))

    def take(self, node: Node, receipts: list[SignedReceipt]) -> None:
        """Receipts that came with a report: checked by ``run``, a few at a time, so that a report
        with a thousand of them (a busy node's) never holds the event loop for long."""
        if receipts:
            self.incoming.append((node, receipts))
            self.arrived.set()

    async def run(self) -> None:
        """Check the receipts that came, ``SLICE`` at a time, letting the loop serve in between."""
        while True:
            await self.arrived.wait()
            self.arrived.clear()
            while self.incoming:
                node, receipts = self.incoming.popleft()
                for start in range(0, len(receipts), SLICE):
                    self.check(node, receipts[start:start + SLICE])
                    await asyncio.sleep(0)

    def check(self, node: Node, receipts: list[SignedReceipt]) -> None:
        for signed in receipts:
            try:
                self._take(node, signed)
            except (ValueError, KeyError, TypeError) as exc:  # BadSignature is a ValueError
                log.warning("node %s sent a receipt that is not one: %s", node.node_id, str(exc)[:200])

    def _take(self, node: Node, signed: SignedReceipt) -> None:
        receipt = Receipt.from_message(signed.receipt)
        signature = hex_signature(signed.signature)
        digest = receipt.digest()
        if node.address is None or recover(digest, signature) != node.address or receipt.node != node.address:
            raise BadSignature(f"not signed by the node's key {node.address}")
        job = self.awaiting.get(receipt.job_id)
        if receipt.operator != self.identity.address or job is None or job.runner != node.node_id:
            log.debug("node %s sent a receipt for a job this operator is not waiting on: %s", node.node_id,
                      receipt.job_id[:40])
            return
        del self.awaiting[job.id]
        disputed = self.dispute(job, receipt)
        if disputed is not None:
            log.warning("job %s: node %s's receipt is disputed: %s", job.id, node.node_id, disputed)
        if disputed is not None and self.auditor is not None:
            self.auditor.disputed(node)
        if disputed is None and node.quarantined:
            disputed = "the node is quarantined"
        job.signed = (json.dumps(signed.receipt, separators=(",", ":")), signed.signature,
                      "0x" + self.identity.sign(digest).hex(), disputed, "0x" + digest.hex())
        if disputed is None and self.prices and job.caller != AUDIT_CALLER:
            job.charge = self.charge(job, receipt)
        self.store.countersigned(job)
        self.on_charge(job)

    def charge(self, job: Job, receipt: Receipt) -> Charge:
        """What the job costs: the prompt its node read, and the output the client was sent from that node
        (never more than the receipt claims, nor than the operator relayed: a client that left pays for what
        it got). A resumed answer's later leg is paid for its output only: the client pays for its prompt
        once, to the first node, and not again for a failure that was none of its doing."""
        assert self.prices is not None
        output = min(receipt.output_tokens, job.own_tokens)
        prompt = job.billed_prompt(receipt.prompt_tokens)
        cost = self.prices.cost(job.model, prompt, output)
        _, fee = self.prices.split(cost)  # the node's share is what the fee leaves: Charge.entries
        return Charge(job.id, account_of(job.caller), receipt.node, self.identity.address, cost, fee, prompt, output)

    @staticmethod
    def dispute(job: Job, receipt: Receipt) -> Optional[str]:
        """Why ``receipt`` does not match what the operator saw of ``job``; None when it does."""
        if model_key(receipt.model) != job.model:
            return f"the receipt names model {receipt.model}, the job asked for {job.model}"
        if receipt.request_hash != job.request_hash:
            return "the receipt's request is not the one this operator sent"
        if receipt.outcome == "ok" and job.outcome == "ok" and not job.legs:  # its whole answer was read:
            if receipt.output_hash != job.output_hash:                       # it can be held to it
                return "the receipt's output is not the answer this operator relayed"
            ratio, extra = PADDING
            if job.delivered and receipt.output_tokens > job.delivered * ratio + extra:
                return f"the receipt claims {receipt.output_tokens} output tokens; {job.delivered} were relayed"
        if receipt.started_ms < (job.started - CLOCK_SKEW_S) * 1000 or (
                job.finished is not None and receipt.ended_ms > (job.finished + CLOCK_SKEW_S) * 1000):
            return "the receipt's times are outside the job's as this operator saw it"
        return None
