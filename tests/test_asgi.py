"""odla.asgi alone: LineStream batches what is ready and stops on disconnect; FastRoutes' extras."""

import asyncio

import httpx

import server as operator_app
from odla.asgi import LineStream
from tests.helpers import settings


def run_stream(body, disconnect_after: float = 60):
    sent = []

    async def receive():
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def go():
        await LineStream(body)({"type": "http"}, receive, send)

    asyncio.run(go())
    return sent


def test_lines_ready_together_leave_in_one_send():
    async def burst():
        for i in range(3):
            yield b"line %d\n" % i  # no await between them: all ready at once
        await asyncio.sleep(0.01)
        yield b"late\n"

    sent = run_stream(burst())
    bodies = [m["body"] for m in sent if m["type"] == "http.response.body"]
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert bodies == [b"line 0\nline 1\nline 2\n", b"late\n", b""]
    assert sent[-1]["more_body"] is False


def test_disconnect_cancels_and_closes_the_body():
    closed = []

    async def endless():
        try:
            while True:
                yield b"x\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    sent = run_stream(endless(), disconnect_after=0.05)
    assert closed == [True]
    assert all(m.get("more_body", True) for m in sent)  # never claimed to have finished


def test_fast_routes_answer_405_and_stay_in_the_openapi_schema():
    app = operator_app.create_app(settings())
    paths = app.app.openapi()["paths"]
    assert "post" in paths["/inference"]
    assert paths["/inference"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "InferenceRequest")

    async def go():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://odla") as client:
            return await client.get("/inference")

    resp = asyncio.run(go())
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"


def test_a_slow_client_holds_the_body_back_instead_of_buffering_it_all():
    piece = 64 * 1024
    produced = []

    async def firehose():
        for i in range(64):
            produced.append(i)
            yield b"x" * piece  # 4 MiB in all, never awaiting

    async def go():
        ahead, sent = [], [0]

        async def receive():
            await asyncio.sleep(60)
            return {"type": "http.disconnect"}

        async def slow_send(message):
            ahead.append(len(produced) * piece - sent[0])  # produced but not yet delivered
            sent[0] += len(message.get("body", b""))
            await asyncio.sleep(0.001)

        await LineStream(firehose())({"type": "http"}, receive, slow_send)
        return ahead, sent[0]

    ahead, total = asyncio.run(go())
    assert total == 64 * piece  # everything arrived...
    assert max(ahead) <= 2 * ((1 << 20) + piece)  # ...with at most ~2 MiB ever waiting, not 4
