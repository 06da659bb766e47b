"""Posting each closed epoch's settlement on chain, and the proofs payees claim with.

    poster = Poster(identity, escrow, receipts)    # owned by the operator's lifespan
    await poster.open()                            # the last settlement posted, from jobs_db
    async with background(poster.run(), "settlement"): ...
    poster.epoch_closed()                          # Epochs.close calls it
    poster.claim("0x…")                            # {"epoch", "owed", "proof", "escrow"} or None

Figures are cumulative (what each client was charged and each payee earned, in all closed
epochs), so only the newest closed epoch needs posting: one missed while the chain was away is
covered by the next. A post that fails is tried again every ``RETRY_S``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from typing import Any, Optional

from odla.operator.receipts import Receipts
from odla.proofs.identity import Identity
from odla.settlement import ledger
from odla.settlement.chain import ChainError, Escrow
from odla.settlement.settle import Settlement

log = logging.getLogger("odla.operator")
RETRY_S = 10.0


class Poster:
    def __init__(self, identity: Identity, escrow: Escrow, store: Receipts,
                 vouchers: Optional[dict[str, tuple[int, str]]] = None) -> None:
        self.identity = identity
        self.escrow = escrow
        self.store = store
        self.posted: Optional[tuple[int, Settlement, str]] = None
        "The last settlement on chain: (epoch, what it posted, its transaction)."
        self.vouchers = vouchers if vouchers is not None else {}
        "Each client's highest spend voucher (the purse's): posted with its charge, which it caps."
        self.wake = asyncio.Event()
        self._tree: Any = None

    async def open(self) -> None:
        row = await self.store.in_db(_last)
        if row is not None:
            epoch, payees, clients, tx = row
            self.posted = (epoch, Settlement(json.loads(payees), json.loads(clients)), tx)

    def epoch_closed(self) -> None:
        self.wake.set()

    async def run(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self.wake.wait(), RETRY_S)
            except asyncio.TimeoutError:
                pass
            self.wake.clear()
            try:
                await self.post()
            except ChainError as exc:
                log.warning("cannot post the settlement on chain (trying again in %g s): %s", RETRY_S, exc)
            except sqlite3.Error:
                log.exception("cannot read the ledger to post the settlement")

    async def post(self) -> Optional[str]:
        """Post the newest closed epoch's settlement, unless it is on chain already; its transaction."""
        number, balances = await self.store.in_db(_closed)
        if number is None or self.posted is not None and number <= self.posted[0]:
            return None
        plan = Settlement.of(balances)
        for client, charge in list(plan.clients.items()):  # the contract refuses more than a deposit or a voucher
            standing = await asyncio.to_thread(self.escrow.standing, client)
            limit = min(standing.deposited, self.vouchers.get(client, (0, ""))[0])
            if charge > limit:
                log.error("client %s spent %d wei but deposited %d and signed off %d: only that is charged", client,
                          charge, standing.deposited, self.vouchers.get(client, (0, ""))[0])
                plan.clients[client] = max(limit, standing.charged)
            if plan.clients[client] == standing.charged:
                del plan.clients[client]  # nothing new: no voucher needed
        tx = await asyncio.to_thread(self.escrow.post, self.identity, number, plan.root, list(plan.clients),
                                     list(plan.clients.values()), [self.vouchers[c] for c in plan.clients])
        await self.store.in_db(_record, number, plan, tx)
        self.posted, self._tree = (number, plan, tx), None
        log.info("epoch %d settled on chain: %d payee(s), %d client(s), root %s, transaction %s", number,
                 len(plan.payees), len(plan.clients), plan.root, tx)
        return tx

    def claim(self, payee: str) -> Optional[dict[str, Any]]:
        """What ``payee`` can claim with: its cumulative earnings in the last settlement posted, and proof."""
        if self.posted is None:
            return None
        epoch, plan, tx = self.posted
        if self._tree is None:
            self._tree = plan.tree()
        found = plan.proof(payee, self._tree)
        if found is None:
            return None
        owed, proof = found
        return {"epoch": epoch, "owed": owed, "proof": proof, "root": plan.root, "escrow": self.escrow.address,
                "chain_id": self.escrow.chain_id, "transaction": tx}


def _closed(db: sqlite3.Connection) -> tuple[Optional[int], list[tuple[str, str, int]]]:
    row = db.execute("SELECT MAX(number) FROM epochs").fetchone()
    return (row[0] if row else None), ledger.closed_balances(db)


def _last(db: sqlite3.Connection) -> Optional[tuple]:
    return db.execute("SELECT epoch, payees, clients, tx FROM settlements ORDER BY epoch DESC LIMIT 1").fetchone()


def _record(db: sqlite3.Connection, number: int, plan: Settlement, tx: str) -> None:
    with db:
        db.execute("INSERT OR REPLACE INTO settlements (epoch, root, payees, clients, tx) VALUES (?, ?, ?, ?, ?)",
                   (number, plan.root, json.dumps(plan.payees), json.dumps(plan.clients), tx))
