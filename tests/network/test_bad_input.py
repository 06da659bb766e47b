"""Bad input gets a clear 4xx, never a 5xx: hand-written cases and generated bodies."""

import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from tests.helpers import node_ids, wait_for

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
TEXT = st.text(max_size=40)
FIELDS = {
    "/register": {"node_id": TEXT | JSON, "url": TEXT | JSON, "models": st.lists(TEXT, max_size=3) | JSON},
    "/deregister": {"node_id": TEXT | JSON},
    "/inference": {"model": TEXT | JSON, "prompt": TEXT | JSON},
    "/run": {"job_id": TEXT | JSON, "prompt": TEXT | JSON, "model": TEXT | JSON},
}


def bodies(path):
    """Whole bodies: right keys with any values (some left out, some extra), any JSON, or raw bytes."""
    fields = FIELDS[path]
    shaped = st.fixed_dictionaries({}, optional=fields).flatmap(
        lambda d: st.dictionaries(st.sampled_from(["extra", "Model", "stream"]), JSON, max_size=1).map(
            lambda extra: {**d, **extra}))
    as_json = (shaped | JSON).map(lambda v: json.dumps(v).encode())
    return as_json | st.binary(max_size=40)


@pytest.fixture
def servers(sim, operator, node):
    op = operator(health_check_interval=60)
    n = node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    return {"/register": op.url, "/deregister": op.url, "/inference": op.url, "/run": n.url}


def check(url, body):
    with httpx.Client(timeout=10) as http:
        resp = http.post(url, content=body, headers={"content-type": "application/json"})
    assert resp.status_code < 500, (body, resp.status_code, resp.text)
    if resp.status_code >= 400:
        payload = resp.json()
        assert payload["done"] is True and isinstance(payload["error"], str) and payload["error"]


@pytest.mark.parametrize("path", sorted(FIELDS))
def test_generated_bodies_never_cause_a_5xx(servers, path):
    @hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(body=bodies(path))
    def run(body):
        check(servers[path] + path, body)

    run()


@pytest.mark.parametrize("path, body, status, says", [
    ("/register", b'{"node_id": "a b", "url": "http://x:1", "models": []}', 422, "node_id"),
    ("/register", b'{"node_id": "a", "url": "file:///etc/passwd", "models": []}', 422, "http"),
    ("/register", b'{"node_id": "a", "url": "http://x:1", "models": "llama3"}', 422, "models"),
    ("/register", b'{"node_id": "a", "url": "http://x:1", "models": [], "admin": true}', 422, "unknown field 'admin'"),
    ("/register", b'', 400, "JSON"),  # read after the join token, like /inference's: not JSON is 400
    ("/inference", b'{"model": "llama3", "prompt": "   "}', 200, ""),
    ("/inference", b'{"model": "   ", "prompt": "x"}', 422, "model"),
    ("/inference", b'{"model": null, "prompt": "x"}', 422, "model"),
    ("/inference", b'{"model": "llama3", "prompt": ["x"]}', 422, "prompt"),
    ("/inference", b'\xff\xfe', 400, "JSON"),
    ("/run", b'{"job_id": "", "prompt": "x"}', 422, "job_id"),
])
def test_hand_written_bad_bodies(servers, path, body, status, says):
    resp = httpx.post(servers[path] + path, content=body, headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    if status != 200:
        assert says in resp.json()["error"]


def test_content_type(servers):
    """curl -d sends JSON labelled as a form: /inference and /register both take it."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    resp = httpx.post(servers["/inference"] + "/inference", content=b'{"model":"llama3","prompt":"x"}', headers=form)
    assert resp.status_code == 200
    body = b'{"node_id": "a", "url": "http://x:1", "models": []}'
    resp = httpx.post(servers["/register"] + "/register", content=body, headers=form)
    assert resp.status_code == 200 and resp.json()["node_id"] == "a"


def test_wrong_methods_and_paths(servers):
    op = servers["/inference"]
    assert httpx.get(op + "/inference").status_code == 405
    assert httpx.get(op + "/nope").status_code == 404
    assert httpx.get(op + "/nope").json()["done"] is True
