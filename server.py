"""ODLA operator: the node registry, the scheduler and the token-stream relay.

    python server.py        (config.json; env operator_port / OPERATOR_PORT, ODLA_CONFIG)

Endpoints:
    POST /register      {node_id, url, models}  node joins, or heartbeats (node-facing)
    POST /deregister    {node_id}               node leaves (node-facing)
    GET  /nodes         {"nodes": [...]}        the network
    POST /inference     {model, prompt, ...}    JSON-lines token stream from a node
    GET  /health        the operator itself
    GET  /metrics, /jobs, /jobs/{id}, /dashboard    seeing the network: see odla/operator/watch.py

Ollama's API (GET|HEAD /, /api/version, /api/tags, /api/ps, /api/show, /api/generate,
/api/chat, /api/embed, /api/embeddings) and OpenAI's (/v1/models, /v1/chat/completions,
/v1/completions, /v1/embeddings) are served too: see odla/operator/doors.py.

Jobs go to the node the scheduler picks (odla/operator/scheduler.py), or wait in a fair queue. Nodes
are health-checked every ``health_check_interval`` seconds, all at once; a node that fails
gets no new jobs, and one not seen for ``prune_after`` seconds is dropped.
"""

import asyncio
import contextlib
import functools
import ipaddress
import logging
import socket
import sys
import time
from urllib.parse import urlsplit
from typing import AsyncIterator, Callable, Optional

from fastapi import Depends, FastAPI, Request

from odla.core import protocol as p
from odla.serving.auth import (Callers, may_join, node_credential,
                       node_credential_dependency)
from odla.core.config import Settings, script_settings
from odla.operator.accounts import accounts_router
from odla.operator.doors import doors_router
from odla.core.errors import AuthError, ODLAError
from odla.operator.audits import Auditor
from odla.operator.countersign import Countersigner
from odla.operator.epochs import Epochs
from odla.operator.identities import NodeAddresses
from odla.proofs.identity import Identity, KeyFileError
from odla.settlement import ledger
from odla.settlement.prices import Prices
from odla.settlement.signin import Sessions
from odla.operator.link import link_router
from odla.serving.lifespan import background, serve, tune_gc
from odla.serving.inbound import build_app, openapi_body, read_body
from odla.core.logs import setup_logging
from odla.operator.metrics import Activity, NetworkCollector, RequestMetrics, metrics_registry
from odla.operator.nodes import NodeClient, NodeUnreachable
from odla.operator.registry import Clock, Node, Registry, capacity
from odla.serving.jobs import Job, door_of
from odla.core.names import listed, model_key
from odla.operator.receipts import Receipts, ReceiptsError
from odla.operator.receipts import connect as receipts_db
from odla.operator.relay import Router
from odla.operator.scheduler import Scheduler
from odla.operator.cluster import SharedState
from odla.serving.responses import STREAM_RESPONSES, LineStream
from odla.operator.watch import watch_router

log = logging.getLogger("odla.operator")
CONCURRENT_CHECKS = 256


