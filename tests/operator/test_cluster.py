"""Several operators on one real redis-server (issue 17): shared nodes, slots as leases, Redis down.
Real processes, the simulator as Ollama."""

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import httpx
import pytest

from sim.ollama_sim import sim_tokens
from odla.core import protocol as p
from odla.operator.registry import Registry
from odla.core.errors import QueueFull, QueueTimeout
from odla.operator.scheduler import Scheduler
from odla.operator.cluster import SharedState
from tests.fakes import Cutter, RawNode, ndjson_reply
from tests.helpers import ROOT, free_port, read_stream, settings, wait_for


@pytest.fixture
def two(net, redis_server):
    """Two operators on one Redis; nodes register with the first (``net.op_url``)."""
    first = net.operator(redis_url=redis_server.url, lease_seconds=2)
    port = free_port()
    net.answers(net.start("server.py", operator_port=str(port)), f"http://127.0.0.1:{port}/health")
    return net, f"http://127.0.0.1:{port}", first


def one_node(net, other: str, slots: str, *sim_flags: str) -> str:
    """A simulator and a node ``n1`` with ``slots``, registered with the first operator and seen by both."""
    sim = net.sim(*sim_flags)
    net.node("n1", sim, OLLAMA_NUM_PARALLEL=slots)
    net.wait_nodes("n1")
    wait_for(lambda: "n1" in listed(other), timeout=5)
    return sim


def tokens(lines: list[dict]) -> list[str]:
    return [line["token"] for line in lines if "token" in line]  # queue places aside


def listed(url: str) -> dict:
    return {n["node_id"]: n for n in httpx.get(f"{url}/nodes", timeout=5).json()["nodes"]}


async def ask(urls: list[str], count: int, tokens: int) -> list[list[dict]]:
    async with httpx.AsyncClient(timeout=60) as http:
        async def one(i: int) -> list[dict]:
            body = {"model": "llama3", "prompt": f"p{i}"}
            async with http.stream("POST", f"{urls[i % len(urls)]}/inference", json=body) as resp:
                return [json.loads(line) async for line in resp.aiter_lines() if line]
        return await asyncio.gather(*(one(i) for i in range(count)))


def test_two_operators_never_run_two_jobs_at_once_on_a_one_slot_node(two):
    net, other, _ = two
    sim = one_node(net, other, "1", "--tokens", "4", "--delay", "0.02")
    answers = asyncio.run(ask([net.op_url, other], 20, 4))
    for i, lines in enumerate(answers):
        assert tokens(lines) == sim_tokens(f"p{i}", 4) and lines[-1] == {"done": True}, lines
    stats = httpx.get(f"{sim}/_sim/stats").json()
    assert stats["completed"] == 20 and stats["most_active"] == 1, stats
    assert httpx.get(f"{other}/health").json()["status"] == "healthy"


def test_a_slow_redis_is_not_taken_for_a_dead_one(net, redis_server):
    """Redis answers in 1.3 s for 4 s (a delaying proxy) while four jobs run through two operators:
    calls that miss their 1 s deadline fail alone and are asked again with more patience; neither
    operator falls back to its own count, so a one-slot node never runs two jobs at once, and no
    slot stays held afterwards."""
    with Cutter(redis_server.port) as slow:
        net.operator(redis_url=f"redis://127.0.0.1:{slow.url.rsplit(':', 1)[1]}/0", lease_seconds=2)
        port = free_port()
        other = f"http://127.0.0.1:{port}"
        net.answers(net.start("server.py", operator_port=str(port)), f"{other}/health")
        sim = one_node(net, other, "1", "--tokens", "4", "--delay", "0.05")

        async def slow_for_a_while() -> list[list[dict]]:
            slow.delay = 1.3
            jobs = asyncio.ensure_future(ask([net.op_url, other], 4, 4))
            await asyncio.sleep(3)
            async with httpx.AsyncClient(timeout=10) as http:
                for url in (net.op_url, other):
                    health = (await http.get(f"{url}/health")).json()
                    assert health["status"] == "healthy", health  # slow, not down
            await asyncio.sleep(1)
            slow.delay = 0.0
            return await jobs

        answers = asyncio.run(slow_for_a_while())
    for i, lines in enumerate(answers):
        assert tokens(lines) == sim_tokens(f"p{i}", 4) and lines[-1] == {"done": True}, lines
    stats = httpx.get(f"{sim}/_sim/stats").json()
    assert stats["completed"] == 4 and stats["most_active"] == 1, stats
    for url in (net.op_url, other):
        wait_for(lambda: listed(url)["n1"]["active_jobs"] == 0, timeout=5)


