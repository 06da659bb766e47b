"""Epochs: every ``epoch_seconds`` the operator closes one, a Merkle root over the receipts it
countersigned since the last, signed by the operator; and each job's proof that its receipt is in.

    epochs = Epochs(identity, receipts, settings.epoch_seconds)   # owned by the operator's lifespan
    async with background(epochs.run(), "epochs"): ...
    await epochs.close()                    # one now (run calls it every epoch_seconds)
    await epochs.list(limit), await epochs.get(n), await epochs.proof(job_id)

A receipt belongs to the epoch open when it was countersigned (a node's receipt comes with its
next report, after its job). Closing reads the open receipts' digests, builds the tree, and in
one transaction numbers their places and stores the signed epoch: a restart loses nothing, and
a receipt is in exactly one epoch. The last trees are kept in memory for proofs; an older one is
built again from its receipts' digests while the jobs are kept (``jobs_keep_days``).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import sqlite3
import time
from typing import Any, Callable, Optional

from odla.core.errors import ODLAError
from odla.operator.receipts import Receipts
from odla.proofs.epochs import Epoch
from odla.proofs.identity import Identity
from odla.proofs.merkle import Tree, leaf
from odla.proofs.receipts import RECEIPT
from odla.settlement import ledger

log = logging.getLogger("odla.operator")
TREES_KEPT = 2


class Epochs:
    def __init__(self, identity: Identity, store: Receipts, seconds: float) -> None:
        self.identity = identity
        self.store = store
        self.seconds = seconds
        self.trees: collections.OrderedDict[int, Tree] = collections.OrderedDict()
        self.on_close: Callable[[], None] = lambda: None
        "Hears of each epoch closed (``odla.settlement.poster``: its settlement goes on chain)."

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.seconds)
            try:
                await self.close()
            except sqlite3.Error:
                log.exception("cannot close an epoch in %s; trying again next time", self.store.path)

    async def close(self) -> Optional[dict[str, Any]]:
        """Close the open epoch: its number, root and count, signed; None when it holds no receipt."""
        await self.store.flush()  # the receipts countersigned so far are in
        closed = await self.store.in_db(self._close, time.time())
        if closed is None:
            return None
        epoch, tree = closed
        self._keep(epoch["number"], tree)
        log.info("epoch %d closed: %d receipt(s), root %s", epoch["number"], len(tree), epoch["root"])
        self.on_close()
        return epoch

    def _close(self, db: sqlite3.Connection, now: float) -> Optional[tuple[dict[str, Any], Tree]]:
        rows = db.execute("SELECT id, receipt_digest FROM jobs WHERE receipt_digest IS NOT NULL AND epoch IS NULL "
                          "ORDER BY rowid").fetchall()
        if not rows:
            return None
        last = db.execute("SELECT number, typed FROM epochs ORDER BY number DESC LIMIT 1").fetchone()
        number = last[0] + 1 if last else 1
        began = json.loads(last[1])["message"]["endedMs"] if last else int(now * 1000) - int(self.seconds * 1000)
        tree = Tree([leaf(bytes.fromhex(digest[2:])) for _, digest in rows])
        epoch = Epoch(operator=self.identity.address, number=number, root="0x" + tree.root.hex(), count=len(rows),
                      started_ms=began, ended_ms=int(now * 1000))
        typed = json.dumps(epoch.typed_data(), separators=(",", ":"))
        signature = "0x" + self.identity.sign(epoch.digest()).hex()
        with db:
            db.executemany("UPDATE jobs SET epoch = ?, leaf_index = ? WHERE id = ?",
                           ((number, i, job_id) for i, (job_id, _) in enumerate(rows)))
            db.execute("INSERT INTO epochs (number, typed, signature) VALUES (?, ?, ?)", (number, typed, signature))
            ledger.close_epoch(db, number)  # what those receipts moved is settled with them
        return _shown(number, typed, signature), tree

    def _keep(self, number: int, tree: Tree) -> None:
        self.trees[number] = tree
        self.trees.move_to_end(number)
        while len(self.trees) > TREES_KEPT:
            self.trees.popitem(last=False)

    async def list(self, limit: int = 100, before: Optional[int] = None) -> list[dict[str, Any]]:
        rows = await self.store.in_db(lambda db: db.execute(
            "SELECT number, typed, signature FROM epochs WHERE number < ? ORDER BY number DESC LIMIT ?",
            (before if before is not None else 2 ** 63 - 1, limit)).fetchall())
        return [_shown(*row) for row in rows]

    async def get(self, number: int) -> dict[str, Any]:
        row = await self.store.in_db(lambda db: db.execute(
            "SELECT number, typed, signature FROM epochs WHERE number = ?", (number,)).fetchone())
        if row is None:
            raise ODLAError(f"no epoch {number}", 404)
        return _shown(*row)

    async def proof(self, job_id: str) -> dict[str, Any]:
        """The job's receipt, its signatures, its Merkle path and its epoch, signed: all that
        ``client.py verify`` checks. 404: no such job; 409: no signed receipt yet, or its epoch is open."""
        await self.store.flush()
        row = await self.store.in_db(lambda db: db.execute(
            "SELECT receipt, node_signature, operator_signature, disputed, epoch, leaf_index FROM jobs WHERE id = ?",
            (job_id,)).fetchone())
        if row is None:
            if self.store.running.get(job_id) or any(j.id == job_id for j in self.store.pending):
                raise ODLAError(f"job {job_id} has no signed receipt yet", 409)
            raise ODLAError(f"unknown job: {job_id}", 404)
        typed, node_signature, operator_signature, disputed, number, index = row
        if typed is None:
            raise ODLAError(f"job {job_id} has no signed receipt (yet: its node sends it with its next report; "
                            "a node without a key sends none)", 409)
        if number is None:
            raise ODLAError(f"job {job_id}'s epoch is open: its proof is ready when the epoch closes "
                            f"(every {self.seconds:g} s, epoch_seconds)", 409, headers={"Retry-After": "60"})
        epoch = await self.get(number)
        tree = self.trees.get(number) or await self._rebuild(number, epoch["count"])
        return {"job_id": job_id, "receipt": RECEIPT.typed_data(json.loads(typed)), "node_signature": node_signature,
                "operator_signature": operator_signature, "disputed": disputed, "leaf_index": index,
                "proof": ["0x" + step.hex() for step in tree.proof(index)], "epoch": epoch["typed"],
                "epoch_signature": epoch["signature"]}

    async def _rebuild(self, number: int, count: int) -> Tree:
        digests = await self.store.in_db(lambda db: [d for (d,) in db.execute(
            "SELECT receipt_digest FROM jobs WHERE epoch = ? ORDER BY leaf_index", (number,))])
        if len(digests) != count:
            raise ODLAError(f"epoch {number}'s receipts are no longer all kept (jobs_keep_days): its proofs are gone", 410)
        tree = Tree([leaf(bytes.fromhex(d[2:])) for d in digests])
        self._keep(number, tree)
        return tree


def _shown(number: int, typed: str, signature: str) -> dict[str, Any]:
    """An epoch as ``GET /epochs`` shows it: its fields, and the typed data its operator signed."""
    data = json.loads(typed)
    message = data["message"]
    return {"number": number, "operator": message["operator"], "root": message["root"], "count": message["count"],
            "started_ms": message["startedMs"], "ended_ms": message["endedMs"], "typed": data,
            "signature": signature}
