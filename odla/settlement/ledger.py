"""A double-entry ledger, in the operator's jobs database (``jobs_db``), moved by receipts.

Each countersigned, undisputed receipt of a priced job is one transaction of three entries,
written in the same SQLite transaction as the receipt itself: the client's account is debited
the job's cost, the node's address credited the cost less the operator's fee, the operator's
address credited the fee. A receipt disputed later (by an audit, before its epoch closes) is
reversed by three new entries; nothing is ever edited or deleted. So every job's entries, and
all balances together, sum to zero: ``check`` proves it, at every start.

Amounts are integers in the settlement unit's smallest denomination. An account's running
balance is kept beside the entries as a decimal string (Python's integers have no ceiling;
SQLite's stop at 2**63, some 9.2 ETH in wei), in the same transaction as its entries. ``closed``
is the part of it in closed epochs: what the operator posts on chain (``odla.settlement.chain``).

    ledger.post(db, charge, at)        # in the receipts' thread, inside their transaction
    ledger.reverse(db, job_ids, at)    # -> what each client got back
    ledger.close_epoch(db, number)
    ledger.statement(db, account, limit, before), ledger.check(db)
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Iterable, Optional

SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (id INTEGER PRIMARY KEY, job_id TEXT NOT NULL, kind TEXT NOT NULL,
    role TEXT NOT NULL, account TEXT NOT NULL, amount INTEGER NOT NULL, at REAL NOT NULL, epoch INTEGER,
    UNIQUE (job_id, kind, role));
CREATE INDEX IF NOT EXISTS ledger_by_account ON ledger (account, id);
CREATE INDEX IF NOT EXISTS ledger_open ON ledger (epoch);
CREATE TABLE IF NOT EXISTS accounts (account TEXT NOT NULL, role TEXT NOT NULL, balance TEXT NOT NULL,
    closed TEXT NOT NULL, PRIMARY KEY (account, role));
CREATE TABLE IF NOT EXISTS settlements (epoch INTEGER PRIMARY KEY, root TEXT NOT NULL, payees TEXT NOT NULL,
    clients TEXT NOT NULL, tx TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vouchers (client TEXT PRIMARY KEY, cumulative TEXT NOT NULL, signature TEXT NOT NULL);
"""
"""The money's tables, made with the receipts' (``odla.operator.receipts.connect``): the ledger and
each account's balance; each settlement posted on chain (``odla.settlement.poster``); each client's
highest spend voucher (``odla.settlement.vouchers``)."""
ROLES = ("client", "node", "operator")
"Who an entry is for: the client that asked, the node that ran it, the operator that took its fee."
ANONYMOUS = "anonymous"
"The account of a caller with no API key and no wallet (an operator without ``api_keys``)."


class LedgerError(Exception):
    """The ledger does not balance."""


@dataclass(frozen=True)
class Charge:
    """What one job moves: ``cost`` from ``client``; ``cost - fee`` to ``node``, ``fee`` to ``operator``."""

    job_id: str
    client: str
    node: str
    operator: str
    cost: int
    fee: int
    prompt_tokens: int
    output_tokens: int

    def entries(self) -> list[tuple[str, str, int]]:
        """(role, account, amount), summing to zero."""
        return [("client", self.client, -self.cost), ("node", self.node, self.cost - self.fee),
                ("operator", self.operator, self.fee)]


def account_of(caller: str) -> str:
    """A client's account: its wallet address, or a hash of its API key; ``anonymous`` without either."""
    return caller or ANONYMOUS


def post(db: sqlite3.Connection, charge: Charge, at: float) -> None:
    """The job's three entries (a second post of the same job changes nothing). In the caller's transaction."""
    if charge.cost <= 0:
        return
    for role, account, amount in charge.entries():
        added = db.execute("INSERT OR IGNORE INTO ledger (job_id, kind, role, account, amount, at) "
                           "VALUES (?, 'charge', ?, ?, ?, ?)", (charge.job_id, role, account, amount, at)).rowcount
        if added:
            _move(db, account, role, amount)


def reverse(db: sqlite3.Connection, job_ids: Iterable[str], at: float) -> list[tuple[str, int]]:
    """Entries that undo each job's charge, unless undone already or in a closed epoch; what each
    client got back: (account, amount)."""
    refunds = []
    for job_id in job_ids:
        rows = db.execute("SELECT role, account, amount FROM ledger WHERE job_id = ? AND kind = 'charge' "
                          "AND epoch IS NULL", (job_id,)).fetchall()
        for role, account, amount in rows:
            added = db.execute("INSERT OR IGNORE INTO ledger (job_id, kind, role, account, amount, at) "
                               "VALUES (?, 'reversal', ?, ?, ?, ?)", (job_id, role, account, -amount, at)).rowcount
            if added:
                _move(db, account, role, -amount)
                if role == "client":
                    refunds.append((account, -amount))  # its debit, given back
    return refunds


