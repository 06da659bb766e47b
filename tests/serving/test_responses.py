"""odla.serving.responses.LineStream alone, on ASGI messages: batching, disconnects, and how it ends."""

import asyncio
import json

import pytest

from odla.core.errors import ODLAError
from odla.serving.errors import ODLA, OLLAMA, Shape
from odla.core.protocol import NDJSON
from odla.serving.responses import LineStream, Opened, StreamBroken, _Buffer

# Both ways a body is streamed: batched by LineStream's own producer (a body that yields line
# by line, as the node's), or pumped as it comes (one that gathers what has arrived, the relay's).
BOTH = pytest.mark.parametrize("gathered", [False, True], ids=["batched", "pumped"])


def run(response: LineStream, disconnect_after: float = 60) -> list[dict]:
    sent = []

    async def receive():
        await asyncio.sleep(disconnect_after)
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    asyncio.run(response({"type": "http", "method": "POST", "path": "/x"}, receive, send))
    return sent


def streamed(body, gathered: bool, shape: Shape = ODLA, media_type: str = NDJSON) -> LineStream:
    if not gathered:
        return LineStream(body, shape=shape, media_type=media_type)

    async def opening(tell) -> Opened:
        return Opened(body, media_type=media_type, gathered=True)
    return LineStream(opening=opening, shape=shape)


def bodies(sent: list[dict]) -> list[bytes]:
    return [m["body"] for m in sent if m["type"] == "http.response.body"]


def starts(sent: list[dict]) -> list[dict]:
    return [m for m in sent if m["type"] == "http.response.start"]


def test_lines_ready_together_leave_in_one_send():
    async def burst():
        for i in range(3):
            yield b"line %d\n" % i  # no await between them: all ready at once
        await asyncio.sleep(0.01)
        yield b"late\n"

    sent = run(LineStream(burst()))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert bodies(sent) == [b"line 0\nline 1\nline 2\n", b"late\n"]
    assert sent[-1]["more_body"] is False  # the last data and the end leave in one write


@BOTH
def test_disconnect_cancels_and_closes_the_body(gathered):
    closed = []

    async def endless():
        try:
            while True:
                yield b"x\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    sent = run(streamed(endless(), gathered), disconnect_after=0.05)
    assert closed == [True]
    assert all(m.get("more_body", True) for m in sent)  # never claimed to have finished


@BOTH
def test_a_body_failing_after_the_start_ends_with_one_error_line_and_one_start(gathered):
    async def breaks():
        yield b'{"token": "a", "done": false}\n{"tok'  # cut mid-line
        raise RuntimeError("bug")

    sent = run(streamed(breaks(), gathered))
    assert len(starts(sent)) == 1
    text = b"".join(bodies(sent)).decode()
    assert text.endswith('\n{"error": "internal error", "done": true}\n')
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


@BOTH
def test_a_broken_stream_says_why_in_the_endpoints_shape(gathered):
    async def breaks():
        yield b'{"response": "a", "done": false}\n'
        raise StreamBroken("node n1 failed mid-stream")

    sent = run(streamed(breaks(), gathered, shape=OLLAMA))
    assert bodies(sent)[-2].endswith(b'{"error": "node n1 failed mid-stream"}\n')


@BOTH
def test_a_whole_json_document_that_breaks_is_cut_off_not_completed(gathered):
    async def half():
        yield b'{"model": "llama3", "respo'
        raise StreamBroken("lost")

    sent = run(streamed(half(), gathered, media_type="application/json"))
    assert b"".join(bodies(sent)) == b'{"model": "llama3", "respo'
    assert all(m.get("more_body", True) for m in sent)  # the server closes the connection mid-body


@BOTH
def test_a_client_that_does_not_read_holds_the_body_back(gathered):
    """What waits for a slow client is bounded: the body is not read ahead without limit."""
    pulled = 0

    async def endless():
        nonlocal pulled
        while True:
            pulled += 1
            yield b"x" * 999 + b"\n"
            await asyncio.sleep(0)

    async def main() -> None:
        async def receive():
            await asyncio.sleep(60)

        async def send(message):
            if message["type"] == "http.response.body":
                await asyncio.Future()  # the client never reads: the write never completes

        task = asyncio.ensure_future(streamed(endless(), gathered)({"type": "http"}, receive, send))
        await asyncio.sleep(0.3)
        task.cancel()
        await asyncio.wait((task,))

    asyncio.run(main())
    assert 0 < pulled <= _Buffer.LIMIT // 1000 + 2


def test_an_opening_refused_is_a_status_in_the_endpoints_shape():
    async def refused(tell) -> Opened:
        raise ODLAError("model 'x' not found", 404)

    sent = run(LineStream(opening=refused, shape=OLLAMA))
    assert starts(sent)[0]["status"] == 404
    assert json.loads(b"".join(bodies(sent))) == {"error": "model 'x' not found"}
    sent = run(LineStream(opening=refused, shape=ODLA))
    assert json.loads(b"".join(bodies(sent))) == {"error": "model 'x' not found", "done": True}


def test_a_client_leaving_while_the_upstream_opens_cancels_the_opening():
    events = []

    async def slow_start(tell) -> Opened:
        try:
            await asyncio.sleep(10)  # Ollama loading a model
        except asyncio.CancelledError:
            events.append("cancelled")  # what closes the connection to the upstream
            raise
        raise AssertionError("not reached")

    sent = run(LineStream(opening=slow_start), disconnect_after=0.05)
    assert events == ["cancelled"] and sent == []


def test_an_opened_body_is_read_on_with_no_turn_of_the_loop_in_between():
    """The task that opened the upstream reads its body on: nothing else runs, and no socket is
    read, between the opening's first read and the next, so a break that arrives with the last
    data cannot be seen before the data (aiohttp hands out nothing it had buffered once it has)."""
    turns = []

    async def body():
        yield b"first\n"
        turns.append(len(ticked))  # 0: the loop did not turn since the opening returned
        yield b"second\n"

    ticked: list[bool] = []

    async def opening(tell) -> Opened:
        asyncio.get_running_loop().call_soon(ticked.append, True)  # runs at the loop's next turn
        return Opened(body())

    sent = run(LineStream(opening=opening))
    assert turns == [0]
    assert b"".join(bodies(sent)) == b"first\nsecond\n"


def test_the_opened_status_media_type_and_headers_are_sent():
    async def body():
        yield b"data: {}\n\n"

    async def opened(tell) -> Opened:
        return Opened(body(), 201, "text/event-stream", {"x-odla-node": "n1"})

    start = starts(run(LineStream(opening=opened)))[0]
    assert start["status"] == 201
    assert (b"content-type", b"text/event-stream; charset=utf-8") in start["headers"]
    assert (b"x-odla-node", b"n1") in start["headers"]


def test_a_body_failing_after_the_start_over_a_real_socket():
    """Served by uvicorn and read by httpx: the stream still ends with exactly one final line."""
    import httpx
    from fastapi import FastAPI

    from tests.helpers import ServerThread, read_stream

    app = FastAPI()

    async def breaks():
        yield b'{"token": "a", "done": false}\n'
        raise RuntimeError("bug")

    @app.post("/x")
    async def endpoint() -> LineStream:
        return LineStream(breaks())

    with ServerThread(app) as server:
        with httpx.stream("POST", f"{server.url}/x") as resp:
            lines = read_stream(resp)
    assert lines == [{"token": "a", "done": False}, {"error": "internal error", "done": True}]