def test_both_operators_list_the_jobs_running_on_a_node_whichever_relays_them(two):
    net, other, _ = two
    sim = one_node(net, other, "2", "--tokens", "2")
    httpx.post(f"{sim}/_sim/config", json={"hold_last": True})
    with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": "held"},
                      timeout=30) as resp:
        lines = resp.iter_lines()
        next(lines)  # running, held at its last token
        for url in (net.op_url, other):
            assert listed(url)["n1"]["active_jobs"] == 1
        httpx.post(f"{sim}/_sim/config", json={"hold_last": False})
        httpx.post(f"{sim}/_sim/release")
        assert json.loads(list(lines)[-1]) == {"done": True}
    wait_for(lambda: listed(other)["n1"]["active_jobs"] == 0, timeout=2)


def test_an_operator_killed_mid_stream_frees_its_slot_within_the_lease(two):
    net, other, first = two
    sim = one_node(net, other, "1", "--tokens", "4")
    httpx.post(f"{sim}/_sim/config", json={"hold_last": True})
    with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": "held"}, timeout=30) as resp:
        lines = resp.iter_lines()
        assert "token" in json.loads(next(lines))
        killed = time.monotonic()
        first.send_signal(signal.SIGKILL)  # its lease on the node's one slot stays in Redis
    httpx.post(f"{sim}/_sim/config", json={"hold_last": False})
    code, lines = 0, []
    with httpx.stream("POST", f"{other}/inference", json={"model": "llama3", "prompt": "after"}, timeout=30) as resp:
        code, lines = resp.status_code, read_stream(resp)
    assert code == 200 and tokens(lines) == sim_tokens("after", 4)
    assert time.monotonic() - killed < 2 + 2  # the dead operator's lease (2 s) expired; no longer
    assert "n1" in listed(other)  # the node stays listed (it heartbeats to the dead one, but is alive)


def test_a_node_that_stops_heartbeating_leaves_both_operators(two):
    net, other, _ = two
    sim = net.sim()
    node = net.node("n1", sim)
    net.wait_nodes("n1")
    wait_for(lambda: "n1" in listed(other), timeout=5)
    node.stop(signal.SIGKILL)  # no deregistration, no more heartbeats
    began = time.monotonic()
    wait_for(lambda: "n1" not in listed(net.op_url) and "n1" not in listed(other), timeout=15)
    assert time.monotonic() - began < 3 + 2  # prune_after (3 s here) and a sync


def test_redis_down_serves_from_the_last_view_and_converges_after(two, redis_server):
    net, other, _ = two
    one_node(net, other, "8", "--tokens", "30", "--delay", "0.1")

    async def under_load() -> list[list[dict]]:
        streams = asyncio.ensure_future(ask([net.op_url, other], 4, 30))  # 3 s each, under way
        await asyncio.sleep(0.5)
        redis_server.__exit__()  # Redis goes away mid-stream, for 10 s
        down = asyncio.get_running_loop().time()
        async with httpx.AsyncClient(timeout=30) as http:
            for url in (net.op_url, other):  # judged down by the sync loop, after OUTAGE_S of failed reads
                while (await http.get(f"{url}/health")).json()["status"] != "degraded":
                    assert asyncio.get_running_loop().time() - down < 4.5
                    await asyncio.sleep(0.1)
        fresh = []
        while asyncio.get_running_loop().time() - down < 10:  # new requests keep working, all along
            fresh += await ask([net.op_url, other], 4, 30)
        return [*await streams, *fresh]

    answers = asyncio.run(under_load())
    assert len(answers) >= 4 + 8
    for lines in answers:
        assert lines[-1] == {"done": True} and len(tokens(lines)) == 30
    redis_server.__enter__()  # back, and empty (no persistence)
    for url in (net.op_url, other):
        wait_for(lambda: httpx.get(f"{url}/health").json()["status"] == "healthy", timeout=10)
        wait_for(lambda: "n1" in listed(url), timeout=10)


