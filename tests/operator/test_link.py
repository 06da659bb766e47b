"""Dial-out nodes (issue 16): a node with ``link: dial`` listens on no port and serves over one
WebSocket it opened to the operator. Real processes, the simulator as Ollama."""

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from websockets.asyncio.server import serve as ws_serve

from odla.node.dial import link_url, redial_delay
from odla.core.protocol import WINDOW
from sim.ollama_sim import sim_tokens
from tests.fakes import Cutter
from tests.helpers import FAST, ROOT, free_port, read_stream, wait_for

DIAL = {"NODE_LINK": "dial"}


def listening_ports(pid: int) -> list[int]:
    """The TCP ports a process listens on."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as rows:
            for row in rows.readlines()[1:]:
                cols = row.split()
                if cols[3] == "0A" and cols[9] in inodes:
                    ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def stream(op_url: str, model: str, prompt: str, **options) -> tuple[str, list[dict]]:
    body = {"model": model, "prompt": prompt, **({"options": options} if options else {})}
    with httpx.stream("POST", f"{op_url}/inference", json=body, timeout=30) as resp:
        return resp.headers.get("x-odla-node", ""), read_stream(resp)


def tokens(lines: list[dict]) -> list[str]:
    assert lines[-1] == {"done": True}, lines[-3:]
    return [line["token"] for line in lines[:-1] if "queued" not in line]  # (a place in the queue aside)


def test_a_dial_node_listens_on_no_port_and_serves_every_door(net):
    llama, mistral = net.sim("--tokens", "6"), net.sim("--tokens", "6")
    httpx.post(f"{mistral}/_sim/config", json={"models": ["mistral"]})  # only the dial node has mistral
    net.operator()
    net.node("web", llama)
    dialled = net.node("dial", mistral, **DIAL)
    net.wait_nodes("web", "dial")
    assert listening_ports(dialled.pid) == []
    rows = net.listing()
    assert rows["dial"]["link"] == "dial" and rows["web"]["link"] == "http"
    assert rows["dial"]["healthy"] and rows["dial"]["models"] == ["mistral:latest"]

    node, lines = stream(net.op_url, "mistral", "over the link")
    assert node == "dial" and tokens(lines) == sim_tokens("over the link", 6)
    node, lines = stream(net.op_url, "llama3", "over http")
    assert node == "web" and tokens(lines) == sim_tokens("over http", 6)
    expected = "".join(sim_tokens("door", 6))
    generate = httpx.post(f"{net.op_url}/api/generate", json={"model": "mistral", "prompt": "door", "stream": False})
    assert generate.status_code == 200 and generate.json()["response"] == expected
    with httpx.stream("POST", f"{net.op_url}/api/chat", timeout=30,
                      json={"model": "mistral", "messages": [{"role": "user", "content": "door"}]}) as resp:
        parts = read_stream(resp)
    assert "".join(p["message"]["content"] for p in parts) == expected and parts[-1]["done"] is True
    openai = httpx.post(f"{net.op_url}/v1/chat/completions", timeout=30,
                        json={"model": "mistral", "messages": [{"role": "user", "content": "door"}]})
    assert openai.json()["choices"][0]["message"]["content"] == expected
    names = {m["name"] for m in httpx.get(f"{net.op_url}/api/tags").json()["models"]}
    assert names == {"llama3:latest", "mistral:latest"}
    missing = httpx.post(f"{net.op_url}/api/generate", json={"model": "mistral", "prompt": "x", "options": "bad"})
    assert missing.status_code == 400  # the node's Ollama's own refusal, through the link
    jobs = httpx.get(f"{net.op_url}/jobs", params={"node": "dial"}).json()["jobs"]
    assert len(jobs) >= 4 and all(j["node"] == "dial" for j in jobs)


def test_bad_tokens_are_refused_and_a_revoked_node_token_stops_only_that_node(net):
    sim = net.sim("--tokens", "3")
    net.operator(node_tokens={"a": "token-a", "b": "token-b-new"})
    net.node("a", sim, ODLA_JOIN_TOKEN="token-a", **DIAL)
    revoked = net.node("b", sim, ODLA_JOIN_TOKEN="token-b-old", **DIAL)
    stranger = net.node("c", sim, ODLA_JOIN_TOKEN="token-a", **DIAL)  # another node's token
    assert revoked.proc.wait(timeout=20) != 0 and stranger.proc.wait(timeout=20) != 0
    # a token of no node of this network is refused before the link is accepted (an HTTP 403);
    # another node's token, once the hello names the node
    assert "refused this node: missing or wrong join token (the link was refused with HTTP 403)" in revoked.output()
    assert "refused this node: missing or wrong join token for node c (close code 4401)" in stranger.output()
    net.wait_nodes("a")
    assert tokens(stream(net.op_url, "llama3", "still")[1]) == sim_tokens("still", 3)


def test_fifty_streams_share_one_link_and_a_client_that_never_reads_holds_back_only_itself(net):
    sim = net.sim("--tokens", "100000")  # each answer as long as its num_predict
    net.operator(health_check_timeout=5)  # a simulator this busy can take over 1 s to list its models
    net.node("dial", sim, OLLAMA_NUM_PARALLEL="64", **DIAL)
    net.wait_nodes("dial")
    body = json.dumps({"model": "llama3", "prompt": "flood"}).encode()  # 100,000 lines of ~150 bytes: 15 MB
    stuck = socket.create_connection(("127.0.0.1", net.op_port))
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.sendall(b"POST /api/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    try:
        time.sleep(1.5)  # its buffers fill; the node stops at its credit for that job

        async def fifty() -> list[list[dict]]:
            async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=None)) as http:
                async def one(i: int) -> list[dict]:
                    request = {"model": "llama3", "prompt": f"s{i}", "options": {"num_predict": 40}}
                    async with http.stream("POST", f"{net.op_url}/inference", json=request) as resp:
                        return [json.loads(line) async for line in resp.aiter_lines() if line]
                return await asyncio.gather(*(one(i) for i in range(50)))

        began = time.monotonic()
        answers = asyncio.run(fifty())
        assert time.monotonic() - began < 15
        for i, lines in enumerate(answers):
            assert tokens(lines) == sim_tokens(f"s{i}", 40)
        assert net.listing()["dial"]["active_jobs"] == 1  # the never-read one, still held
    finally:
        stuck.close()
    wait_for(lambda: net.listing()["dial"]["active_jobs"] == 0, timeout=5)  # and ended with its client


def test_a_cut_link_ends_streams_under_way_and_moves_unstarted_jobs(net):
    sim = net.sim("--tokens", "5")
    net.operator(resume="off")  # (with it, another node finishes them: tests/network/test_resume.py)
    with Cutter(net.op_port) as cutter:
        net.node("dial", sim, ODLA_OPERATOR_URL=cutter.url, OLLAMA_NUM_PARALLEL="8", **DIAL)
        net.wait_nodes("dial")
        httpx.post(f"{sim}/_sim/config", json={"hold_last": True})
        under_way = [subprocess.Popen([sys.executable, "client.py", f"u{i}", "--operator", net.op_url],
                                      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for i in range(3)]
        waiting = None
        try:
            wait_for(lambda: httpx.get(f"{sim}/_sim/stats").json()["active"] == 3, timeout=10)
            httpx.post(f"{sim}/_sim/config", json={"load_delay": 30})  # the next job waits for its model
            waiting = subprocess.Popen([sys.executable, "client.py", "moved", "--operator", net.op_url],
                                       cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: httpx.get(f"{sim}/_sim/stats").json()["requests"] == 4, timeout=10)  # at Ollama, loading
            net.node("web", sim)  # a second node, for the job the link had not started
            net.wait_nodes("dial", "web")
            httpx.post(f"{sim}/_sim/config", json={"hold_last": False, "load_delay": 0})
            began = time.monotonic()
            cutter.cut()
            wait_for(lambda: httpx.get(f"{sim}/_sim/stats").json()["cancelled"] == 4, timeout=5)
            assert time.monotonic() - began < 1.0  # the node let go of every Ollama request at once
            for proc in under_way:
                out, err = proc.communicate(timeout=15)
                assert proc.returncode == 1 and "node dial failed mid-stream" in err, err
                assert out.startswith(sim_tokens(proc.args[2], 5)[0])
            out, err = waiting.communicate(timeout=15)
            assert waiting.returncode == 0, err
            assert out.strip() == "".join(sim_tokens("moved", 5))  # unseen by its client
        finally:
            for proc in [*under_way, *([waiting] if waiting else [])]:
                proc.kill()
                proc.wait()


def test_a_silent_link_is_dropped_after_three_heartbeats_and_its_streams_end(net):
    sim = net.sim("--tokens", "5")
    net.operator()
    dialled = net.node("dial", sim, **DIAL)
    net.wait_nodes("dial")
    httpx.post(f"{sim}/_sim/config", json={"hold_last": True})
    with httpx.stream("POST", f"{net.op_url}/inference", json={"model": "llama3", "prompt": "p"}, timeout=30) as resp:
        lines = resp.iter_lines()
        assert "token" in json.loads(next(lines))
        dialled.send_signal(signal.SIGSTOP)  # the process, and so its link, falls silent
        try:
            began = time.monotonic()
            rest = [json.loads(line) for line in lines]
            took = time.monotonic() - began
            assert net.listing()["dial"]["healthy"] is False
        finally:
            dialled.send_signal(signal.SIGCONT)
    assert rest[-1] == {"error": "node dial failed mid-stream: connection lost", "done": True}, rest
    assert 3 * FAST["heartbeat_interval"] - 0.5 < took < 3 * FAST["heartbeat_interval"] + 1.5, took
    httpx.post(f"{sim}/_sim/config", json={"hold_last": False})
    net.wait_nodes("dial")
    wait_for(lambda: net.listing()["dial"]["healthy"], timeout=10)  # it redials when it runs again


def test_a_link_outlives_request_timeout(net):
    """The operator's deadline for a request to arrive whole ends with the WebSocket's handshake."""
    sim = net.sim("--tokens", "3")
    net.operator(request_timeout=1)
    dialled = net.node("dial", sim, **DIAL)
    net.wait_nodes("dial")
    time.sleep(2.5)
    assert "redialling" not in dialled.output()
    assert tokens(stream(net.op_url, "llama3", "later")[1]) == sim_tokens("later", 3)


def test_the_node_redials_with_jittered_delays_within_the_cap_and_a_restart_replaces_its_link(net):
    sim = net.sim("--tokens", "3")
    operator = net.operator()
    dialled = net.node("dial", sim, ODLA_LOG_LEVEL="debug", **DIAL)
    net.wait_nodes("dial")
    operator.stop(signal.SIGKILL)
    cap = FAST["heartbeat_interval"]
    delays: list[float] = []

    def redials() -> int:
        delays[:] = [float(d) for d in re.findall(r"redial delay ([0-9.]+) s", dialled.output())]
        return len(delays)
    wait_for(lambda: redials() >= 20, timeout=30)
    assert len(set(delays[:20])) == 20 and all(0 <= d <= cap for d in delays), delays
    net.operator()
    began = time.monotonic()
    net.wait_nodes("dial", timeout=10)
    assert time.monotonic() - began < cap + 2  # back within about one interval
    assert tokens(stream(net.op_url, "llama3", "again")[1]) == sim_tokens("again", 3)


def test_redial_delays_are_full_jitter_capped():
    delays = [redial_delay(attempt, cap=10) for attempt in range(200)]
    assert all(0 <= d <= 10 for d in delays) and len(set(delays)) == 200
    assert redial_delay(0, cap=10, rng=lambda lo, hi: hi) == 0.5  # the first ceiling
    assert redial_delay(30, cap=10, rng=lambda lo, hi: hi) == 10
    assert link_url("https://op.example:8443/odla/") == "wss://op.example:8443/odla/nodes/link"
    assert link_url("http://127.0.0.1:8000") == "ws://127.0.0.1:8000/nodes/link"


@pytest.fixture
def fake_operator():
    """A WebSocket server (websockets) standing in for the operator: a test scripts its side."""
    class Fake:
        def __init__(self) -> None:
            self.port = free_port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.frames: asyncio.Queue = asyncio.Queue()
            self.ws = None
            self.connected = asyncio.Event()

        async def handler(self, ws) -> None:
            self.ws = ws
            self.connected.set()
            async for text in ws:
                await self.frames.put(json.loads(text))

        async def next(self, *kinds: str, timeout: float = 10) -> dict:
            """The next frame of these kinds (others, such as statuses, are skipped) within ``timeout``."""
            async def find() -> dict:
                while (frame := await self.frames.get())["t"] not in kinds:
                    pass
                return frame
            return await asyncio.wait_for(find(), timeout)
    return Fake()


def test_the_node_keeps_to_its_credit_and_answers_a_duplicate_job_id_with_an_error(net, fake_operator):
    sim = net.sim("--tokens", "200", "--delay", "0.02")  # a chunk per token

    async def scenario() -> None:
        async with ws_serve(fake_operator.handler, "127.0.0.1", fake_operator.port):
            net.node("dial", sim, ODLA_OPERATOR_URL=fake_operator.url, **DIAL)
            hello = await fake_operator.next("hello")
            assert hello["node_id"] == "dial" and hello["models"] == ["llama3:latest"]
            ws = fake_operator.ws
            await ws.send(json.dumps({"t": "welcome"}))
            run = {"t": "run", "id": "j1", "method": "POST", "path": "/run",
                   "body": json.dumps({"job_id": "j1", "model": "llama3", "prompt": "credit"})}
            await ws.send(json.dumps(run))
            start = await fake_operator.next("chunk")
            assert start["id"] == "j1" and start["status"] == 200 and start["data"] == ""
            await ws.send(json.dumps(run))  # the same id again
            frames = []
            with pytest.raises(asyncio.TimeoutError):
                while True:  # until the node has been silent (statuses aside) for 1.5 s
                    frames.append(await fake_operator.next("chunk", "error", timeout=1.5))
            errors = [f for f in frames if f["t"] == "error"]
            assert len(errors) == 1 and "duplicate job id j1" in errors[0]["error"] and "id" not in errors[0]
            assert sum(f["t"] == "chunk" and f["id"] == "j1" for f in frames) == WINDOW  # no more until credit
            await ws.send(json.dumps({"t": "credit", "id": "j1", "n": 3}))
            for _ in range(3):
                assert (await fake_operator.next("chunk"))["id"] == "j1"
            await ws.send(json.dumps({"t": "cancel", "id": "j1"}))
            await asyncio.sleep(1)
            assert httpx.get(f"{sim}/_sim/stats").json()["active"] == 0  # cancelled at Ollama within 1 s
    asyncio.run(scenario())


def test_an_unknown_link_mode_stops_the_node_with_a_message():
    result = subprocess.run([sys.executable, "node.py"], cwd=ROOT, capture_output=True, text=True, timeout=20,
                            env={**os.environ, "NODE_LINK": "pigeon"})
    assert result.returncode != 0 and "NODE_LINK" in result.stderr


def test_bad_frames_from_a_node_close_its_link_and_harm_nothing(net):
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    sim = net.sim("--tokens", "3")
    net.operator()
    net.node("web", sim)
    net.wait_nodes("web")
    hello = {"t": "hello", "node_id": "odd", "version": "x", "heartbeat_interval": 1, "models": ["llama3:latest"]}

    async def send_after_hello(frame) -> tuple[int, str]:
        async with connect(f"ws://127.0.0.1:{net.op_port}/nodes/link") as ws:
            if frame != "no hello":
                await ws.send(json.dumps(hello))
                assert json.loads(await ws.recv())["t"] == "welcome"
            await ws.send(json.dumps(frame) if frame != "no hello" else "[]")
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await ws.recv()
            return closed.value.rcvd.code, closed.value.rcvd.reason

    for frame in ([1, 2], {"t": "status", "node_id": "other", "seq": 1}, {"t": "status", "seq": "z"},
                  {"t": "launch"}, "no hello"):
        code, reason = asyncio.run(send_after_hello(frame))
        assert code == 4400, (frame, code, reason)
    assert set(net.listing()) >= {"web"}
    assert tokens(stream(net.op_url, "llama3", "fine")[1]) == sim_tokens("fine", 3)


def test_bad_frames_from_the_operator_are_logged_and_the_link_goes_on(net, fake_operator):
    sim = net.sim("--tokens", "3")

    async def scenario() -> None:
        async with ws_serve(fake_operator.handler, "127.0.0.1", fake_operator.port):
            node = net.node("dial", sim, ODLA_OPERATOR_URL=fake_operator.url, **DIAL)
            await fake_operator.next("hello")
            ws = fake_operator.ws
            await ws.send(json.dumps({"t": "welcome"}))
            for bad in ("[1]", "not json", json.dumps({"t": "credit", "id": "j", "n": "lots"}), json.dumps({"t": "x"})):
                await ws.send(bad)
            await ws.send(json.dumps({"t": "run", "id": "j1", "method": "POST", "path": "/run",
                                      "body": json.dumps({"job_id": "j1", "model": "llama3", "prompt": "ok"})}))
            data = ""
            while (frame := await fake_operator.next("chunk", "end"))["t"] == "chunk":
                data += frame["data"]
            assert [json.loads(line).get("token") for line in data.splitlines()][:3] == sim_tokens("ok", 3)
            assert "bad frame from the operator" in node.output() and "redialling" not in node.output()
    asyncio.run(scenario())


def test_a_second_dial_node_with_a_live_id_is_refused_and_the_first_keeps_its_link(net):
    """Two dial nodes with the same NODE_ID: the second is refused (4409, as HTTP's 409) and stops;
    the first keeps its one link (no replace loop) and serves jobs all along."""
    sim = net.sim("--tokens", "3")
    op = net.operator()
    first = net.node("dial", sim, **DIAL)
    net.wait_nodes("dial")
    second = net.start("node.py", NODE_ID="dial", OLLAMA_HOST=sim, **DIAL)
    assert second.proc.wait(timeout=20) != 0
    assert "taken by a live link" in second.output() and "close code 4409" in second.output()
    for i in range(5):
        assert tokens(stream(net.op_url, "llama3", f"still {i}")[1]) == sim_tokens(f"still {i}", 3)
    time.sleep(1.5)  # three of its heartbeats: a replace loop would have relinked it by now
    assert first.output().count("linked to operator") == 1
    assert op.output().count("linked from") == 1


def test_a_job_on_a_dial_node_whose_ollama_hangs_moves_to_another_node(net):
    """Silent or slow, on a link too: the dial node's Ollama stops answering anything (its answers are
    held back by a proxy) while a job waits on it; the node's next status says so, the operator's
    watch sees it, and the job goes to the other node (on main it waited for ever)."""
    hung = net.sim("--tokens", "3", "--preload", "llama3")  # warm: the job goes here first
    other = net.sim("--tokens", "3")
    net.operator(heartbeat_interval=2)  # a status every 2 s, each asking Ollama within 1 s: the link stays up
    with Cutter(int(hung.rsplit(":", 1)[1])) as proxy:
        net.node("dial", proxy.url, **DIAL)
        net.node("web", other)
        net.wait_nodes("dial", "web", timeout=30)
        wait_for(lambda: net.listing()["dial"]["loaded"], timeout=10)
        proxy.delay = 600  # from now on Ollama answers nothing, not even its model list
        began = time.monotonic()
        node, lines = stream(net.op_url, "llama3", "moved")
        assert node == "web" and tokens(lines) == sim_tokens("moved", 3)
        assert time.monotonic() - began < 8


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def test_pings_from_a_link_that_never_reads_do_not_pile_up_as_pongs(net):
    """A member of the network (it holds the join token) that sends 20 MB of pings and reads nothing:
    the operator stops reading once its pongs fill the write buffer, instead of holding them all."""
    from websockets.client import ClientProtocol
    from websockets.uri import parse_uri

    operator = net.operator(join_token="the-network-token")
    protocol = ClientProtocol(parse_uri(net.op_url.replace("http://", "ws://") + "/nodes/link"))
    request = protocol.connect()
    request.headers["Authorization"] = "Bearer the-network-token"
    protocol.send_request(request)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", net.op_port))
    try:
        sock.sendall(b"".join(protocol.data_to_send()))
        protocol.receive_data(sock.recv(65536))
        assert protocol.handshake_exc is None, protocol.handshake_exc  # accepted: a member's link
        before = rss_kb(operator.pid)
        sock.settimeout(3)
        sent = 0
        try:
            while sent < 20 << 20:
                for i in range(1000):
                    protocol.send_ping(os.urandom(4) + bytes(121))
                data = b"".join(protocol.data_to_send())
                sock.sendall(data)
                sent += len(data)
        except socket.timeout:
            pass  # the operator stopped reading: back-pressure, as wanted
        time.sleep(0.5)
        grown_mb = (rss_kb(operator.pid) - before) / 1024
    finally:
        sock.close()
    assert grown_mb < 8, (grown_mb, sent)
    assert httpx.get(f"{net.op_url}/health").status_code == 200
