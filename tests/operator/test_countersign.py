"""Signed receipts end to end: the node signs each job's receipt, the operator checks it against
what it relayed and countersigns it, on /inference and on every door (issue 26)."""

import httpx
from eth_account import Account
from eth_account.messages import encode_typed_data

from odla.core import protocol as p
from tests.helpers import NODE_KEY, OPERATOR_KEY, node_ids, wait_for

NODE, OPERATOR = Account.from_key(NODE_KEY).address, Account.from_key(OPERATOR_KEY).address
JOBS = (("/inference", {"model": "llama3", "prompt": "a"}),
        ("/api/generate", {"model": "llama3", "prompt": "b"}),
        ("/api/generate", {"model": "llama3", "prompt": "c", "stream": False}),
        ("/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "d"}]}),
        ("/v1/chat/completions", {"model": "llama3", "stream": True, "messages": [{"role": "user", "content": "e"}]}),
        ("/api/embed", {"model": "llama3", "input": "f"}))


def signed(op_url: str, job_id: str) -> dict:
    return wait_for(lambda: (job := httpx.get(f"{op_url}/jobs/{job_id}").json())["operator_signature"] and job)


def test_every_door_gets_a_receipt_both_sign_and_eth_account_verifies(sim, operator, node):
    op = operator()
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    assert httpx.get(f"{op.url}/nodes").json()["nodes"][0]["address"] == NODE
    ids = []
    for path, body in JOBS:
        resp = httpx.post(f"{op.url}{path}", json=body)
        assert resp.status_code == 200, (path, resp.text)
        ids.append(resp.headers[p.JOB_HEADER])
    for (path, _), job_id in zip(JOBS, ids):
        job = signed(op.url, job_id)
        message = job["receipt"]["message"]
        assert (message["jobId"], message["node"], message["operator"]) == (job_id, NODE, OPERATOR), path
        assert message["outcome"] == "ok" and message["model"].startswith("llama3") and job["disputed"] is None, path
        if path != "/api/embed":
            assert message["outputTokens"] == job["output_tokens"] == 6, path
        typed = encode_typed_data(full_message=job["receipt"])
        assert Account.recover_message(typed, signature=job["node_signature"]) == NODE
        assert Account.recover_message(typed, signature=job["operator_signature"]) == OPERATOR
    # a job that broke off mid-answer is signed for what it was
    sim.configure(error_after=2)
    resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "breaks"})
    job = signed(op.url, resp.headers[p.JOB_HEADER])
    assert (job["outcome"], job["receipt"]["message"]["outcome"], job["disputed"]) == ("node_error", "error", None)
    assert job["receipt"]["message"]["outputTokens"] == job["output_tokens"] == 2


def test_a_node_that_pads_its_token_count_is_disputed_on_its_first_receipt_and_quarantined(sim, operator, node):
    op = operator(audit_rate=0)
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})
    sim.configure(cheat="pad")
    resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "b"})
    job = signed(op.url, resp.headers[p.JOB_HEADER])
    assert job["disputed"] == "the receipt claims 16 output tokens; 6 were relayed"
    assert job["receipt"]["message"]["outputTokens"] == 16
    row = httpx.get(f"{op.url}/nodes").json()["nodes"][0]
    assert (row["quarantined"], row["reputation"], row["disputed"]) == (True, 0.2, 1)
    refused = httpx.post(f"{op.url}/inference", json={"model": "llama3", "prompt": "again"})
    assert refused.status_code == 404 and "n1 quarantined" in refused.json()["error"]  # as any node that cannot take jobs