def test_a_redis_that_hangs_costs_a_request_a_few_seconds_at_most(two, redis_server):
    """Redis stopped with SIGSTOP: it accepts connections and never answers. Each call to it has a
    deadline, and the sync loop judges it down after ``OUTAGE_S``: requests go on through both
    operators, the first few within the patience a slow Redis is given (1 + 2 + 2.5 s at most), the
    rest at once, and the operators say they are degraded, with the reason; after SIGCONT both are healthy again."""
    net, other, _ = two
    one_node(net, other, "2", "--tokens", "3")
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        for i in range(6):
            began = time.monotonic()
            with httpx.stream("POST", f"{(net.op_url, other)[i % 2]}/inference",
                              json={"model": "llama3", "prompt": f"h{i}"}, timeout=10) as resp:
                assert tokens(read_stream(resp)) == sim_tokens(f"h{i}", 3)
            assert time.monotonic() - began < (6.5 if i < 2 else 1), i
        for url in (net.op_url, other):
            health = httpx.get(f"{url}/health").json()
            assert health["status"] == "degraded" and health["error"] == "redis: timed out", health
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    for url in (net.op_url, other):
        wait_for(lambda: httpx.get(f"{url}/health").json()["status"] == "healthy", timeout=10)


@contextlib.contextmanager
def heartbeats(operator_url: str, node_id: str, url: str, **fields) -> Iterator[None]:
    """What a node agent does for a fake node: register every 0.5 s (heartbeat_interval here)."""
    stop = threading.Event()
    body = {"node_id": node_id, "url": url, "models": ["llama3:latest"], **fields}

    def beat() -> None:
        while True:
            httpx.post(f"{operator_url}/register", json=body)
            if stop.wait(0.5):
                return
    beating = threading.Thread(target=beat)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()


def test_each_node_is_checked_by_one_operator_per_interval_and_both_hear_the_result(two):
    net, other, _ = two

    async def unused(first, reader, writer):
        return False

    with RawNode(unused, models=["llama3:latest"]) as node, heartbeats(net.op_url, "raw", node.url):
        wait_for(lambda: "raw" in listed(net.op_url) and "raw" in listed(other), timeout=5)
        time.sleep(1)
        before = sum(r.startswith("GET /health") for r in node.requests)
        time.sleep(4)  # eight intervals of 0.5 s
        checks = sum(r.startswith("GET /health") for r in node.requests) - before
        assert 6 <= checks <= 11, checks  # about one per interval; two operators on their own: 16
        node.healthy = False  # it stops answering its health checks
        wait_for(lambda: not listed(net.op_url)["raw"]["healthy"] and not listed(other)["raw"]["healthy"],
                 timeout=5)


def test_a_node_resting_after_failures_on_one_operator_rests_on_the_other(two):
    net, other, _ = two

    async def fails(first, reader, writer):
        writer.write(b"HTTP/1.1 500 Broken\r\nContent-Type: application/json\r\nContent-Length: 17\r\n\r\n"
                     b'{"error": "oops"}')
        return True

    with RawNode(fails, models=["llama3:latest"]) as node, heartbeats(net.op_url, "raw", node.url):
        wait_for(lambda: "raw" in listed(other), timeout=5)
        for _ in range(3):  # three failed jobs in a row, all at the first operator
            httpx.post(f"{net.op_url}/inference", json={"model": "llama3", "prompt": "x"}, timeout=10)
        assert listed(net.op_url)["raw"]["resting_until"] is not None
        wait_for(lambda: listed(other)["raw"]["resting_until"] is not None, timeout=3)


def test_every_operators_receipts_are_read_from_any_operator(two):
    net, other, _ = two
    one_node(net, other, "4", "--tokens", "2")
    ids = []
    for i, url in enumerate([net.op_url] * 3 + [other] * 2):
        with httpx.stream("POST", f"{url}/inference", json={"model": "llama3", "prompt": f"r{i}"}, timeout=30) as resp:
            read_stream(resp)
            ids.append(resp.headers["x-odla-job"])
    for url in (net.op_url, other):
        wait_for(lambda: len(httpx.get(f"{url}/jobs").json()["jobs"]) == 5, timeout=5)
        listing = httpx.get(f"{url}/jobs").json()["jobs"]
        assert [j["id"] for j in listing] == ids[::-1] and all(j["outcome"] == "ok" for j in listing)
        assert len(httpx.get(f"{url}/jobs", params={"limit": 2, "offset": 1}).json()["jobs"]) == 2
        for job_id in ids:
            assert httpx.get(f"{url}/jobs/{job_id}").json()["node"] == "n1"


