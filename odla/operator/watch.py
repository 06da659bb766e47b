"""Seeing the network: Prometheus metrics, job receipts and the dashboard (the operator's routes).

    GET /metrics                Prometheus text format
    GET /jobs                   {"jobs": [...]} receipts, newest first; ?model= &node= &outcome= &since= &limit= &offset=
    GET /jobs/{id}              one receipt (the X-ODLA-Job header of its answer), also while it runs
    GET /dashboard              a page: nodes, requests and tokens per second, the latest jobs, live
    GET /dashboard/activity     the page's chart: jobs and output tokens per 5 s over 10 minutes

All but the page itself are behind the API keys (when set); the page asks for a key once,
and keeps it in the browser's local storage.
"""

from __future__ import annotations

import contextlib

from pathlib import Path
from typing import Any, Optional, Sequence

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, Response

from odla.core import protocol as p
from odla.serving.auth import Callers
from odla.core.errors import ODLAError
from odla.operator.metrics import CONTENT_TYPE, Activity, exposition
from odla.core.names import model_key
from odla.operator.cluster import FAILED
from odla.operator.receipts import Receipts
from odla.core.times import epoch

MAX_OFFSET = 1_000_000
"""The deepest page of ``GET /jobs`` (``offset``): past it, 422 (a larger number is no page, and SQLite's
integers end at 2**63)."""
PAGES = Path(__file__).resolve().parent / "dashboard"
# Nothing from anywhere else: no CDN, no inline script, no framing by other sites.
PAGE_POLICY = {"Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
                                          "frame-ancestors 'none'",
               "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def watch_router(prom: Any, activity: Activity, auth: Sequence[Any], callers: Callers) -> APIRouter:
    api = APIRouter(tags=["Seeing the network"])

    @api.get("/metrics", dependencies=auth, response_class=Response, summary="Prometheus metrics (text format)")
    async def metrics() -> Response:
        return Response(exposition(prom), media_type=CONTENT_TYPE)

    @api.get("/jobs", dependencies=auth, response_model=p.JobsResponse, summary="Job receipts, newest first")
    async def jobs(request: Request, model: Optional[str] = None, node: Optional[str] = None,
                   outcome: Optional[p.Outcome] = None,
                   since: Optional[str] = Query(None, description="ISO 8601, e.g. 2026-11-28T09:00:00Z"),
                   limit: int = Query(50, ge=1, le=1000),
                   offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> p.JobsResponse:
        after = epoch(since) if since is not None else None
        model = model_key(model) if model else None  # receipts name models canonically
        if since is not None and after is None:
            raise ODLAError(f"since must be an ISO 8601 time such as 2026-11-28T09:00:00Z (got {since!r})", 422)
        receipts: Receipts = request.app.state.receipts
        caller = whose(request)
        shared = getattr(request.app.state, "shared", None)
        if shared is not None and shared.ok:  # every operator's, through Redis
            await receipts.flush()
            with contextlib.suppress(*FAILED):
                return p.JobsResponse(jobs=await shared.receipts(model, node, outcome, after, limit, offset, caller))
        return p.JobsResponse(jobs=await receipts.find(model, node, outcome, after, limit, offset, caller))

    @api.get("/jobs/{job_id}", dependencies=auth, response_model=p.JobReceipt, summary="One job's receipt")
    async def job(job_id: str, request: Request) -> p.JobReceipt:
        receipt = await request.app.state.receipts.get(job_id)
        shared = getattr(request.app.state, "shared", None)
        if receipt is None and shared is not None and shared.ok:  # another operator's
            with contextlib.suppress(*FAILED):
                receipt = await shared.receipt(job_id)
        caller = whose(request)
        if receipt is None or caller is not None and receipt.caller != caller:  # another key's is none of its business
            raise ODLAError(f"unknown job: {job_id}", 404)
        return receipt

    @api.get("/jobs/{job_id}/proof", dependencies=auth, summary="A job's proof: receipt, signatures, Merkle path, epoch")
    async def proof(job_id: str, request: Request) -> dict:
        """What ``client.py verify`` checks (``odla.proofs.verify``); 409 while the job's epoch is open."""
        await job(job_id, request)  # 404 unless the caller may read the job
        return await request.app.state.epochs.proof(job_id)

    @api.get("/epochs", dependencies=auth, summary="Closed epochs, newest first")
    async def epochs(request: Request, limit: int = Query(100, ge=1, le=1000),
                     before: Optional[int] = Query(None, ge=1)) -> dict:
        return {"epochs": await request.app.state.epochs.list(limit, before)}

    @api.get("/epochs/{number}", dependencies=auth, summary="One closed epoch: its Merkle root, signed")
    async def one_epoch(number: int, request: Request) -> dict:
        return await request.app.state.epochs.get(number)

    def whose(request: Request) -> Optional[str]:
        """Whose receipts the caller may read: with API keys, its own, unless its key is an admin's."""
        return callers.whose(request.headers)

    @api.get("/dashboard/activity", dependencies=auth, summary="Jobs and output tokens per 5 s, last 10 minutes")
    async def activity_series() -> dict:
        return activity.series()

    @api.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(PAGES / "index.html", media_type="text/html; charset=utf-8", headers=PAGE_POLICY)

    @api.get("/dashboard/app.js", include_in_schema=False)
    async def dashboard_script() -> FileResponse:
        return FileResponse(PAGES / "app.js", media_type="text/javascript; charset=utf-8", headers=PAGE_POLICY)

    return api
