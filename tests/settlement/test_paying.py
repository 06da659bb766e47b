"""The ledger over a running network: priced jobs on every door move money when their receipts
are countersigned; callers see their own accounts; a node caught padding has the charges of
its open epoch reversed, while a closed epoch stays as it was (issue 27)."""

import httpx

from odla.core import protocol as p
from tests.helpers import node_ids, wait_for
from tests.operator.test_countersign import JOBS, NODE, OPERATOR

PRICES = {"llama3": {"prompt": 1_000_000, "output": 2_000_000}}  # 1 wei a prompt token, 2 an output token
K1, K2, ADMIN = {"authorization": "Bearer k1"}, {"authorization": "Bearer k2"}, {"authorization": "Bearer adm"}


def signed(op_url: str, job_id: str, headers: dict) -> dict:
    return wait_for(lambda: (job := httpx.get(f"{op_url}/jobs/{job_id}", headers=headers).json())["operator_signature"]
                    and job)


def cost(job: dict) -> int:
    message = job["receipt"]["message"]
    return message["promptTokens"] + 2 * min(message["outputTokens"], job["output_tokens"] or 0)


def test_priced_jobs_on_every_door_debit_the_client_and_credit_the_node_and_the_operator(sim, operator, node):
    op = operator(prices=PRICES, operator_fee_bps=1000, api_keys=["k1", "k2"], admin_keys=["adm"])
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url, headers=K1) == {"n1"})
    ids = []
    for path, body in JOBS:
        resp = httpx.post(f"{op.url}{path}", json=body, headers=K1)
        assert resp.status_code == 200, resp.text
        ids.append(resp.headers[p.JOB_HEADER])
    costs = [cost(signed(op.url, job_id, K1)) for job_id in ids]
    assert all(costs) and costs[-1] == signed(op.url, ids[-1], K1)["receipt"]["message"]["promptTokens"]  # embed: prompt only
    total = sum(costs)
    mine = wait_for(lambda: (a := httpx.get(f"{op.url}/accounts/me", headers=K1).json())["balance"] == -total and a)
    assert len(mine["entries"]) == len(JOBS) and {e["kind"] for e in mine["entries"]} == {"charge"}
    assert sorted(e["job_id"] for e in mine["entries"]) == sorted(ids)
    fees = sum(c * 1000 // 10_000 for c in costs)
    node_account = httpx.get(f"{op.url}/accounts/{NODE.lower()}", headers=ADMIN).json()  # any spelling of the address
    operator_account = httpx.get(f"{op.url}/accounts/{OPERATOR}", headers=ADMIN).json()
    assert (node_account["balance"], operator_account["balance"]) == (total - fees, fees)
    assert mine["balance"] + node_account["balance"] + operator_account["balance"] == 0
    # one caller's account is none of another's business; its own is empty
    assert httpx.get(f"{op.url}/accounts/{mine['account']}", headers=K2).status_code == 404
    assert httpx.get(f"{op.url}/accounts/me", headers=K2).json()["balance"] == 0
    assert httpx.get(f"{op.url}/accounts/me").status_code == 401
    # prices are listed, and each model row says its own
    assert httpx.get(f"{op.url}/prices", headers=K1).json() == {
        "per_tokens": 1_000_000, "operator_fee_bps": 1000, "models": {"llama3:latest": PRICES["llama3"]}}
    tags = {m["name"]: m.get("price") for m in httpx.get(f"{op.url}/api/tags", headers=K1).json()["models"]}
    assert tags["llama3:latest"] == {**PRICES["llama3"], "per_tokens": 1_000_000} and tags["mistral:latest"] is None
    models = {m["id"]: m.get("price") for m in httpx.get(f"{op.url}/v1/models", headers=K1).json()["data"]}
    assert models["llama3:latest"]["output"] == 2_000_000


def test_a_node_caught_padding_has_its_open_charges_reversed_and_its_closed_epoch_kept(sim, operator, node):
    op = operator(prices=PRICES)  # epochs close when the test says
    node(op.url, sim.url, "n1")
    wait_for(lambda: node_ids(op.url) == {"n1"})

    def run(prompt: str) -> dict:
        resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": prompt})
        return signed(op.url, resp.headers[p.JOB_HEADER], {})

    settled = cost(run("first"))
    assert op.call(op.app.state.epochs.close())["count"] == 1  # its epoch closes
    opened = sum(cost(run(f"open {i}")) for i in range(3))
    account = httpx.get(f"{op.url}/accounts/anonymous").json()
    assert account["balance"] == -(settled + opened), account
    sim.configure(cheat="pad")
    disputed = run("padded")
    assert disputed["disputed"] and "claims" in disputed["disputed"]
    account = wait_for(lambda: (a := httpx.get(f"{op.url}/accounts/anonymous").json())["balance"] == -settled and a)
    kinds = [e["kind"] for e in account["entries"]]
    assert kinds.count("reversal") == 3 and kinds.count("charge") == 4  # the padded job was never charged
    node_balance = httpx.get(f"{op.url}/accounts/{NODE}").json()["balance"]
    assert node_balance == settled  # no fee: the node keeps what its closed epoch holds