class HealthChecker:
    """Checks every node at once, every interval, and prunes the silent ones."""

    def __init__(self, registry: Registry, nodes: NodeClient, settings: Settings,
                 on_unreachable: Callable[[str], int] = lambda node_id: 0,
                 on_healthy: Callable[..., None] = lambda grown=False: None) -> None:
        self.registry = registry
        self.nodes = nodes
        self.settings = settings
        self.on_unreachable = on_unreachable
        self.on_healthy = on_healthy
        self.rechecks: dict[str, asyncio.Task] = {}  # by node id: one pending recheck per node, found at once
        self.shared: Optional[SharedState] = None
        "With several operators: each node checked by one of them per interval, the result shared."
        self.found: dict[str, tuple[bool, bool, Optional[str]]] = {}  # this round's results, to share

    async def run(self) -> None:
        try:
            while True:
                await asyncio.sleep(self.settings.health_check_interval)
                await self.check_all()
        finally:
            for task in list(self.rechecks.values()):
                task.cancel()

    def suspect(self, node: Node) -> None:
        """A job could not reach the node: check it again soon, not only at the next round."""
        if node.node_id in self.rechecks:
            return
        task = self.rechecks[node.node_id] = asyncio.create_task(self._recheck(node), name=node.node_id)
        task.add_done_callback(lambda _: self.rechecks.pop(node.node_id, None))

    async def _recheck(self, node: Node) -> None:
        await asyncio.sleep(min(1.0, self.settings.health_check_interval))
        await self.check(node)

    async def check_all(self) -> None:
        """Every node, by ``CONCURRENT_CHECKS`` workers: thousands of nodes cost bounded tasks,
        sockets and memory, and the event loop keeps serving in between."""
        began, nodes = time.monotonic(), self.registry.nodes()
        interval = self.settings.health_check_interval
        if self.shared is not None:  # another operator checks some of them this round
            mine = await self.shared.checks_for([n.node_id for n in nodes if n.link is None], interval)
            nodes = [n for n in nodes if n.link is not None or n.node_id in mine]
        queue = iter(nodes)  # shared by the workers: each takes the next node when it is free

        async def worker() -> None:
            for node in queue:
                try:
                    await self.check(node)
                except Exception:  # the loop outlives a bad check
                    log.exception("health check of node %s failed unexpectedly", node.node_id)

        await asyncio.gather(*(worker() for _ in range(min(CONCURRENT_CHECKS, len(nodes)))))
        if self.shared is not None:
            found, self.found = self.found, {}
            await self.shared.share_health(found, interval)
        took = time.monotonic() - began
        if took > self.settings.health_check_interval:
            log.warning("health checks of %d nodes took %.1fs, longer than health_check_interval (%gs)",
                        len(nodes), took, self.settings.health_check_interval)
        for node_id in self.registry.prune():
            log.warning("node %s pruned: not seen for %.0fs", node_id, self.settings.prune_after)

    async def check(self, node: Node) -> None:
        try:
            status, body = await self.nodes.health(node)
        except (NodeUnreachable, ValueError) as exc:
            if node.healthy:
                log.warning("node %s failed its health check (%s)", node.node_id, exc)
            self.registry.mark_failed(node.node_id)
            self.found[node.node_id] = (False, isinstance(exc, NodeUnreachable), str(exc))
            if isinstance(exc, NodeUnreachable) and (cut := self.on_unreachable(node.node_id)):
                log.warning("node %s does not answer: cut its %d stream(s)", node.node_id, cut)
            return
        healthy = status == 200 and body.status == "healthy"
        if healthy != node.healthy:
            log.info("node %s is now %s", node.node_id, "healthy" if healthy else f"unhealthy ({body.error})")
        before = capacity(node)
        self.registry.seen(node.node_id, healthy=healthy, models=body.models)
        self.found[node.node_id] = (healthy, False, body.error)
        if healthy:
            self.on_healthy(grown=bool(capacity(node) - before))


