"""Access control: the join token and API keys, for every protected endpoint; the start-up warning."""

import logging

import httpx
import pytest

import server as operator_app
from odla.core.logs import Throttle
from tests.helpers import infer, node_ids, settings, wait_for
from tests.client.test_client import cli

TOKEN, KEYS = "join-s3cret", ["key-one", "key-two"]
NO, WRONG = {}, {"x-odla-join-token": "nope", "authorization": "Bearer nope"}


@pytest.fixture
def locked(sim, operator, node):
    op = operator(join_token=TOKEN, api_keys=KEYS)
    n = node(op.url, sim.url, "n1", join_token=TOKEN)
    wait_for(lambda: node_ids(op.url, headers={"authorization": f"Bearer {KEYS[0]}"}) == {"n1"})
    return op, n


@pytest.mark.parametrize("headers, status", [(NO, 401), (WRONG, 401), ({"x-odla-join-token": TOKEN}, 200)])
def test_register_needs_the_join_token(locked, headers, status):
    op, _ = locked
    body = {"node_id": "n9", "url": "http://127.0.0.1:1", "models": ["x"]}
    resp = httpx.post(f"{op.url}/register", json=body, headers=headers)
    assert resp.status_code == status
    if status == 401:
        assert "join token" in resp.json()["error"] and resp.json()["done"] is True


def test_a_refused_join_is_logged_with_the_nodes_address(locked, caplog):
    op, _ = locked
    caplog.set_level(logging.WARNING, logger="odla")
    body = {"node_id": "n9", "url": "http://127.0.0.1:1", "models": ["x"]}
    assert httpx.post(f"{op.url}/register", json=body, headers=WRONG).status_code == 401
    assert any("refused POST /register from 127.0.0.1: missing or wrong join token" in r.getMessage()
               for r in caplog.records)
    assert not any(TOKEN in r.getMessage() or "nope" in r.getMessage() for r in caplog.records)  # no secrets


def test_a_flood_of_refused_joins_is_one_log_line_a_minute(locked, caplog):
    op, _ = locked
    caplog.set_level(logging.WARNING, logger="odla")
    body = {"node_id": "n9", "url": "http://127.0.0.1:1", "models": ["x"]}
    with httpx.Client() as http:
        for _ in range(200):
            assert http.post(f"{op.url}/register", json=body, headers=WRONG).status_code == 401
    assert sum("missing or wrong join token" in r.getMessage() for r in caplog.records) == 1


def test_a_throttled_line_says_how_many_it_held_back():
    now = [0.0]
    throttle = Throttle(seconds=60, max_keys=2, clock=lambda: now[0])
    assert throttle("a") == 0 and throttle("a") is None and throttle("a") is None
    now[0] = 61
    assert throttle("a") == 2  # said again, with the two held back
    assert throttle("b") == 0 and throttle("c") == 0  # past max_keys the memory starts over: bounded
    assert len(throttle.said) <= 2


@pytest.mark.parametrize("headers, status", [(NO, 401), (WRONG, 401), ({"x-odla-join-token": TOKEN}, 200)])
def test_deregister_needs_the_join_token(locked, headers, status):
    op, _ = locked
    assert httpx.post(f"{op.url}/deregister", json={"node_id": "n1"}, headers=headers).status_code == status


@pytest.mark.parametrize("key, status", [(None, 401), ("nope", 401), (KEYS[0], 200), (KEYS[1], 200)])
def test_inference_and_nodes_need_an_api_key(locked, key, status):
    op, _ = locked
    headers = {"authorization": f"Bearer {key}"} if key else {}
    code, body = infer(op.url, headers=headers)
    assert code == status
    assert body[-1]["done"] is True
    resp = httpx.get(f"{op.url}/nodes", headers=headers)
    assert resp.status_code == status
    if status == 401:
        assert "API key" in resp.json()["error"] and resp.headers["www-authenticate"] == "Bearer"


