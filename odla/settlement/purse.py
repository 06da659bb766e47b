"""What each client may still spend, with ``settlement: "evm"``: its deposit in the escrow, less
what the ledger says it spent, less what its jobs hold, and never past what it signed off (its
highest spend voucher, ``odla.settlement.vouchers``). A job is held for its worst case before
any node works on it, and refused with 402 when that would overdraw the client.

    purse = Purse(prices, escrow, settings.max_job_tokens, settings.chain_poll)   # owned by the operator's lifespan
    purse.open(spent_by_account, vouchers)      # what the ledger says each client spent; what each signed off
    await purse.allow(account, cumulative, signature)           # a client signs off more (a voucher)
    await purse.hold(job, model, prompt_tokens, max_tokens)   # Router.open, on every door; 402
    purse.ended(job); purse.charged(job)        # the job's end; its receipt countersigned
    await purse.standing(account)               # deposited, spent, held, available

A hold is the job's worst case: its prompt (estimated) and the most output it asked for
(``num_predict``, ``max_tokens``; ``max_job_tokens`` without one). When the job ends, its hold
becomes its cost as the operator counted it, until the node's receipt sets the charge in the
ledger (or never comes: ``countersign.WAIT_S``). Deposits are read from the chain at most every
``chain_poll`` seconds per client; while the chain cannot be reached, the last reading stands (a
withdrawal takes the contract's delay, so it cannot have left meanwhile), and a client never read
is refused with 503.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable, Optional

from odla.core.errors import ODLAError
from odla.proofs.identity import is_address
from odla.settlement.chain import ChainError, Escrow, Standing
from odla.settlement.prices import Prices
from odla.settlement.vouchers import Voucher

FRESH_S = 1.0
"A job that the last reading of its client's deposit would refuse is refused only on a reading this fresh."
WAIT_S = 600.0
"How long an ended job's hold waits for its receipt (as ``countersign.WAIT_S``)."


class PaymentRequired(ODLAError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 402)


class Purse:
    def __init__(self, prices: Prices, escrow: Escrow, max_job_tokens: int, poll_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.prices = prices
        self.escrow = escrow
        self.max_job_tokens = max_job_tokens
        self.poll_s = poll_s
        self.clock = clock
        self.spent: dict[str, int] = {}
        self.holds: dict[str, tuple[str, int, Optional[float]]] = {}
        "Job id -> (account, amount, when it ended or None while it runs)."
        self.held: dict[str, int] = {}
        self.chain: dict[str, tuple[Standing, float]] = {}
        self._reading: dict[str, asyncio.Future] = {}
        self.vouchers: dict[str, tuple[int, str]] = {}
        "Each client's highest spend voucher: (cumulative, signature)."
        self.keep: Callable[[str, int, str], Any] = lambda client, cumulative, signature: None
        "Stores a voucher (awaitable): in jobs_db, set by the operator's lifespan."

    def open(self, spent: dict[str, int], vouchers: Optional[dict[str, tuple[int, str]]] = None) -> None:
        self.spent = dict(spent)
        self.vouchers = dict(vouchers or {})

    async def allow(self, account: str, cumulative: int, signature: str) -> dict[str, Any]:
        """Take a client's voucher (checked: signed by ``account`` for this escrow); ``ODLAError`` 401
        when it is not. A voucher for less than the one kept changes nothing."""
        try:
            signer = Voucher(account, cumulative).signer(signature, self.escrow.chain_id, self.escrow.address)
        except ValueError as exc:
            raise ODLAError(f"not a spend voucher: {exc}", 422) from None
        if signer != account:
            raise ODLAError(f"the voucher is signed by {signer}, not by {account} (for escrow {self.escrow.address} "
                            f"on chain {self.escrow.chain_id})", 401)
        if cumulative > self.vouchers.get(account, (0, ""))[0]:
            await self.keep(account, cumulative, signature)
            self.vouchers[account] = (cumulative, signature)
        return await self.standing(account)

    async def hold(self, job: Any, model: str, prompt_tokens: int, max_tokens: Optional[int]) -> None:
        """Hold the job's worst case against its client's balance; ``PaymentRequired`` (402) when it
        would overdraw it. A job held already (failing over) is not held again."""
        if job.id in self.holds:
            return
        worst = self.prices.cost(model, prompt_tokens, max_tokens or self.max_job_tokens)
        if worst <= 0:
            return
        account = job.caller
        if not is_address(account):
            raise PaymentRequired("this operator is paid from deposits on chain: sign in with a wallet "
                                  "(python client.py login) and deposit (python client.py deposit AMOUNT)")
        standing = await self._standing(account)
        self._expire()
        if worst > self._available(account, standing):
            standing = await self._standing(account, fresh=True)  # refused only on a fresh reading: a deposit just made counts
        if standing.withdrawable_at:
            raise PaymentRequired(f"{account} has asked to withdraw its deposit: no new jobs until it has, "
                                  "and deposited again")
        available = self._available(account, standing)
        signed_off = self.vouchers.get(account, (0, ""))[0]
        if worst > available and signed_off < standing.deposited:
            raise PaymentRequired(f"this job may cost up to {worst} wei; {account} has signed off {signed_off} in all "
                                  f"and {max(available, 0)} of it is left. Sign off more (python client.py allow "
                                  "AMOUNT) or ask for fewer tokens")
        if worst > available:
            raise PaymentRequired(f"this job may cost up to {worst} wei ({model}: its prompt and up to "
                                  f"{max_tokens or self.max_job_tokens} output tokens); {account} has {max(available, 0)} "
                                  "available. Deposit more (python client.py deposit AMOUNT) or ask for fewer tokens")
        self.holds[job.id] = (account, worst, None)
        self.held[account] = self.held.get(account, 0) + worst

    def ended(self, job: Any) -> None:
        """The job's hold becomes its cost as the operator counted it, until its receipt comes; none
        when no receipt will (an unsigned node, or no node ran it). A resumed answer's is split among
        its nodes' records (``job.parts``), each let go when that node's receipt comes."""
        found = self.holds.get(job.id)
        if found is None:
            return
        self._release(job.id)
        account, left, _ = found
        now = self.clock()
        for record in (job, *job.parts):
            if record.node_address is None or record.charge is not None or record.signed is not None:
                continue
            prompt = record.billed_prompt(record.usage.prompt_tokens or 0)  # as the charge counts it
            cost = min(self.prices.cost(record.model, prompt, record.own_tokens), left)
            left -= cost
            self.holds[record.id] = (account, cost, now)
            self.held[account] = self.held.get(account, 0) + cost

    def charged(self, job: Any) -> None:
        """The job's receipt was countersigned: its charge (if any) is spent, its hold let go."""
        if job.charge is not None:
            self.spent[job.charge.client] = self.spent.get(job.charge.client, 0) + job.charge.cost
        if job.outcome is not None:
            self._release(job.id)

    def refunded(self, refunds: list[tuple[str, int]]) -> None:
        """Charges reversed (a disputed node's): (client, amount) each."""
        for account, amount in refunds:
            self.spent[account] = self.spent.get(account, 0) - amount

    async def standing(self, account: str) -> dict[str, Any]:
        standing = await self._standing(account, fresh=True)
        spent = max(self.spent.get(account, 0), standing.charged)
        held = self.held.get(account, 0)
        signed_off = self.vouchers.get(account, (0, ""))[0]
        return {"deposited": standing.deposited, "signed_off": signed_off, "charged_on_chain": standing.charged,
                "spent": spent, "held": held, "available": max(min(standing.deposited, signed_off) - spent - held, 0),
                "withdrawable_at": standing.withdrawable_at or None, "escrow": self.escrow.address,
                "chain_id": self.escrow.chain_id}

    def _available(self, account: str, standing: Standing) -> int:
        limit = min(standing.deposited, self.vouchers.get(account, (0, ""))[0])
        return limit - max(self.spent.get(account, 0), standing.charged) - self.held.get(account, 0)

    def _release(self, job_id: str) -> None:
        """Let the job's hold go, if it has one (a free job has none; an old one may have expired)."""
        found = self.holds.pop(job_id, None)
        if found is None:
            return
        account, amount, _ = found
        self.held[account] -= amount
        if not self.held[account]:
            del self.held[account]

    def _expire(self) -> None:
        now = self.clock()
        for job_id in [j for j, (_, _, ended) in self.holds.items() if ended is not None and now - ended > WAIT_S]:
            self._release(job_id)

    async def _standing(self, account: str, fresh: bool = False) -> Standing:
        """The account's standing on chain, as last read if that is recent enough: ``chain_poll``,
        or ``FRESH_S`` when ``fresh`` (never more than a read a second for one account, however
        many ask: a flood of requests is not passed on to the chain's RPC)."""
        known = self.chain.get(account)
        if known is not None and self.clock() - known[1] < (FRESH_S if fresh else self.poll_s):
            return known[0]
        reading = self._reading.get(account)
        if reading is None:  # one read per account at a time, however many jobs ask
            reading = self._reading[account] = asyncio.ensure_future(asyncio.to_thread(self.escrow.standing, account))
            reading.add_done_callback(lambda _: self._reading.pop(account, None))
        try:
            standing = await asyncio.shield(reading)
        except ChainError as exc:
            if known is not None:
                return known[0]
            raise ODLAError(f"cannot read {account}'s deposit from the chain: {exc}", 503,
                            headers={"Retry-After": "10"}) from None
        self.chain[account] = (standing, self.clock())
        return standing