@pytest.mark.parametrize("link", ["http", "dial"])
def test_a_node_given_several_operators_joins_each(net, link):
    """operator_url as a list: a node registers with (or dials) each; no Redis needed for that."""
    sim = net.sim("--tokens", "3")
    net.operator()
    port = free_port()
    other = f"http://127.0.0.1:{port}"
    net.answers(net.start("server.py", operator_port=str(port)), f"{other}/health")
    node = net.node("n1", sim, COORDINATOR_URL=f"{net.op_url},{other}", NODE_LINK=link)
    for url in (net.op_url, other):
        wait_for(lambda: "n1" in listed(url), timeout=10)
        assert listed(url)["n1"]["link"] == link
        with httpx.stream("POST", f"{url}/inference", json={"model": "llama3", "prompt": "both"}, timeout=30) as resp:
            assert tokens(read_stream(resp)) == sim_tokens("both", 3)
    node.stop()  # leaves both
    for url in (net.op_url, other):
        wait_for(lambda: "n1" not in listed(url), timeout=5)


def test_what_a_node_reports_later_reaches_every_operator(two):
    """Not only its first report: a model it pulled, what it has loaded, its disk, its models' digests
    (which say whom its answers may be resumed or audited on) reach the operator it never spoke to."""
    net, other, _ = two
    sim = one_node(net, other, "2")

    def same_disk() -> bool:  # the disk is real and shared: it may change between two heartbeats
        mine = listed(net.op_url)["n1"]["disk_free"]
        return mine is not None and listed(other)["n1"]["disk_free"] == mine

    wait_for(same_disk, timeout=10)
    httpx.post(f"{sim}/api/pull", json={"model": "mistral", "stream": False}, timeout=30).raise_for_status()
    wait_for(lambda: "mistral:latest" in listed(net.op_url)["n1"]["models"], timeout=10)
    wait_for(lambda: "mistral:latest" in listed(other)["n1"]["models"], timeout=10)
    net.sim("--build", "other")  # the same models, another build: its digests differ
    sim2 = list(net.sims)[-1]
    net.node("n2", sim2)
    net.wait_nodes("n1", "n2")
    wait_for(lambda: "n2" in listed(other), timeout=10)
    for url in (net.op_url, other):
        assert "llama3:latest" in listed(url)["n1"]["other_builds"], url