def test_the_join_token_is_not_an_api_key(locked):
    op, _ = locked
    assert infer(op.url, headers={"authorization": f"Bearer {TOKEN}"})[0] == 401


@pytest.mark.parametrize("headers, status", [(NO, 401), (WRONG, 401), ({"x-odla-join-token": TOKEN}, 200)])
def test_only_the_operator_can_run_jobs_on_a_node(locked, headers, status):
    _, n = locked
    resp = httpx.post(f"{n.url}/run", json={"job_id": "j", "prompt": "p", "model": "llama3"}, headers=headers)
    assert resp.status_code == status


def test_health_stays_open(locked):
    op, n = locked
    assert httpx.get(f"{op.url}/health").status_code == 200
    assert httpx.get(f"{n.url}/health").status_code == 200


def test_a_node_with_the_wrong_token_does_not_join(sim, operator, node, caplog):
    op = operator(join_token=TOKEN)
    with pytest.raises(RuntimeError, match="did not start: the operator at .* refused this node: missing or wrong"):
        node(op.url, sim.url, "intruder", join_token="guess")
    node(op.url, sim.url, "member", join_token=TOKEN)
    wait_for(lambda: node_ids(op.url) == {"member"})
    assert "refused POST /register from 127.0.0.1" in caplog.text
    assert node_ids(op.url) == {"member"}


def test_client_api_key_option_and_environment(locked):
    op, _ = locked
    result = cli("hi", "--model", "llama3", "--operator", op.url)
    assert result.exit_code == 1 and "API key" in result.stderr
    assert cli("hi", "--model", "llama3", "--operator", op.url, "--api-key", KEYS[1]).exit_code == 0
    assert cli("nodes", "--operator", op.url, env={"ODLA_API_KEY": KEYS[0]}).exit_code == 0


def test_secrets_never_reach_the_logs(locked, caplog):
    op, _ = locked
    caplog.set_level(logging.DEBUG)
    infer(op.url, headers={"authorization": f"Bearer {KEYS[0]}"})
    infer(op.url, headers={"authorization": "Bearer wrong-key-xyz"})
    httpx.post(f"{op.url}/register", json={"node_id": "z", "url": "http://127.0.0.1:1", "models": []},
               headers={"x-odla-join-token": "wrong-token-xyz"})
    text = caplog.text + repr(settings(join_token=TOKEN, api_keys=KEYS))
    for secret in (TOKEN, *KEYS, "wrong-key-xyz", "wrong-token-xyz"):
        assert secret not in text


@pytest.mark.parametrize("host, values, warns", [
    ("0.0.0.0", {}, True),
    ("192.168.1.5", {}, True),
    ("127.0.0.1", {}, False),
    ("localhost", {}, False),
    ("0.0.0.0", {"join_token": "t"}, False),
    ("0.0.0.0", {"api_keys": ["k"]}, False),
])
def test_open_operator_on_the_network_warns_loudly(caplog, host, values, warns):
    caplog.set_level(logging.WARNING)
    operator_app.warn_if_open(settings(operator_host=host, **values))
    assert ("SECURITY" in caplog.text) is warns


# --- one policy for node credentials on every transport (HTTP and the dial link) ---

NODE_TOKENS = {"gpu-1": "own-1"}


@pytest.mark.parametrize("join_token", [None, TOKEN], ids=["node_tokens only", "and a join token"])
def test_per_node_tokens_hold_on_http_registration_as_on_links(operator, join_token):
    """A node listed in ``node_tokens`` registers and deregisters with its own token only; the shared
    join token (or none) cannot take its id, and with only ``node_tokens`` set nobody else joins."""
    op = operator(node_tokens=NODE_TOKENS, **({"join_token": join_token} if join_token else {}))

    def register(node_id: str, token=None) -> int:
        body = {"node_id": node_id, "url": f"http://127.0.0.1:1/{node_id}", "models": ["x"]}
        return httpx.post(f"{op.url}/register", json=body,
                          headers={"x-odla-join-token": token} if token else {}).status_code

    def deregister(node_id: str, token=None) -> int:
        return httpx.post(f"{op.url}/deregister", json={"node_id": node_id},
                          headers={"x-odla-join-token": token} if token else {}).status_code

    assert register("anyone") == 401 and deregister("gpu-1") == 401  # no credential
    assert register("gpu-1", "own-2") == 401
    assert register("gpu-1", "own-1") == 200
    assert register("other", "own-1") == 401  # its token is gpu-1's only
    if join_token:
        assert register("gpu-1", join_token) == 401 and deregister("gpu-1", join_token) == 401
        assert register("other", join_token) == 200
    assert deregister("gpu-1", "own-1") == 200


