"""The ledger's rules on a real SQLite database: three entries a job summing to zero, a second
post of the same job moving nothing, reversals as new entries, epochs closing what they hold,
and the check that finds a ledger that does not balance."""

import sqlite3

import pytest

from odla.operator.receipts import connect
from odla.settlement import ledger
from odla.settlement.ledger import Charge, LedgerError
from odla.settlement.prices import Prices
from odla.core.config import Price

CLIENT, NODE, OPERATOR = "0x" + "aa" * 20, "0x" + "bb" * 20, "0x" + "cc" * 20


def charge(job_id: str, cost: int, fee: int = 0, client: str = CLIENT) -> Charge:
    return Charge(job_id, client, NODE, OPERATOR, cost, fee, 10, 20)


def job(db: sqlite3.Connection, job_id: str) -> None:
    db.execute("INSERT INTO jobs (id, started, model, door, failovers, node, receipt) VALUES (?, 0, 'm', 'x', 0, 'n1', '{}')",
               (job_id,))


def test_prices_are_integers_rounded_down_and_the_fee_is_the_operators_share():
    prices = Prices({"llama3": Price(prompt=100_000, output=400_000), "*": Price(prompt=1, output=3)}, fee_bps=250)
    assert prices.cost("llama3:latest", 12, 300) == (12 * 100_000 + 300 * 400_000) // 1_000_000 == 121
    assert prices.cost("Llama3", 1, 1) == 0  # 0.5 rounds down: never more than the exact price
    assert prices.cost("mistral", 1_000_000, 1_000_000) == 4  # "*": any other model
    assert prices.split(121) == (118, 3) and sum(prices.split(121)) == 121
    assert Prices({}).cost("llama3", 10 ** 9, 10 ** 9) == 0 and not Prices({})
    with pytest.raises(ValueError):
        Price(prompt=1.5, output=1)  # no floats in money


def test_each_job_moves_money_once_and_the_ledger_balances():
    db = connect(":memory:")
    with db:
        for i in range(5):
            job(db, f"j{i}")
            ledger.post(db, charge(f"j{i}", 1000, 30), at=1.0)
        ledger.post(db, charge("j0", 1000, 30), at=2.0)  # posted again: nothing moves
    ledger.check(db)
    assert ledger.statement(db, CLIENT)["balance"] == -5000
    assert ledger.statement(db, NODE)["balance"] == 5 * 970
    assert ledger.statement(db, OPERATOR)["balance"] == 5 * 30
    page = ledger.statement(db, CLIENT, limit=2)
    assert [e["job_id"] for e in page["entries"]] == ["j4", "j3"] and page["next_before"] is not None
    rest = ledger.statement(db, CLIENT, limit=10, before=page["next_before"])
    assert [e["job_id"] for e in rest["entries"]] == ["j2", "j1", "j0"] and rest["next_before"] is None


def test_a_reversal_is_new_entries_and_a_closed_epoch_is_never_reversed():
    db = connect(":memory:")
    with db:
        for job_id in ("a", "b"):
            job(db, job_id)
            ledger.post(db, charge(job_id, 700, 70), at=1.0)
        db.execute("UPDATE jobs SET epoch = 1 WHERE id = 'a'")
        ledger.close_epoch(db, 1)
        refunds = ledger.reverse(db, ["a", "b"], at=2.0)
        assert ledger.reverse(db, ["b"], at=3.0) == []  # once
    assert refunds == [(CLIENT, 700)]  # "a" is in a closed epoch: settled, not undone
    kinds = [(e["job_id"], e["kind"], e["amount"]) for e in ledger.statement(db, CLIENT)["entries"]]
    assert kinds == [("b", "reversal", 700), ("b", "charge", -700), ("a", "charge", -700)]  # nothing edited
    ledger.check(db)
    assert dict(((a, r), v) for a, r, v in ledger.closed_balances(db)) == {
        (CLIENT, "client"): -700, (NODE, "node"): 630, (OPERATOR, "operator"): 70}
    assert ledger.spent(db) == {CLIENT: 700}


def test_the_check_finds_a_ledger_that_does_not_balance():
    db = connect(":memory:")
    with db:
        job(db, "a")
        ledger.post(db, charge("a", 500), at=1.0)
    db.execute("UPDATE ledger SET amount = amount + 1 WHERE role = 'node'")
    with pytest.raises(LedgerError, match="do not sum to zero"):
        ledger.check(db)
    db.execute("UPDATE ledger SET amount = amount - 1 WHERE role = 'node'")
    db.execute("UPDATE accounts SET balance = '7' WHERE role = 'node'")
    with pytest.raises(LedgerError, match="keeps"):
        ledger.check(db)


def test_balances_past_sqlites_integers_are_kept_exactly():
    db = connect(":memory:")
    big = 2 ** 62
    with db:
        for i in range(4):
            job(db, f"j{i}")
            ledger.post(db, charge(f"j{i}", big), at=1.0)
    assert ledger.statement(db, NODE)["balance"] == 4 * big  # past 2**63: kept as text, summed in Python
    ledger.check(db)


def test_a_receipts_database_whose_ledger_does_not_balance_is_refused_at_start(tmp_path):
    import asyncio

    from odla.operator.receipts import Receipts, ReceiptsError

    path = str(tmp_path / "jobs.db")
    db = connect(path)
    with db:
        job(db, "a")
        ledger.post(db, charge("a", 500), at=1.0)
        db.execute("UPDATE ledger SET amount = 1 WHERE role = 'client'")
    db.close()
    with pytest.raises(ReceiptsError, match="does not balance"):
        asyncio.run(Receipts(path, 30).open())