def test_the_queue_is_the_clusters_fair_across_callers_and_woken_when_a_slot_frees(two):
    """Jobs that find every slot taken queue in Redis: caller A's three jobs, alternating operators,
    are told places 1, 2, 3; caller B's, arriving last at the second operator, is told 2 (callers take
    turns), and the slot goes in that order: A, B, A, A. Each starts as soon as the one before ends: a
    freed slot wakes the next job (asking again on its own, it would wait up to 2 s)."""
    net, other, _ = two
    sim = one_node(net, other, "1", "--tokens", "2")
    httpx.post(f"{sim}/_sim/config", json={"hold_last": True})
    holder = subprocess.Popen([sys.executable, "client.py", "first", "--operator", net.op_url],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    callers = ["A", "A", "A", "B"]
    seen: dict[int, list] = {}
    try:
        wait_for(lambda: httpx.get(f"{sim}/_sim/stats").json()["active"] == 1, timeout=10)

        async def queued(i: int, url: str) -> None:
            await asyncio.sleep(0.4 * i)  # arrivals in order 0, 1, 2, 3
            async with httpx.AsyncClient(timeout=30, headers={"authorization": f"Bearer key-{callers[i]}"}) as http:
                async with http.stream("POST", f"{url}/inference", json={"model": "llama3", "prompt": f"q{i}"}) as resp:
                    async for line in resp.aiter_lines():
                        if line:
                            seen.setdefault(i, []).append((time.monotonic(), json.loads(line)))

        async def run() -> None:
            jobs = [asyncio.ensure_future(queued(i, (net.op_url, other)[i % 2])) for i in range(4)]
            await asyncio.sleep(2.5)  # all four queued
            httpx.post(f"{sim}/_sim/config", json={"hold_last": False})
            httpx.post(f"{sim}/_sim/release")
            await asyncio.gather(*jobs)
        asyncio.run(run())
    finally:
        holder.kill()
        holder.wait()
    first_places = [next(line["queued"] for _, line in seen[i] if "queued" in line) for i in range(4)]
    assert first_places == [1, 2, 3, 2], first_places
    started = {i: next(t for t, line in seen[i] if "token" in line) for i in range(4)}
    order = sorted(started, key=started.get)
    assert order == [0, 3, 1, 2], order
    for before, after in zip(order, order[1:]):
        assert started[after] - seen[before][-1][0] < 1.0, (before, after)  # woken, not polling
    for i in range(4):
        assert tokens([line for _, line in seen[i]]) == sim_tokens(f"q{i}", 2)


def test_equal_nodes_take_turns_across_the_operators(two):
    """Two equal nodes (both warm, idle, unmeasured), requests alternating between the operators:
    the nodes alternate too (one cursor for both; each operator's own would give n1, n1, n2, n2)."""
    net, other, _ = two

    def named(name):
        async def answer(first, reader, writer):
            writer.write(ndjson_reply(p.token_line(name) + p.DONE_LINE))
            return True
        return answer

    loaded = [{"name": "llama3:latest", "expires_at": "2099-01-01T00:00:00Z"}]
    with RawNode(named("n1")) as n1, RawNode(named("n2")) as n2, \
            heartbeats(net.op_url, "n1", n1.url, loaded=loaded), heartbeats(net.op_url, "n2", n2.url, loaded=loaded):
        for url in (net.op_url, other):
            wait_for(lambda: {n for n, row in listed(url).items() if row["healthy"] and row["loaded"]} == {"n1", "n2"},
                     timeout=10)
        served = []
        for i in range(8):
            resp = httpx.post(f"{(net.op_url, other)[i % 2]}/inference", json={"model": "llama3", "prompt": "x"},
                              timeout=10)
            served.append(resp.headers["x-odla-node"])
            assert [line["token"] for line in map(json.loads, resp.text.splitlines()) if "token" in line] == [served[-1]]
    assert all(a != b for a, b in zip(served, served[1:])), served


def one_slot_scheduler(redis_url: str, **limits: float) -> tuple[Scheduler, SharedState]:
    """An operator's scheduler on Redis, in-process (in a running event loop), over one node "n1"
    with one slot for llama3."""
    registry = Registry(prune_after=60)
    registry.register("n1", "http://n1", ["llama3:latest"], slots={"llama3:latest": 1})
    scheduler = Scheduler(registry, **limits)
    scheduler.cluster = shared = SharedState(settings(redis_url=redis_url), registry)
    return scheduler, shared


def test_the_cluster_queue_in_one_operator_refuses_past_max_queue_and_wakes_the_next(redis_server):
    """The scheduler on Redis, in-process: past ``max_queue`` a job is refused and its ticket
    leaves at once (the jobs behind are not held up); a release wakes the next job without
    waiting for its 2 s poll; a job that gives up at ``queue_timeout`` leaves too."""
    async def scenario() -> None:
        scheduler, shared = one_slot_scheduler(redis_server.url, max_queue=1, queue_timeout=30)
        listening = asyncio.ensure_future(shared.listen())
        queue = shared.redis.zcard
        try:
            await asyncio.sleep(0.2)  # subscribed
            held = await scheduler.claim("llama3", ticket="held")
            places: list[int] = []
            waiting = asyncio.ensure_future(scheduler.claim("llama3", place=places.append, ticket="next"))
            await asyncio.sleep(0.3)
            assert places == [1] and scheduler.depth() == {"llama3:latest": 1}
            with pytest.raises(QueueFull):
                await scheduler.claim("llama3", ticket="refused")
            assert await queue("odla:queue:llama3:latest") == 1  # only "next"
            released = time.monotonic()
            held.release()
            claim = await asyncio.wait_for(waiting, 5)
            assert claim.node.node_id == "n1" and time.monotonic() - released < 1.0  # woken
            assert claim.waited >= 0.3  # the job's receipt has its queue_wait
            assert await queue("odla:queue:llama3:latest") == 0 and scheduler.depth() == {}
            scheduler.queue_timeout = 0.5
            with pytest.raises(QueueTimeout):
                await scheduler.claim("llama3", ticket="late")
            assert await queue("odla:queue:llama3:latest") == 0
            claim.release()
        finally:
            listening.cancel()
            await shared.aclose()

    asyncio.run(scenario())


def test_a_job_waiting_in_the_cluster_when_redis_goes_keeps_its_deadline(redis_server):
    """Redis goes away while a job waits in the cluster's queue: the job waits on in this operator's
    own queue for what is left of ``queue_timeout``, not for a fresh one."""
    async def scenario() -> None:
        scheduler, shared = one_slot_scheduler(redis_server.url, queue_timeout=4)
        syncing = asyncio.ensure_future(shared.run())  # it judges Redis down
        try:
            held = await scheduler.claim("llama3", ticket="held")
            began = time.monotonic()
            waiting = asyncio.ensure_future(scheduler.claim("llama3", ticket="waits"))
            await asyncio.sleep(1)
            redis_server.__exit__()  # its next ask (within 2 s) fails: this operator's own queue
            with pytest.raises(QueueTimeout):
                await waiting
            assert 3.5 < time.monotonic() - began < 5, time.monotonic() - began
            assert not shared.ok
            held.release()
        finally:
            syncing.cancel()
            await shared.aclose()

    asyncio.run(scenario())


def test_receipts_are_read_through_the_index_of_their_filter(redis_server):
    """``GET /jobs`` with Redis reads the index of its filter: a model nobody ran reads nothing (it read
    every stored receipt on main), a caller's jobs are its own, paging works within an index. A resumed
    answer's later leg (a record of its own) is read by its id, and listed by no index."""
    from odla.serving.jobs import Job

    async def scenario() -> None:
        _, shared = one_slot_scheduler(redis_server.url)
        try:
            jobs = [Job(door="inference", model=f"m{i % 2}:latest", caller=f"c{i % 3}", node="n1") for i in range(12)]
            for i, job in enumerate(jobs):
                job.started += i  # newest last
                job.end("ok")
            part = Job(door="inference", model="m0:latest", caller="c1", node="n2", id=f"{jobs[-1].id}.1",
                       part_of=jobs[-1].id)
            part.end("ok")
            await shared.add_receipts([*jobs, part])
            assert (await shared.receipt(part.id)).part_of == jobs[-1].id
            assert part.id not in [j.id for j in await shared.receipts(None, "n2", None, None, 50, 0)]
            await shared.redis.config_resetstat()
            assert await shared.receipts("nomatch:latest", None, None, None, 50, 0) == []
            stats = await shared.redis.info("commandstats")
            assert "cmdstat_mget" not in stats  # nothing was read
            mine = await shared.receipts(None, None, None, None, 50, 0, caller="c1")
            assert [j.id for j in mine] == [j.id for j in reversed(jobs) if j.caller == "c1"]
            page = await shared.receipts("m0:latest", None, "ok", None, 2, 1)
            assert [j.id for j in page] == [j.id for j in reversed(jobs) if j.model == "m0:latest"][1:3]
        finally:
            await shared.aclose()

    asyncio.run(scenario())


def test_a_node_one_operator_catches_cheating_is_judged_so_by_every_operator(two):
    """A padding node's receipts are disputed by the operator that relayed its jobs; the other operator
    on the same Redis, which sent it nothing, quarantines it too, and reads the signed receipts."""
    net, other, _ = two
    one_node(net, other, "1", "--tokens", "3", "--cheat", "pad")
    with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": "p"}, timeout=30) as resp:
        read_stream(resp)
        job = resp.headers["x-odla-job"]
    wait_for(lambda: listed(net.op_url)["n1"]["quarantined"], timeout=10)
    wait_for(lambda: listed(other)["n1"]["quarantined"], timeout=10)
    assert listed(other)["n1"]["disputed"] == 1 and listed(other)["n1"]["reputation"] < 0.5  # what the first found
    seen = wait_for(lambda: (r := httpx.get(f"{other}/jobs/{job}").json())["node_signature"] and r, timeout=10)
    assert seen["operator_signature"] and seen["disputed"].startswith("the receipt claims")