def test_an_http_node_with_its_own_token_serves_jobs(sim, operator, node):
    """The operator calls a node with that node's own token (its /run checks it), not the join token."""
    op = operator(node_tokens={"n1": "own-1"}, join_token=TOKEN)
    node(op.url, sim.url, "n1", join_token="own-1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    status, lines = infer(op.url)
    assert status == 200 and lines[-1] == {"done": True}


def ws_handshake(port: int, **headers: str) -> bytes:
    """The answer's status line to a WebSocket upgrade of /nodes/link, on a raw socket."""
    import socket

    extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(f"GET /nodes/link HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                  f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Extensions: permessage-deflate\r\n{extra}\r\n".encode())
        return s.recv(4096)


def test_a_web_page_cannot_open_a_link(operator):
    """A loopback operator without a join token: a WebSocket from another web origin (any page the
    user visits) is refused before it is accepted, so it never receives a prompt."""
    op = operator()
    assert ws_handshake(op.port, Origin="http://evil.example").startswith(b"HTTP/1.1 403")
    assert ws_handshake(op.port).startswith(b"HTTP/1.1 101")  # a node (no Origin) is let in


def test_a_link_without_a_credential_is_refused_before_it_is_accepted(net):
    net.operator(join_token=TOKEN)  # the real process: python server.py
    assert ws_handshake(net.op_port).startswith(b"HTTP/1.1 403")
    assert ws_handshake(net.op_port, Authorization="Bearer nope").startswith(b"HTTP/1.1 403")
    accepted = ws_handshake(net.op_port, Authorization=f"Bearer {TOKEN}")
    assert accepted.startswith(b"HTTP/1.1 101")
    assert b"permessage-deflate" not in accepted.lower()  # no compression state per link


def test_each_key_reads_its_own_receipts_and_admin_keys_read_all(sim, operator, node):
    op = operator(api_keys=["key-a", "key-b"], admin_keys=["key-root"])
    node(op.url, sim.url, "n1")
    auth = lambda key: {"authorization": f"Bearer {key}"}  # noqa: E731
    wait_for(lambda: node_ids(op.url, headers=auth("key-root")) == {"n1"})
    ids = {}
    for key in ("key-a", "key-b"):
        resp = httpx.post(f"{op.url}/inference", json={"model": "llama3", "prompt": key}, headers=auth(key))
        ids[key] = resp.headers["x-odla-job"]

    def listed(key: str) -> set:
        return {j["id"] for j in httpx.get(f"{op.url}/jobs", headers=auth(key)).json()["jobs"]}

    wait_for(lambda: listed("key-root") == set(ids.values()))
    assert listed("key-a") == {ids["key-a"]} and listed("key-b") == {ids["key-b"]}
    assert httpx.get(f"{op.url}/jobs/{ids['key-a']}", headers=auth("key-a")).status_code == 200
    assert httpx.get(f"{op.url}/jobs/{ids['key-a']}", headers=auth("key-b")).status_code == 404
    assert httpx.get(f"{op.url}/jobs/{ids['key-b']}", headers=auth("key-root")).status_code == 200
    assert httpx.get(f"{op.url}/jobs", params={"offset": 10**20}, headers=auth("key-root")).status_code == 422
