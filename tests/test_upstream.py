"""odla.upstream: the hot path's HTTP/1.1 client, against real servers."""

import asyncio
import json

import pytest

from odla.upstream import Pool, UpstreamConnectError, UpstreamLost
from sim.ollama_sim import Behaviour, Simulator, sim_tokens
from tests.helpers import ServerThread, free_port, wait_for

BODY = json.dumps({"model": "llama3", "prompt": "p"}).encode()
JSON = [("content-type", "application/json")]


def run(coro):
    return asyncio.run(coro)


def lines_of(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line]


def test_streams_and_reuses_one_connection(sim):
    async def go():
        pool = Pool()
        seen = []
        for _ in range(3):
            resp = await pool.request("POST", f"{sim.url}/api/generate", BODY, JSON)
            assert resp.status_code == 200
            seen.append(id(resp._conn))
            parts = lines_of(await resp.read())
            await resp.aclose()
            assert "".join(x["response"] for x in parts) == "".join(sim_tokens("p", 6))
        await pool.aclose()
        return seen

    assert len(set(run(go()))) == 1


def test_error_status_and_body_come_back(sim):
    async def go():
        pool = Pool()
        resp = await pool.request("POST", f"{sim.url}/api/generate", b'{"model": "zz", "prompt": "p"}', JSON)
        body = await resp.read()
        await resp.aclose()
        await pool.aclose()
        return resp.status_code, json.loads(body)

    assert run(go()) == (404, {"error": "model 'zz' not found"})


def test_a_connection_the_server_closed_while_idle_is_replaced():
    with ServerThread(Simulator(Behaviour(tokens=2)), timeout_keep_alive=0.2) as srv:
        async def go():
            pool = Pool()
            first = await pool.request("GET", f"{srv.url}/api/version")
            await first.read()
            await first.aclose()
            await asyncio.sleep(0.6)  # the server has dropped the kept-alive connection by now
            again = await pool.request("GET", f"{srv.url}/api/version")
            body = await again.read()
            await again.aclose()
            await pool.aclose()
            return again.status_code, body

        assert run(go()) == (200, b'{"version":"0.12.6"}')


def test_connect_failure_is_its_own_error():
    async def go():
        await Pool(connect_timeout=1).request("GET", f"http://127.0.0.1:{free_port()}/")

    with pytest.raises(UpstreamConnectError, match="cannot connect"):
        run(go())


def test_a_cut_stream_raises_upstream_lost(sim):
    sim.configure(crash_after=2)

    async def go():
        pool = Pool()
        resp = await pool.request("POST", f"{sim.url}/api/generate", BODY, JSON)
        got = b""
        try:
            async for data in resp:
                got += data
        finally:
            await resp.aclose()
            await pool.aclose()

    with pytest.raises(UpstreamLost):
        run(go())


def test_closing_early_closes_the_connection_and_the_server_sees_it(sim):
    sim.configure(hold_last=True)

    async def go():
        pool = Pool()
        resp = await pool.request("POST", f"{sim.url}/api/generate", BODY, JSON)
        async for _ in resp:
            break
        await resp.aclose()
        assert not pool._idle.get(resp._conn.key)  # not handed to the next request half-read
        await pool.aclose()

    run(go())
    wait_for(lambda: sim.stats()["cancelled"] == 1, timeout=5)


def test_plain_url_schemes_only():
    with pytest.raises(Exception, match="not an http"):
        run(Pool().request("GET", "ftp://example/"))
