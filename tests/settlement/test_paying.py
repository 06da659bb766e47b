"""The ledger over a running network: priced jobs on every door move money when their receipts
are countersigned; callers see their own accounts; a node caught padding has the charges of
its open epoch reversed, while a closed epoch stays as it was (issue 27)."""

import httpx
from eth_account import Account

from odla.core import protocol as p
from odla.proofs.verify import check
from tests.helpers import Sim, node_ids, wait_for
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


def test_a_resumed_answer_pays_each_node_for_its_own_tokens_and_the_prompt_once(operator, node):
    """Every answer is cut at its 3rd token, and the other node finishes it: each node's receipt is its
    own record (the job's, then ``{id}.1``), checked against what that node was sent and relayed, each
    charged for the tokens that node gave; the prompt is paid for once, to the first node. Both receipts
    are in the epoch's Merkle tree, and a proof of the second verifies."""
    other_key = "0x" + "33" * 32
    addresses = {"n1": NODE, "n2": Account.from_key(other_key).address}
    op = operator(prices=PRICES, operator_fee_bps=1000)
    with Sim(models=["llama3:latest"], tokens=12, crash_after=3, seeded=True) as sim:
        node(op.url, sim.url, "n1")
        node(op.url, sim.url, "n2", node_private_key=other_key)
        wait_for(lambda: node_ids(op.url) == {"n1", "n2"})
        resp = httpx.post(f"{op.url}/api/generate", json={"model": "llama3", "prompt": "why", "options": {"seed": 3}},
                          timeout=30)
        assert resp.status_code == 200 and "error" not in resp.text.splitlines()[-1], resp.text
        job_id, first = resp.headers[p.JOB_HEADER], resp.headers["x-odla-node"]
        second = ({"n1", "n2"} - {first}).pop()
        job = signed(op.url, job_id, {})
        assert job["legs"] == [{"node": first, "tokens": 3, "job": job_id},
                               {"node": second, "tokens": 9, "job": f"{job_id}.1"}]
        assert job["node"] == second and job["output_tokens"] == 12 and job["part_of"] is None
        part = signed(op.url, f"{job_id}.1", {})
        assert part["part_of"] == job_id and part["node"] == second and part["outcome"] == "ok"
        assert part["output_tokens"] == 9
        for record, who in ((job, first), (part, second)):  # each signed by its own node, undisputed
            assert record["receipt"]["message"]["node"] == addresses[who] and record["disputed"] is None, record
        assert job["receipt"]["message"]["outputTokens"] == 3 and part["receipt"]["message"]["outputTokens"] == 9
        # the first node was cut before Ollama counted the prompt (its receipt says what it knew); the second
        # read the prompt and the answer so far, which the client does not pay for again
        assert part["receipt"]["message"]["promptTokens"] > 0
        owed = {first: job["receipt"]["message"]["promptTokens"] + 2 * 3, second: 2 * 9}
        account = lambda: httpx.get(f"{op.url}/accounts/anonymous").json()  # noqa: E731
        client = wait_for(lambda: (a := account())["balance"] == -sum(owed.values()) and a)
        assert sorted((e["job_id"], -e["amount"]) for e in client["entries"]) == sorted(
            [(job_id, owed[first]), (f"{job_id}.1", owed[second])])
        for who, cost in owed.items():
            assert httpx.get(f"{op.url}/accounts/{addresses[who]}").json()["balance"] == cost - cost * 1000 // 10_000
        listed = httpx.get(f"{op.url}/jobs").json()["jobs"]
        assert [j["id"] for j in listed] == [job_id]  # the part is read through its job
        assert op.call(op.app.state.epochs.close())["count"] == 2
        proof = httpx.get(f"{op.url}/jobs/{job_id}.1/proof").json()
        assert all(problem is None for _, problem in check(proof)), check(proof)
