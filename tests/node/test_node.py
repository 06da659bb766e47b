"""The node agent against the simulator through the real ollama SDK, over real sockets."""

import asyncio
import json
import time

import httpx
import ollama
import pytest

import node as node_agent
from odla.node.ollama_clients import ollama_base_url
from odla.proofs.identity import Identity
from odla.proofs.reports import signed_request
from sim.ollama_sim import BUSY_MESSAGE, sim_tokens
from tests.helpers import ServerThread, Sim, bound_socket, node_ids, read_stream, settings, wait_for

OPERATOR_GONE = "http://127.0.0.1:9"  # discard port: nothing listens


def run(node_url, prompt="hi", model="llama3", **kw):
    body = {"job_id": "job-1", "prompt": prompt, "model": model, **kw}
    with httpx.stream("POST", f"{node_url}/run", json=body, timeout=10) as resp:
        if resp.status_code != 200:
            resp.read()
            return resp.status_code, [resp.json()]
        return 200, read_stream(resp)


def test_run_streams_the_simulators_tokens(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    status, lines = run(n.url, prompt="tell me")
    assert status == 200
    assert [x["token"] for x in lines[:-1]] == sim_tokens("tell me", 6)
    # the final line carries Ollama's counts for the operator, which takes them off (test_watch.py)
    assert lines[-1]["done"] is True and set(lines[-1]) == {"done", "stats"}
    stats = lines[-1]["stats"]
    assert stats["output_tokens"] == 6 and stats["prompt_tokens"] == 1
    assert stats["total_duration"] > 0 and stats["eval_duration"] > 0 and stats["load_duration"] > 0


def test_run_without_model_uses_the_first_model(sim, node):
    """SPEC.md's /run example has no model field."""
    n = node(OPERATOR_GONE, sim.url)
    body = {"job_id": "job-123", "prompt": "Explain quantum entanglement"}
    with httpx.stream("POST", f"{n.url}/run", json=body) as resp:
        assert resp.status_code == 200
        assert read_stream(resp)[-1]["done"] is True


def test_health_and_models(sim, node):
    n = node(OPERATOR_GONE, sim.url, "node1")
    assert httpx.get(f"{n.url}/health").json() == {
        "status": "healthy", "node_id": "node1", "models": ["llama3:latest", "mistral:latest"]}
    assert httpx.get(f"{n.url}/models").json() == {"node_id": "node1", "models": ["llama3:latest", "mistral:latest"]}


def test_missing_model_is_404_before_the_stream(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    status, body = run(n.url, model="llama9")
    assert status == 404 and body == [{"error": "model 'llama9' not found", "done": True}]


def test_busy_ollama_is_503_before_the_stream(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    sim.configure(busy=True)
    status, body = run(n.url)
    assert status == 503 and body[0]["error"] == BUSY_MESSAGE


def test_error_line_mid_stream_becomes_the_final_line(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    sim.configure(error_after=2, error_message="out of memory")
    status, lines = run(n.url)
    assert status == 200 and len(lines) == 3
    assert lines[-1] == {"error": "out of memory", "done": True}


def test_ollama_cut_mid_stream_gives_a_final_error_line(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    sim.configure(crash_after=3)
    status, lines = run(n.url)
    assert status == 200 and len(lines) == 4
    assert lines[-1]["done"] is True and "lost connection to Ollama" in lines[-1]["error"]


def test_what_ollama_sent_with_its_break_is_relayed_before_the_error(node):
    """An Ollama whose last lines and broken connection come in one go, once the node is reading:
    every token that came is relayed, then the error line (not the error in place of the tokens)."""
    import socket
    import threading

    def chunk(obj: dict) -> bytes:
        data = json.dumps(obj).encode() + b"\n"
        return b"%x\r\n%s\r\n" % (len(data), data)

    listener = bound_socket()
    listener.listen()

    def ollama() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += conn.recv(65536)
                if not request.startswith(b"POST /api/generate"):
                    conn.sendall(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                    continue
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-ndjson\r\n"
                             b"transfer-encoding: chunked\r\n\r\n" + chunk({"response": "a", "done": False}))
                time.sleep(0.3)  # the node is waiting for more by now
                conn.sendall(chunk({"response": "b", "done": False}) + chunk({"response": "c", "done": False}))
                conn.shutdown(socket.SHUT_WR)  # and the connection ends with them

    thread = threading.Thread(target=ollama, daemon=True)
    thread.start()
    try:
        n = node(OPERATOR_GONE, f"http://127.0.0.1:{listener.getsockname()[1]}")
        for _ in range(3):
            status, lines = run(n.url)
            assert status == 200
            assert [x.get("token") for x in lines[:-1]] == ["a", "b", "c"]
            assert lines[-1]["done"] is True and "lost connection to Ollama" in lines[-1]["error"]
    finally:
        listener.close()
        thread.join(5)


def test_ollama_down_at_start_then_up(node):
    sock = bound_socket()  # reserved, not listening yet: connections are refused
    ollama_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    n = node(OPERATOR_GONE, ollama_url)
    resp = httpx.get(f"{n.url}/health")
    assert resp.status_code == 503 and resp.json()["status"] == "unhealthy"
    assert "not reachable" in resp.json()["error"]
    status, body = run(n.url)
    assert status == 503 and "not reachable" in body[0]["error"]
    with Sim(sock=sock, models=["llama3"]):
        wait_for(lambda: httpx.get(f"{n.url}/health").status_code == 200)
        assert run(n.url)[0] == 200


def test_registration_retried_until_a_late_operator_appears(sim, node):
    import server as operator_app

    sock = bound_socket()
    op_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    node(op_url, sim.url, "late")
    with ServerThread(operator_app.create_app(settings()), sock):
        wait_for(lambda: node_ids(op_url) == {"late"}, timeout=10)


def test_reregisters_after_an_operator_restart(sim, node):
    import server as operator_app

    sock = bound_socket()
    port = sock.getsockname()[1]
    op_url = f"http://127.0.0.1:{port}"
    with ServerThread(operator_app.create_app(settings()), sock):
        node(op_url, sim.url, "n1")
        wait_for(lambda: node_ids(op_url) == {"n1"})
    fresh = operator_app.create_app(settings())
    assert len(fresh.state.registry) == 0  # a new operator knows nobody (asked before it serves: no race)...
    with ServerThread(fresh, bound_socket(port)):
        wait_for(lambda: node_ids(op_url) == {"n1"}, timeout=5)  # ...until the next heartbeat


def test_new_model_at_ollama_reaches_the_operator_within_an_interval(sim, operator, node):
    op = operator(health_check_interval=60)
    node(op.url, sim.url, "n1", heartbeat_interval=0.3)
    wait_for(lambda: node_ids(op.url) == {"n1"})
    sim.configure(models=["llama3:latest", "mistral", "phi3:mini"])
    wait_for(lambda: "phi3:mini" in httpx.get(f"{op.url}/nodes").json()["nodes"][0]["models"], timeout=3)


def test_a_listing_of_ollamas_models_that_began_before_the_last_one_taken_is_dropped(node):
    """A slow listing (begun before a pull ended) answers after a quick one that saw the pull: the
    node keeps the newer list, in what it answers and what it reports."""
    with Sim(models=["llama3"], list_delay=0.6) as sim:
        n = node(OPERATOR_GONE, sim.url)
        agent = n.app.state.node
        slow = asyncio.run_coroutine_threadsafe(agent.refresh_models(), n.loop)  # lists llama3 alone
        wait_for(lambda: sim.sim.stats["listing"], interval=0.01)
        sim.configure(models=["llama3", "phi3"], list_delay=0)
        assert httpx.get(f"{n.url}/models").json()["models"] == ["llama3:latest", "phi3:latest"]
        assert slow.result(5) is True
        assert agent.state.models == ["llama3:latest", "phi3:latest"] and "phi3:latest" in agent.state.digests
        assert httpx.get(f"{n.url}/health").json()["models"] == ["llama3:latest", "phi3:latest"]


def test_deregisters_on_shutdown(sim, operator):
    op = operator(health_check_interval=60)
    sock = bound_socket()
    port = sock.getsockname()[1]
    conf = settings(operator_url=op.url, ollama_host=sim.url, node_id="leaver", node_port=port,
                    node_url=f"http://127.0.0.1:{port}")
    with ServerThread(node_agent.create_app(conf), sock):
        wait_for(lambda: node_ids(op.url) == {"leaver"})
    assert node_ids(op.url) == set()  # gone at once, not after the prune TTL


def test_caller_disconnect_stops_ollama(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    sim.configure(hold_last=True)
    body = {"job_id": "j", "prompt": "x", "model": "llama3"}
    with httpx.stream("POST", f"{n.url}/run", json=body) as resp:
        lines = resp.iter_lines()
        assert json.loads(next(lines))["done"] is False
        assert sim.stats()["active"] == 1
    wait_for(lambda: sim.stats()["cancelled"] == 1, timeout=5)


def test_jobs_keep_one_connection_to_ollama(sim, node):
    """A finished answer's connection goes back to the pool: no new TCP connection (and, to a remote
    Ollama, no round trip) per job."""
    n = node(OPERATOR_GONE, sim.url)
    before = sim.stats()["connections"]
    for _ in range(6):
        assert run(n.url)[0] == 200
    assert sim.stats()["connections"] - before <= 2  # (one more when a listing ran beside a job)


@pytest.mark.parametrize("host", ["", "1.2.3.4", ":56789", "1.2.3.4:56789", "http://1.2.3.4", "https://1.2.3.4",
                                  "example.com", "example.com:56789/", "https://example.com:56789/path/", "0.0.0.0",
                                  "[0001:002:003:0004::1]", "https://[0001:002:003:0004::1]:56789/path"])
def test_ollama_host_in_every_form_the_sdk_takes(host):
    """OLLAMA_HOST means to the node what it means to the SDK (its own parser is the oracle)."""
    from ollama._client import _parse_host
    assert ollama_base_url(host) == _parse_host(host)


def test_public_url_is_never_0000():
    conf = settings(node_host="0.0.0.0", node_port=8123, operator_url="http://127.0.0.1:8000")
    assert node_agent.public_url(conf) == "http://127.0.0.1:8123"
    assert node_agent.public_url(settings(node_url="http://gpu-box:8001")) == "http://gpu-box:8001"


def test_sdk_reads_the_simulator_like_ollama(sim):
    """The simulator's answers parse in the real SDK exactly as Ollama's do."""
    import asyncio

    async def check():
        client = ollama.AsyncClient(host=sim.url)
        listing = await client.list()
        assert [m.model for m in listing.models] == ["llama3:latest", "mistral:latest"]
        parts = [p async for p in await client.generate(model="llama3", prompt="q", stream=True)]
        assert "".join(p.response for p in parts) == "".join(sim_tokens("q", 6))
        assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].eval_count == 6
        whole = await client.generate(model="llama3", prompt="q")
        assert whole.response == "".join(sim_tokens("q", 6)) and whole.done
        chat = await client.chat(model="mistral", messages=[{"role": "user", "content": "q"}])
        assert chat.message.role == "assistant" and chat.message.content == whole.response
        with pytest.raises(ollama.ResponseError) as info:
            await client.generate(model="nope", prompt="q")
        assert info.value.status_code == 404 and info.value.error == "model 'nope' not found"
        assert (await client.show("llama3")).details.format == "gguf"
        assert len((await client.embed(model="llama3", input=["a", "b"])).embeddings) == 2
        await client.close()

    asyncio.run(check())


def test_something_that_is_not_ollama_is_reported_not_fatal(operator, node, start):
    async def not_ollama(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/html")]})
        await send({"type": "http.response.body", "body": b"<html>router login</html>"})

    op = operator(health_check_interval=60)
    impostor = start(not_ollama)
    n = node(op.url, impostor.url, "confused")
    wait_for(lambda: node_ids(op.url) == {"confused"})  # the heartbeat survived and registered
    resp = httpx.get(f"{n.url}/health")
    assert resp.status_code == 503 and "not Ollama's API" in resp.json()["error"]
    assert httpx.get(f"{op.url}/nodes").json()["nodes"][0]["healthy"] is False


@pytest.mark.parametrize("method, path", [("POST", "/api/pull"), ("DELETE", "/api/delete"), ("POST", "/api/create"),
                                          ("POST", "/api/copy"), ("POST", "/api/push")])
def test_the_ollama_relay_never_changes_the_machine_for_anyone_but_its_operator(sim, node, method, path):
    """Creating and pushing never; pulling, removing and copying only for an operator the node reports
    to (its signature; tests/operator/test_models.py), never for anyone else who reaches its port."""
    n = node(OPERATOR_GONE, sim.url)
    body = json.dumps({"model": "llama3"}).encode()
    stranger = Identity(b"\x07" * 32)
    for headers in ({}, signed_request(stranger, method, "/ollama" + path, body)):
        resp = httpx.request(method, f"{n.url}/ollama{path}", content=body, headers=headers)
        assert resp.status_code in (403, 404, 405), resp.text
    assert sim.stats()["requests"] == 0 and sim.stats()["pulls"] == 0


def test_the_ollama_relay_passes_inference_through(sim, node):
    n = node(OPERATOR_GONE, sim.url)
    resp = httpx.post(f"{n.url}/ollama/api/generate", json={"model": "llama3", "prompt": "q", "stream": False})
    assert resp.status_code == 200 and resp.json()["response"] == "".join(sim_tokens("q", 6))
    assert httpx.get(f"{n.url}/ollama/api/tags").json()["models"][0]["name"] == "llama3:latest"


def test_the_node_honours_httpx_settings_such_as_proxies(sim, node, monkeypatch):
    """The SDK runs on httpx's own transport, so a proxy from the environment is used."""
    for name in ("no_proxy", "ALL_PROXY", "all_proxy", "HTTPS_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("HTTP_PROXY", sim.url)  # the simulator answers the proxied requests itself
    n = node(OPERATOR_GONE, "http://ollama.invalid:11434")
    wait_for(lambda: httpx.get(f"{n.url}/health", timeout=5).json()["status"] == "healthy")
    lines = read_stream(httpx.post(f"{n.url}/run", json={"job_id": "j", "prompt": "q", "model": "llama3"}))
    assert lines[-1]["done"] is True and "error" not in lines[-1]


@pytest.mark.parametrize("configured, env, slots", [
    (None, {}, None), (None, {"OLLAMA_NUM_PARALLEL": "4"}, 4), (None, {"OLLAMA_NUM_PARALLEL": "0"}, 1),
    (None, {"OLLAMA_NUM_PARALLEL": "four"}, 1), (None, {"OLLAMA_NUM_PARALLEL": "-2"}, 1),
    (2, {"OLLAMA_NUM_PARALLEL": "8"}, 2),  # config.json's num_parallel first
])
def test_slots_are_read_as_ollama_reads_them(configured, env, slots):  # None: not configured, learned
    from odla.node.capacity import num_parallel
    assert num_parallel(settings(num_parallel=configured), env) == slots


def test_a_node_reports_slots_loaded_models_and_speed(operator, node):
    with Sim(models=["llama3", "nomic-embed-text"], tokens=6) as sim:
        op = operator()
        node(op.url, sim.url, "n1", num_parallel=4, heartbeat_interval=30)  # so the report is the job's
        wait_for(lambda: node_ids(op.url) == {"n1"})
        row = httpx.get(f"{op.url}/nodes").json()["nodes"][0]
        assert row["slots"] == {"llama3:latest": 4, "nomic-embed-text:latest": 1}  # embedding models: 1
        assert row["loaded"] == [] and row["tokens_per_s"] is None
        with httpx.stream("POST", f"{op.url}/inference", json={"model": "llama3", "prompt": "q"}) as resp:
            assert read_stream(resp)[-1] == {"done": True}
        row = wait_for(lambda: httpx.get(f"{op.url}/nodes").json()["nodes"][0]["tokens_per_s"] and
                       httpx.get(f"{op.url}/nodes").json()["nodes"][0], timeout=3)  # reported soon after the job
        assert row["loaded"] == ["llama3:latest"] and row["tokens_per_s"] > 0


def test_a_node_without_node_id_is_named_by_host_and_port(monkeypatch):
    import socket
    monkeypatch.setattr(socket, "gethostname", lambda: "gpu box")
    assert node_agent.default_node_id(settings(node_port=8001)) == "gpu-box"  # SPEC.md: the hostname
    assert node_agent.default_node_id(settings(node_port=8002)) == "gpu-box-8002"  # a second one on the machine
    assert node_agent.default_node_id(settings(node_id="mine", node_port=8002)) == "mine"
