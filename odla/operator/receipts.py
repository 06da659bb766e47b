"""Job receipts: every job's record, kept in SQLite for ``jobs_keep_days``.

    receipts = Receipts(settings.jobs_db, settings.jobs_keep_days)   # owned by the operator's lifespan
    await receipts.open()
    receipts.started(job); ...; receipts.ended(job)   # in the event loop: a dict and a list, no I/O
    async with background(receipts.run(), "receipts"): ...   # writes what ended, in batches
    await receipts.get(job_id); await receipts.find(model=..., limit=50)
    await receipts.aclose()                                  # writes the rest

Writing is off the hot path: a job that ends is appended to a list, and a background
loop writes the list every ``FLUSH_S`` in one transaction, in a thread of its own (the
only thread that touches the database, so ``:memory:`` works too). A job still running,
or ended and not yet written, is found by ``get`` all the same; ``find`` writes what is
pending first, so a listing never misses a job that has ended.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import astuple, fields
from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from odla.serving.jobs import Job
from odla.core.protocol import JobPrediction, JobReceipt
from odla.core.usage import Usage
from odla.settlement import ledger

log = logging.getLogger("odla.operator")

MAX_PENDING = 100_000
"Ended jobs kept in memory while their receipts cannot be written (a full disk): the newest."
USAGE = tuple(f.name for f in fields(Usage))
PREDICTION = {"predicted_node": "TEXT", "predicted_wait": "REAL", "predicted_load": "REAL", "predicted_run": "REAL",
              "predicted_tokens": "INTEGER", "predicted_prompt": "REAL"}
"The scheduler's prediction (``JobPrediction``): columns added to a database made before them."
PROOF = {"node_address": "TEXT", "request_hash": "TEXT", "output_hash": "TEXT", "receipt": "TEXT",
         "node_signature": "TEXT", "operator_signature": "TEXT", "disputed": "TEXT", "receipt_digest": "TEXT"}
"What the job's receipt proves (``odla.operator.countersign``): columns added to a database made before them."
EPOCH = {"epoch": "INTEGER", "leaf_index": "INTEGER"}
"The epoch whose Merkle tree holds the job's receipt, and its place there (``odla.operator.epochs``)."
RESUMED = {"legs": "TEXT", "part_of": "TEXT"}
"""When another node finished the answer: each node and the tokens it gave, as JSON; on a later leg's own
record, the job it is part of (``odla.operator.resume``)."""
ADDED = {**PREDICTION, **PROOF, **EPOCH, **RESUMED}
COLUMNS = ("id", "started", "model", "node", "door", "outcome", "error", "caller", "first_token", "finished",
           "failovers", "queue_wait", *USAGE, *PREDICTION, *PROOF, *RESUMED)
SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, started REAL NOT NULL, model TEXT NOT NULL, node TEXT, door TEXT NOT NULL,
    outcome TEXT, error TEXT, caller TEXT, first_token REAL, finished REAL, failovers INTEGER NOT NULL,
    queue_wait REAL, prompt_tokens INTEGER, output_tokens INTEGER, total_duration INTEGER,
    load_duration INTEGER, prompt_eval_duration INTEGER, eval_duration INTEGER, predicted_node TEXT,
    predicted_wait REAL, predicted_load REAL, predicted_run REAL, predicted_tokens INTEGER, predicted_prompt REAL,
    node_address TEXT, request_hash TEXT, output_hash TEXT, receipt TEXT, node_signature TEXT, operator_signature TEXT,
    disputed TEXT, receipt_digest TEXT, epoch INTEGER, leaf_index INTEGER, legs TEXT, part_of TEXT);
CREATE INDEX IF NOT EXISTS jobs_by_start ON jobs (started);
CREATE TABLE IF NOT EXISTS epochs (number INTEGER PRIMARY KEY, typed TEXT NOT NULL, signature TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS standings (node_id TEXT PRIMARY KEY, passed INTEGER NOT NULL, failed INTEGER NOT NULL,
    disputed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS node_addresses (node_id TEXT PRIMARY KEY, address TEXT NOT NULL, bound REAL NOT NULL);
"""
INSERT = f"INSERT OR REPLACE INTO jobs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"


