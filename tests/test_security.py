"""Access control: the join token and API keys, for every protected endpoint; the start-up warning."""

import logging

import httpx
import pytest

import server as operator_app
from odla.logs import Throttle
from tests.helpers import infer, node_ids, settings, wait_for
from tests.test_client import cli

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
    node(op.url, sim.url, "intruder", join_token="guess")
    node(op.url, sim.url, "member", join_token=TOKEN)
    wait_for(lambda: node_ids(op.url) == {"member"})
    wait_for(lambda: "401" in caplog.text)
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