def create_app(settings: Settings, *, clock: Optional[Clock] = None) -> FastAPI:
    """The operator's app. ``clock`` moves time in tests."""
    registry = Registry(prune_after=settings.prune_after, **({"clock": clock} if clock else {}))
    per_key = settings.max_queue_per_key or (max(1, settings.max_queue // 2) if settings.api_keys else None)
    scheduler = Scheduler(registry, max_queue=settings.max_queue, queue_timeout=settings.queue_timeout,
                          max_queue_per_key=per_key, affinity=settings.affinity)
    network = NetworkCollector(registry, scheduler)
    prices = Prices(settings.prices, settings.operator_fee_bps)
    sessions = Sessions(settings.signin_ttl, settings.chain_id, settings.signin_domain) if settings.wallet_signin \
        else None
    prom = metrics_registry(network)
    counted = RequestMetrics(prom)
    activity = Activity()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        receipts = app.state.receipts = Receipts(settings.jobs_db, settings.jobs_keep_days)
        try:
            identity = Identity.load(settings.operator_key_file, settings.operator_private_key)
            app.state.countersigner = Countersigner(identity, receipts)
            epochs = app.state.epochs = Epochs(identity, receipts, settings.epoch_seconds)
            await receipts.open()
            app.state.addresses = NodeAddresses(settings.node_addresses, settings.require_signed_nodes, receipts)
            await app.state.addresses.open()
            if prices:
                app.state.countersigner.prices = prices
            if settings.settlement == "evm":
                await settle_on_chain(app, identity)
        except (ReceiptsError, KeyFileError) as exc:
            app.state.startup_error = str(exc)
            raise
        log.info("operator key %s", identity.address)
        nodes = NodeClient(settings, identity.address)
        shared = app.state.shared = SharedState(settings, registry, scheduler.wake) if settings.redis_url else None
        try:
            router = app.state.router = Router(registry, nodes, scheduler)
            router.purse = app.state.purse
            app.state.on_exit = router.close  # Ctrl-C, SIGTERM: answers end now, saying why
            checker = app.state.checker = HealthChecker(registry, nodes, settings, on_unreachable=router.abort,
                                                        on_healthy=scheduler.wake)
            router.on_failure = checker.suspect
            router.audit_seed = settings.audit_seed
            router.resume, router.resume_attempts = settings.resume, settings.resume_attempts
            router.stall_timeout = settings.stall_timeout
            auditor = app.state.auditor = network.auditor = Auditor(settings, registry, router, receipts)
            if shared is not None:  # what each operator's audits find of a node, every operator judges it on
                # (operators may share a key file: each is its key, machine and port)
                shared.address = f"{identity.address}/{socket.gethostname()}:{settings.operator_port}"
                shared.on_standings = auditor.shared
                auditor.on_stand = shared.share_standing
            await auditor.open()
            app.state.countersigner.auditor = auditor
            def quarantined(node: Node) -> None:
                if node.address is not None:  # (an unsigned node has no receipts)
                    receipts.dispute_open(node.node_id, node.address, "the node is quarantined")
            auditor.on_quarantine = quarantined
            if shared is not None:
                checker.shared, shared.on_unreachable = shared, router.abort
                receipts.mirror = shared.add_receipts
                scheduler.cluster = shared
            async with contextlib.AsyncExitStack() as loops:
                await loops.enter_async_context(background(checker.run(), "health-checks"))
                await loops.enter_async_context(background(receipts.run(), "receipts"))
                await loops.enter_async_context(background(epochs.run(), "epochs"))
                await loops.enter_async_context(background(app.state.countersigner.run(), "receipts-check"))
                if app.state.poster is not None:
                    await loops.enter_async_context(background(app.state.poster.run(), "settlement"))
                if shared is not None:
                    await loops.enter_async_context(background(shared.run(), "shared-state"))
                    await loops.enter_async_context(background(shared.listen(), "freed-slots"))
                yield
        finally:
            if getattr(app.state, "auditor", None) is not None:
                await app.state.auditor.aclose()
            await nodes.aclose()
            await receipts.aclose()  # writes the last receipts
            if shared is not None:
                await shared.aclose()

    # With API keys, the API's description is behind them too; /docs and /redoc, which could not
    # send a key, are off.
    app = build_app("ODLA operator", lifespan, settings, on_refused=counted.refused, docs=not settings.api_keys,
                    listen_host=settings.operator_host)
    app.state.registry = registry
    app.state.shared = None  # set by the lifespan when redis_url is
    app.state.prices, app.state.sessions = prices, sessions
    app.state.purse = app.state.poster = None  # set by the lifespan with settlement "evm"

    async def settle_on_chain(app: FastAPI, identity: Identity) -> None:
        """Deposits read from the escrow, settlements posted to it (``settlement: "evm"``)."""
        from odla.settlement.chain import CHAINS, ChainError, Escrow  # web3: only when settling
        from odla.settlement.poster import Poster
        from odla.settlement import vouchers
        from odla.settlement.purse import Purse
        escrow = Escrow(settings.chain_rpc_url, settings.chain_id, settings.escrow_address)
        try:
            await asyncio.to_thread(escrow.check)
            token = await asyncio.to_thread(escrow.token)
        except ChainError as exc:  # it may come back: jobs wait for it (503), nothing is lost
            log.warning("settlement: %s", exc)
        else:
            if (token or "").lower() != (settings.settlement_token or "").lower():
                raise ReceiptsError(f"the escrow {settings.escrow_address} settles in {token or 'the native currency'}, "
                                    f"settlement_token says {settings.settlement_token or 'the native currency'}")
        purse = app.state.purse = Purse(prices, escrow, settings.max_job_tokens, settings.chain_poll)
        receipts = app.state.receipts
        purse.open(await receipts.in_db(ledger.spent), await receipts.in_db(vouchers.kept))
        purse.keep = lambda client, cumulative, signature: receipts.in_db(vouchers.keep, client, cumulative, signature)
        app.state.countersigner.on_charge = purse.charged
        app.state.receipts.on_refund = purse.refunded
        poster = app.state.poster = Poster(identity, escrow, receipts, purse.vouchers)
        await poster.open()
        app.state.epochs.on_close = poster.epoch_closed
        log.info("settlement on %s (chain %d), escrow %s", CHAINS.get(settings.chain_id, "chain"),
                 settings.chain_id, settings.escrow_address)
    node_auth = [Depends(node_credential_dependency(settings))]

    def check_node(request: Request, node_id: str) -> None:
        """The credential presented is the one for this node id (its own, or the join token)."""
        if not may_join(settings, node_id, node_credential(request.headers)):
            raise AuthError(f"missing or wrong join token for node {node_id}")
    callers = Callers(settings.api_keys, settings.admin_keys, sessions)
    client_auth = [Depends(callers.dependency())]

    def job_ended(job: Job) -> None:
        counted.observe(job)
        activity.add(job)
        for record in (job, *job.parts):  # a resumed answer's later legs: each node's receipt and audit, on its own
            app.state.receipts.ended(record)
            app.state.countersigner.ended(record)
            app.state.auditor.ended(record)
        if app.state.purse is not None:
            app.state.purse.ended(job)

    async def new_job(request: Request) -> None:
        """A caller allowed to run jobs (``api_keys``) gets its job's record, before its body is
        read. One dependency rather than the API-key one and this: FastAPI's cost is per dependency."""
        job = request.state.job = Job(door=door_of(request.scope["path"]), caller=callers(request.headers),
                                      on_end=job_ended, audit=app.state.auditor.sample())
        app.state.receipts.started(job)

    job_auth = [Depends(new_job)]

    # Bodies are read by the endpoints, after the join token is checked: no credentials, no read.
    @app.post("/register", response_model=p.RegisterResponse, response_model_exclude_none=True, dependencies=node_auth,
              openapi_extra=openapi_body(p.RegisterRequest))
    async def register(request: Request) -> p.RegisterResponse:
        body = await read_body(request, p.RegisterRequest, settings)
        check_node(request, body.node_id)
        address = request.app.state.addresses.admit(body.node_id, await request.body(), body)
        if is_self(body.url, settings):
            raise ODLAError(f"url {body.url} is this operator's own address, not a node's", 422)
        known = registry.get(body.node_id)
        if known is None and len(registry) >= settings.max_nodes:
            raise ODLAError(f"the network is full: {settings.max_nodes} nodes are registered (max_nodes)", 503)
        if known is not None and known.url != body.url and await request.app.state.router.nodes.is_node(known):
            raise ODLAError(f"node id {body.node_id!r} is taken by a live node at {known.url}: give this one "
                            "another NODE_ID", 409)
        # A node the operator could not reach stays out of rotation until a health check
        # from here succeeds: that it can reach us says nothing of whether we can reach it.
        doubted = known is not None and not known.healthy and known.url == body.url and body.healthy
        before = capacity(known)
        node = registry.take_report(body, body.url, healthy=body.healthy and not doubted)
        node.address = address
        request.app.state.auditor.restore(node)
        request.app.state.countersigner.take(node, body.receipts)
        if doubted:
            request.app.state.checker.suspect(node)
        scheduler.wake(grown=bool(capacity(node) - before))  # its slots may have grown
        if known is None:
            log.info("node %s registered at %s with %s", node.node_id, node.url, listed(node.models))
        if request.app.state.shared is not None:
            await request.app.state.shared.publish(body)
        # a signing node hears whom to make its receipts out to; SPEC.md's answer is unchanged otherwise
        return p.RegisterResponse(node_id=node.node_id, models=node.models, operator_address=address and
                                  request.app.state.countersigner.identity.address)

    @app.post("/deregister", dependencies=node_auth, openapi_extra=openapi_body(p.DeregisterRequest))
    async def deregister(request: Request) -> dict:
        body = await read_body(request, p.DeregisterRequest, settings)
        check_node(request, body.node_id)
        known = registry.get(body.node_id)
        if known is None or body.url is not None and body.url != known.url:  # never another node's row
            raise ODLAError(f"unknown node: {body.node_id}" + (f" at {body.url}" if body.url else ""), 404)
        registry.remove(body.node_id)
        if request.app.state.shared is not None:
            await request.app.state.shared.withdraw(body.node_id)
        log.info("node %s left the network", body.node_id)
        return {"status": "deregistered", "node_id": body.node_id}

    @app.get("/nodes", response_model=p.NodesResponse, dependencies=client_auth)
    async def nodes(request: Request) -> p.NodesResponse:
        now, listed = registry.clock(), registry.nodes()
        shared = request.app.state.shared
        active = await shared.active_jobs(listed) if shared is not None else {}
        builds = registry.builds()
        return p.NodesResponse(nodes=[n.info(now, active.get(n.node_id), builds) for n in listed])

    @app.get("/health")
    async def health(request: Request) -> dict:
        shared = request.app.state.shared
        if shared is not None and not shared.ok:  # serving from its last view of the network
            return {"status": "degraded", "nodes": len(registry), "error": shared.error}
        return {"status": "healthy", "nodes": len(registry)}

    @app.post("/inference", response_class=LineStream, dependencies=job_auth, responses=STREAM_RESPONSES,
              openapi_extra=openapi_body(p.InferenceRequest), summary="Run an inference request")
    async def inference(request: Request) -> LineStream:
        """JSON lines: tokens as the node streams them, then one final line."""
        body = await read_body(request, p.InferenceRequest, settings)
        router: Router = request.app.state.router
        job: Job = request.state.job
        job.model = model_key(body.model)  # one name per model in receipts and metrics, however it was spelled
        return LineStream(opening=lambda tell: router.open_job(body, job, tell), headers={p.JOB_HEADER: job.id},
                          job=job)

    app.include_router(doors_router(registry, client_auth, job_auth, [Depends(callers.admin_dependency())],
                                    settings.default_replicas))
    app.include_router(link_router(registry, settings, on_change=scheduler.wake,
                                   is_live=lambda node: app.state.router.nodes.is_node(node)))
    app.include_router(watch_router(prom, activity, client_auth, callers))
    app.include_router(accounts_router(prices, callers, client_auth))
    if settings.api_keys:
        @app.get("/openapi.json", dependencies=client_auth, include_in_schema=False)
        async def openapi() -> dict:
            return app.openapi()
    return app


def is_self(url: str, settings: Settings) -> bool:
    """Would requests to ``url`` reach this operator? (A node registered at the operator's own
    address would make every job call the operator from itself, without end.)"""
    parts = urlsplit(url)
    if parts.port != settings.operator_port and not (parts.port is None and settings.operator_port in (80, 443)):
        return False
    host = (parts.hostname or "").lower()
    if host in ("localhost", settings.operator_host.lower()) or host == urlsplit(settings.operator_url).hostname:
        return True
    with contextlib.suppress(ValueError):
        address = ipaddress.ip_address(host)
        return address.is_loopback or address.is_unspecified or (
            settings.operator_host in ("0.0.0.0", "::") and host in _own_addresses())
    return False


@functools.lru_cache(maxsize=1)
def _own_addresses() -> frozenset[str]:
    """This host's addresses, looked up once (a blocking lookup: not again on each registration)."""
    with contextlib.suppress(OSError):
        return frozenset(info[4][0] for info in socket.getaddrinfo(socket.gethostname(), None))
    return frozenset()


def warn_if_open(settings: Settings) -> None:
    """Say loudly when anyone on the network could join or use this operator."""
    if settings.join_token or settings.api_keys:
        return
    host = settings.operator_host
    with contextlib.suppress(ValueError):
        if host == "localhost" or ipaddress.ip_address(host).is_loopback:
            return
    log.warning("SECURITY: listening on %s with no join_token and no api_keys: anyone who can reach "
                "port %d can register a node (and receive prompts) or run inference. Set "
                "ODLA_JOIN_TOKEN and ODLA_API_KEYS, or operator_host 127.0.0.1.", host, settings.operator_port)


def main() -> None:
    settings = script_settings("operator")
    setup_logging(settings.log_level)
    try:  # a jobs_db that cannot be used stops the operator before it listens
        receipts_db(settings.jobs_db).close()
    except ReceiptsError as exc:
        sys.exit(f"operator: {exc}")
    tune_gc()
    warn_if_open(settings)
    # ws_per_message_deflate off: each compressed link holds zlib state from its handshake on (20
    # anonymous links cost the operator +283 MB), to save bytes on frames of a few tokens each.
    serve(create_app(settings), settings.operator_host, settings.operator_port, "operator",
          request_timeout=settings.request_timeout, header_timeout=settings.header_timeout,
          limit_concurrency=settings.max_connections,
          ws_per_message_deflate=False)


if __name__ == "__main__":
    main()