class ReceiptsError(Exception):
    """The receipts database cannot be opened."""


class Receipts:
    FLUSH_S = 0.5
    "How often ended jobs are written."
    PRUNE_S = 3600.0
    "How often receipts older than ``keep_days`` are deleted."

    def __init__(self, path: str, keep_days: float, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.keep_s = keep_days * 86400
        self.clock = clock
        self.running: dict[str, Job] = {}
        self.pending: list[Job] = []
        self.bindings: list[tuple[str, str, float]] = []
        self.disputes: list[tuple[str, str, str]] = []
        self.standings: dict[str, tuple[int, int, int]] = {}
        self.signatures: list[tuple[str, str, str, Optional[str], str, str]] = []
        """Receipts signed by their nodes and countersigned since the last batch: (message, node's,
        operator's, disputed, digest, id)."""
        self.charges: list[ledger.Charge] = []
        "What those receipts move in the ledger (``odla.settlement.ledger``): written in their transaction."
        self.signed_jobs: list[Job] = []
        "Their jobs: copied again (``mirror``), with the signatures, once written."
        "Node ids newly bound to their addresses (``odla.operator.identities``), written with the next batch."
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="odla-receipts")
        self._db: Optional[sqlite3.Connection] = None
        self.on_refund: Callable[[list[tuple[str, int]]], None] = lambda refunds: None
        "Hears of charges reversed by a dispute: (client, amount) each (``odla.settlement.purse``)."
        self.mirror: Optional[Callable[[list[Job]], Awaitable[None]]] = None
        "Also gets each batch written (several operators: odla/operator/cluster.py copies it to Redis)."

    # --- in the event loop, per job: no I/O ---------------------------------------------------

    def started(self, job: Job) -> None:
        self.running[job.id] = job

    def ended(self, job: Job) -> None:
        self.running.pop(job.id, None)
        self.pending.append(job)

    # --- the database, in its thread ------------------------------------------------------------

    async def open(self) -> None:
        """Open (or create) the database; ``ReceiptsError`` says why it cannot be."""
        self._db = await self._call(connect, self.path)
        try:
            await self._call(ledger.check, self._db)
        except ledger.LedgerError as exc:
            await self._call(self._close)
            raise ReceiptsError(f"the ledger in {self.path} does not balance: {exc}. Nothing was changed; "
                                "restore the file from a backup") from None
        await self._call(self._prune, self.clock() - self.keep_s)

    async def run(self) -> None:
        """Write what has ended every ``FLUSH_S``; prune every ``PRUNE_S``. Runs until cancelled."""
        pruned = self.clock()
        while True:
            await asyncio.sleep(self.FLUSH_S)
            try:
                await self.flush()
                if self.clock() - pruned >= self.PRUNE_S:
                    pruned = self.clock()
                    await self._call(self._prune, pruned - self.keep_s)
            except sqlite3.Error:  # a full disk, say: the network goes on, says so, and tries again
                log.exception("cannot write job receipts to %s", self.path)
            except Exception:  # noqa: BLE001 - the writer outlives any one batch
                log.exception("job receipts could not be written; that batch is dropped")

    def countersigned(self, job: Job) -> None:
        """``job.signed`` was set after the job ended: its row gets it with the next batch."""
        assert job.signed is not None
        self.signatures.append((*job.signed, job.id))
        self.signed_jobs.append(job)
        if job.charge is not None:
            self.charges.append(job.charge)

    def stand(self, node_id: str, passed: int, failed: int, disputed: int) -> None:
        """What audits and receipts found of a node, kept with the next batch (``odla.operator.audits``)."""
        self.standings[node_id] = (passed, failed, disputed)

    async def standings_kept(self) -> dict[str, tuple[int, int, int]]:
        rows = await self._call(self._select, "SELECT node_id, passed, failed, disputed FROM standings", ())
        return {node_id: (passed, failed, disputed) for node_id, passed, failed, disputed in rows}

    def dispute_open(self, node_id: str, address: str, reason: str) -> None:
        """The receipts signed by the node's key that are not yet in a closed epoch are disputed (with the
        next batch): found by its key, as a resumed job's row names its last node and holds its first's receipt."""
        self.disputes.append((reason, node_id, address))

    def bind(self, node_id: str, address: str) -> None:
        self.bindings.append((node_id, address, self.clock()))

    async def addresses(self) -> dict[str, str]:
        """Every node id bound to an address, as kept."""
        return dict(await self._call(self._select, "SELECT node_id, address FROM node_addresses", ()))

    async def flush(self) -> None:
        if self.bindings:
            bindings, self.bindings = self.bindings, []
            try:
                await self._call(self._bind, bindings)
            except sqlite3.Error:
                self.bindings[:0] = bindings
                raise
        if self.pending:
            batch, self.pending = self.pending, []
            try:
                await self._call(self._write, [_row(job) for job in batch])
            except sqlite3.Error:
                self.pending[:0] = batch[-MAX_PENDING:]  # kept for the next try (bounded)
                raise
            if self.mirror is not None:
                await self.mirror(batch)
        if self.signatures:  # after the jobs' rows: a receipt may come before its job was written
            signatures, self.signatures = self.signatures, []
            charges, self.charges = self.charges, []
            signed, self.signed_jobs = self.signed_jobs, []
            try:
                await self._call(self._sign, signatures, charges)
            except sqlite3.Error:
                self.signatures[:0] = signatures[-MAX_PENDING:]
                self.charges[:0] = charges
                self.signed_jobs[:0] = signed[-MAX_PENDING:]
                raise
            if self.mirror is not None:  # the copy every operator reads gets the signatures too
                await self.mirror(signed)
        if self.disputes:
            disputes, self.disputes = self.disputes, []
            self.on_refund(await self._call(self._dispute, disputes))
        if self.standings:
            standings, self.standings = self.standings, {}
            await self._call(self._stand, [(node_id, *found) for node_id, found in standings.items()])

    async def get(self, job_id: str) -> Optional[JobReceipt]:
        job = self.running.get(job_id) or next((j for j in self.pending if j.id == job_id), None)
        if job is not None:
            return job.receipt()
        rows = await self._call(self._select, f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        return _receipt(rows[0]) if rows else None

    async def find(self, model: Optional[str] = None, node: Optional[str] = None, outcome: Optional[str] = None,
                   since: Optional[float] = None, limit: int = 50, offset: int = 0,
                   caller: Optional[str] = None) -> list[JobReceipt]:
        """Ended jobs, newest first (``caller``: only that caller's); a resumed answer's later legs
        are in their job's ``legs``, not listed."""
        await self.flush()
        where, args = ["part_of IS NULL"], []
        for column, value in (("model", model), ("node", node), ("outcome", outcome), ("caller", caller)):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if since is not None:
            where.append("started >= ?")
            args.append(since)
        sql = (f"SELECT {', '.join(COLUMNS)} FROM jobs WHERE {' AND '.join(where)} "
               "ORDER BY started DESC, rowid DESC LIMIT ? OFFSET ?")
        return [_receipt(row) for row in await self._call(self._select, sql, (*args, limit, offset))]

    async def aclose(self) -> None:
        try:
            await self.flush()
        finally:
            await self._call(self._close)
            self._thread.shutdown(wait=True)

    async def in_db(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(connection, *args)`` in the database's thread (``odla.operator.epochs`` reads and writes so)."""
        return await self._call(lambda: fn(self._db, *args))

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _write(self, rows: list[tuple]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany(INSERT, rows)

    def _sign(self, rows: list[tuple], charges: list[ledger.Charge]) -> None:
        assert self._db is not None
        with self._db:  # a receipt and what it moves in the ledger: both or neither
            self._db.executemany("UPDATE jobs SET receipt = ?, node_signature = ?, operator_signature = ?, "
                                 "disputed = ?, receipt_digest = ? WHERE id = ?", rows)
            now = self.clock()
            for charge in charges:
                ledger.post(self._db, charge, now)

    def _stand(self, rows: list[tuple[str, int, int, int]]) -> None:
        assert self._db is not None
        with self._db:
            self._db.executemany("INSERT OR REPLACE INTO standings (node_id, passed, failed, disputed) VALUES (?, ?, ?, ?)",
                                 rows)

    def _dispute(self, rows: list[tuple[str, str, str]]) -> list[tuple[str, int]]:
        assert self._db is not None
        refunds = []
        with self._db:  # disputed, and what they moved undone by new entries, in one transaction
            for reason, node_id, address in rows:
                open_ = [job_id for (job_id,) in self._db.execute(
                    "SELECT id FROM jobs WHERE node_address = ? AND receipt IS NOT NULL AND epoch IS NULL "
                    "AND disputed IS NULL", (address,))]
                self._db.executemany("UPDATE jobs SET disputed = ? WHERE id = ?", ((reason, j) for j in open_))
                undone = ledger.reverse(self._db, open_, self.clock())
                if undone:
                    log.warning("node %s: %d charge(s) of its open epoch reversed: %s", node_id, len(undone), reason)
                refunds += undone
        return refunds

    def _bind(self, rows: list[tuple[str, str, float]]) -> None:
        assert self._db is not None
        with self._db:  # the first binding of an id stays (a restarted operator's own rows are the same)
            self._db.executemany("INSERT OR IGNORE INTO node_addresses (node_id, address, bound) VALUES (?, ?, ?)", rows)

    def _select(self, sql: str, args: tuple) -> list[tuple]:
        assert self._db is not None
        return self._db.execute(sql, args).fetchall()

    def _prune(self, before: float) -> None:
        assert self._db is not None
        with self._db:
            gone = self._db.execute("DELETE FROM jobs WHERE started < ?", (before,)).rowcount
        if gone:
            log.info("deleted %d job receipt(s) older than jobs_keep_days", gone)

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def connect(path: str) -> sqlite3.Connection:
    """Open (or create) the receipts database at ``path``; ``ReceiptsError`` says why it cannot be."""
    try:
        if path != ":memory:" and not Path(path).parent.is_dir():
            raise OSError(f"no directory {Path(path).parent}")
        db = sqlite3.connect(path)
        try:
            if path != ":memory:":
                db.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
                db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(SCHEMA + ledger.SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in ADDED.items():
                if column not in have:  # made by an older ODLA: its rows have none
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        except sqlite3.Error:
            db.close()
            raise
    except (sqlite3.Error, OSError) as exc:
        raise ReceiptsError(f"cannot open jobs_db {path}: {exc}") from None
    return db


def _row(job: Job) -> tuple:
    guess = job.prediction
    predicted = (guess.node, guess.wait_s, guess.load_s, guess.run_s, guess.tokens, guess.prompt_s) if guess \
        else (None,) * len(PREDICTION)
    return (job.id, job.started, job.model, job.node or None, job.door, job.outcome, job.error, job.caller or None,
            job.first_token, job.finished, job.failovers, job.queue_wait, *astuple(job.usage), *predicted,
            job.node_address, job.request_hash, job.output_hash, *(job.signed or (None,) * 5),
            json.dumps(job.legs) if job.legs else None, job.part_of)


def _receipt(row: tuple) -> JobReceipt:
    data = dict(zip(COLUMNS, row))
    usage = Usage(**{name: data.pop(name) for name in USAGE})
    node, wait, load, run, tokens, prompt = (data.pop(name) for name in PREDICTION)
    address, request_hash, output_hash, typed, node_signature, operator_signature, disputed, digest = (
        data.pop(name) for name in PROOF)
    signed = (typed, node_signature, operator_signature, disputed, digest) if typed else None
    legs = [(node, tokens) for node, tokens in json.loads(data.pop("legs"))] if data.get("legs") else []
    data.pop("legs", None)
    part_of = data.pop("part_of")
    prompt = prompt or 0.0  # a receipt written before prompts were predicted
    prediction = JobPrediction(node=node, finish_s=round(wait + load + prompt + run, 3), wait_s=wait, load_s=load,
                               prompt_s=prompt, run_s=run, tokens=tokens) if node is not None else None
    return Job(node=data.pop("node") or "", caller=data.pop("caller") or "", usage=usage, prediction=prediction,
               node_address=address, request_hash=request_hash, output_hash=output_hash, signed=signed, legs=legs,
               part_of=part_of, **data).receipt()