def spent(db: sqlite3.Connection) -> dict[str, int]:
    """What each client has spent in all (``odla.settlement.purse``)."""
    return {account: -int(balance) for account, balance in
            db.execute("SELECT account, balance FROM accounts WHERE role = 'client'")}


def close_epoch(db: sqlite3.Connection, number: int) -> None:
    """The entries of the receipts now in epoch ``number`` join it; their sums join ``closed``."""
    db.execute("UPDATE ledger SET epoch = ? WHERE epoch IS NULL AND job_id IN (SELECT id FROM jobs WHERE epoch = ?)",
               (number, number))
    sums: dict[tuple[str, str], int] = {}
    for account, role, amount in db.execute("SELECT account, role, amount FROM ledger WHERE epoch = ?", (number,)):
        sums[(account, role)] = sums.get((account, role), 0) + amount
    for (account, role), amount in sums.items():
        closed = db.execute("SELECT closed FROM accounts WHERE account = ? AND role = ?", (account, role)).fetchone()
        db.execute("UPDATE accounts SET closed = ? WHERE account = ? AND role = ?",
                   (str(int(closed[0]) + amount), account, role))


def closed_balances(db: sqlite3.Connection) -> list[tuple[str, str, int]]:
    """(account, role, balance in closed epochs) of every account."""
    return [(account, role, int(closed)) for account, role, closed in
            db.execute("SELECT account, role, closed FROM accounts ORDER BY account, role")]


def statement(db: sqlite3.Connection, account: str, limit: int = 50, before: Optional[int] = None) -> dict[str, Any]:
    """An account's balance (by role, and in all) and its entries, newest first."""
    roles = {role: int(balance) for role, balance in
             db.execute("SELECT role, balance FROM accounts WHERE account = ?", (account,))}
    rows = db.execute("SELECT id, job_id, kind, role, amount, at, epoch FROM ledger WHERE account = ? AND id < ? "
                      "ORDER BY id DESC LIMIT ?", (account, before if before is not None else 2 ** 63 - 1, limit))
    entries = [{"id": i, "job_id": job_id, "kind": kind, "role": role, "amount": amount, "at": at, "epoch": epoch}
               for i, job_id, kind, role, amount, at, epoch in rows]
    return {"account": account, "balance": sum(roles.values()), "by_role": roles, "entries": entries,
            "next_before": entries[-1]["id"] if len(entries) == limit else None}


def check(db: sqlite3.Connection) -> None:
    """``LedgerError`` unless every job's entries sum to zero, and each account's kept balance is
    the sum of its entries (so all balances sum to zero)."""
    unbalanced = db.execute("SELECT job_id, kind FROM ledger GROUP BY job_id, kind HAVING SUM(amount) != 0 "
                            "LIMIT 1").fetchone()
    if unbalanced is not None:
        raise LedgerError(f"the ledger's {unbalanced[1]} entries of job {unbalanced[0]} do not sum to zero")
    sums: dict[tuple[str, str], list[int]] = {}
    for account, role, amount, epoch in db.execute("SELECT account, role, amount, epoch FROM ledger"):
        both = sums.setdefault((account, role), [0, 0])
        both[0] += amount
        both[1] += amount if epoch is not None else 0
    kept = {(account, role): [int(balance), int(closed)] for account, role, balance, closed in
            db.execute("SELECT account, role, balance, closed FROM accounts")}
    for key in sums.keys() | kept.keys():
        if sums.get(key, [0, 0]) != kept.get(key, [0, 0]):
            raise LedgerError(f"account {key[0]} ({key[1]}) keeps {kept.get(key)} (balance, closed); "
                              f"its entries sum to {sums.get(key)}")
    total = sum(balance for balance, _ in kept.values())
    if total != 0:
        raise LedgerError(f"the balances sum to {total}, not zero")


def _move(db: sqlite3.Connection, account: str, role: str, amount: int) -> None:
    row = db.execute("SELECT balance FROM accounts WHERE account = ? AND role = ?", (account, role)).fetchone()
    if row is None:
        db.execute("INSERT INTO accounts (account, role, balance, closed) VALUES (?, ?, ?, '0')",
                   (account, role, str(amount)))
    else:
        db.execute("UPDATE accounts SET balance = ? WHERE account = ? AND role = ?",
                   (str(int(row[0]) + amount), account, role))
