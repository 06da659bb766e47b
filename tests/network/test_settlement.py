"""Settlement over real processes and a real EVM (anvil): the escrow deployed by its script, a
wallet signing in and depositing, 402 before a deposit, jobs paid through the network, epochs
posted, a node's claim (and its second claim refused), a withdrawal, and the chain stopping and
coming back (issue 27)."""

import json
import re
import subprocess
import sys
import time

import httpx

from odla.proofs.identity import Identity
from odla.settlement.chain import Escrow
from odla.settlement.anvil import ANVIL_KEYS
from tests.helpers import ROOT, wait_for

OPERATOR_KEY, NODE_KEY, CLIENT_KEY = ANVIL_KEYS[0], ANVIL_KEYS[1], ANVIL_KEYS[3]
NODE, CLIENT = (Identity(bytes.fromhex(k[2:])).address for k in (NODE_KEY, CLIENT_KEY))
PRICES = {"llama3": {"prompt": 1_000_000, "output": 3_000_000}}  # 1 wei a prompt token, 3 an output token
TX = re.compile(r"0x[0-9a-f]{64}")


def script(net, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**net.start_env, **env})


def settled_network(net, anvil, tmp_path, delay: int = 3, **config) -> str:
    """Escrow deployed, operator settling on it, one signed node; the escrow's address."""
    net.start_env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"),
                     "ODLA_CONFIG": str(net.config), "ODLA_WALLET_KEY": CLIENT_KEY}
    net.config.write_text(json.dumps({**json.loads(net.config.read_text()), "chain_rpc_url": anvil.url,
                                      "chain_id": 31337, "operator_private_key": OPERATOR_KEY}))
    deployed = script(net, "scripts/escrow.py", "deploy", "--withdraw-delay", str(delay))
    assert deployed.returncode == 0, deployed.stderr
    lines = deployed.stdout.strip().splitlines()
    assert TX.fullmatch(lines[-2]) and lines[-1].startswith("escrow_address: 0x")
    address = lines[-1].split()[-1]
    net.operator(settlement="evm", prices=PRICES, escrow_address=address, operator_fee_bps=500, chain_poll=0.2,
                 **config)
    net.node("n1", net.sim("--tokens", "5"), NODE_PRIVATE_KEY=NODE_KEY)
    net.wait_nodes("n1")
    return address


def bearer(tmp_path) -> dict:
    sessions = json.loads((tmp_path / "xdg" / "odla" / "sessions.json").read_text())
    return {"authorization": f"Bearer {next(iter(sessions.values()))['token']}"}


def test_a_wallet_deposits_pays_for_jobs_the_node_claims_and_the_client_withdraws_the_rest(net, anvil, tmp_path):
    address = settled_network(net, anvil, tmp_path, epoch_seconds=1.5)
    escrow = Escrow(anvil.url, 31337, address)
    signed_in = script(net, "client.py", "login")
    assert signed_in.returncode == 0 and CLIENT in signed_in.stdout, signed_in.stderr
    assert (tmp_path / "xdg" / "odla" / "sessions.json").stat().st_mode & 0o077 == 0  # a credential: its owner's only
    auth = bearer(tmp_path)
    # no deposit: 402 on every door, before any node works on it
    before = httpx.get(f"{net.sims_url()}/_sim/stats").json()["requests"]
    for path, body in (("/inference", {"model": "llama3", "prompt": "hi"}),
                       ("/api/generate", {"model": "llama3", "prompt": "hi"}),
                       ("/v1/chat/completions", {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]})):
        refused = httpx.post(f"{net.op_url}{path}", json=body, headers=auth, timeout=10)
        assert refused.status_code == 402 and "0 available" in refused.text, (path, refused.text)
    assert httpx.get(f"{net.sims_url()}/_sim/stats").json()["requests"] == before
    unpaid = httpx.get(f"{net.op_url}/jobs", params={"outcome": "unpaid"}).json()["jobs"]
    assert len(unpaid) == 3 and all(j["caller"] == CLIENT and j["node"] is None for j in unpaid)
    failed = script(net, "client.py", "infer", "hi", "--model", "llama3")
    assert failed.returncode == 1 and "deposit" in failed.stderr
    # an API key's account has no deposit on chain: told to sign in with a wallet
    assert httpx.post(f"{net.op_url}/inference", json={"model": "llama3", "prompt": "hi"},
                      timeout=10).status_code == 402
    deposited = script(net, "client.py", "deposit", "1000000")
    assert deposited.returncode == 0 and TX.fullmatch(deposited.stdout.strip().splitlines()[-1]), deposited.stderr
    unsigned = httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": "hi"}, headers=auth, timeout=10)
    assert unsigned.status_code == 402 and "signed off 0" in unsigned.text  # a deposit alone allows nothing
    allowed = script(net, "client.py", "allow", "600000")
    assert allowed.returncode == 0 and "signed off 600000 wei in all" in allowed.stdout, allowed.stderr
    for i in range(4):
        answered = script(net, "client.py", "infer", f"question {i}", "--model", "llama3")
        assert answered.returncode == 0, answered.stderr
    resp = httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": "more", "options":
                                                          {"num_predict": 50}}, headers=auth, timeout=10)
    assert resp.status_code == 200
    # the ledger charges what the receipts say; the chain gets it with the next epochs
    account = wait_for(lambda: (a := httpx.get(f"{net.op_url}/accounts/me", headers=auth).json())["chain"]["held"] == 0
                       and len(a["entries"]) == 5 and a, timeout=20)
    spent = -account["balance"]
    assert spent == account["chain"]["spent"] > 0 and account["chain"]["available"] == 600_000 - spent
    node_owed = httpx.get(f"{net.op_url}/accounts/{NODE}").json()["balance"]
    assert node_owed == spent - sum(-e["amount"] * 500 // 10_000 for e in account["entries"])
    claim = wait_for(lambda: (c := httpx.get(f"{net.op_url}/settlement/claims/{NODE}").json()).get("owed") == node_owed
                     and c, timeout=20)
    assert escrow.standing(CLIENT).charged == spent  # the chain, the ledger and the receipts agree to the wei
    claimed = script(net, "node.py", "claim", NODE_PRIVATE_KEY=NODE_KEY)
    assert claimed.returncode == 0 and TX.fullmatch(claimed.stdout.strip().splitlines()[-1]), claimed.stderr
    assert escrow.standing(NODE).claimed == node_owed == claim["owed"]
    again = script(net, "node.py", "claim", NODE_PRIVATE_KEY=NODE_KEY)
    assert again.returncode == 1 and "claimed all" in again.stderr  # nothing is paid twice
    # the client takes back the rest: asked, then after the delay paid; no more jobs meanwhile
    asked = script(net, "client.py", "withdraw")
    assert asked.returncode == 0 and "requested" in asked.stdout, asked.stderr
    time.sleep(0.5)  # the operator's reading of the deposit (chain_poll) catches up
    refused = httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": "x"}, headers=auth, timeout=10)
    assert refused.status_code == 402 and "withdraw" in refused.text
    early = script(net, "client.py", "withdraw")
    assert early.returncode == 1 and "can be made from" in early.stderr, early.stderr
    anvil.rpc("evm_increaseTime", 4)  # the contract's delay passes on the chain's clock
    anvil.rpc("evm_mine")
    paid = script(net, "client.py", "withdraw")
    assert paid.returncode == 0 and f"withdrew {1_000_000 - spent} wei" in paid.stdout, paid.stdout + paid.stderr
    standing = escrow.standing(CLIENT)
    assert (standing.deposited, standing.charged) == (spent, spent)
    balance = script(net, "client.py", "balance")
    assert balance.returncode == 0 and "available  0 wei" in balance.stdout, balance.stdout + balance.stderr
    assert script(net, "client.py", "logout").returncode == 0
    assert httpx.get(f"{net.op_url}/accounts/me", headers=auth).status_code == 401  # the token is forgotten there


def test_the_chain_stopping_and_coming_back_loses_nothing(net, anvil, tmp_path):
    address = settled_network(net, anvil, tmp_path, epoch_seconds=1)
    escrow = Escrow(anvil.url, 31337, address)
    assert script(net, "client.py", "login").returncode == 0
    assert script(net, "client.py", "deposit", "500000").returncode == 0
    assert script(net, "client.py", "allow", "500000").returncode == 0
    auth = bearer(tmp_path)
    ask = lambda: httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": "q"},  # noqa: E731
                             headers=auth, timeout=10)
    assert ask().status_code == 200
    anvil.stop()  # its state is kept in its file
    answers = [ask().status_code for _ in range(3)]  # the deposit read before stands: jobs go on
    assert answers == [200, 200, 200]
    account = wait_for(lambda: (a := httpx.get(f"{net.op_url}/accounts/me", headers=auth).json())
                       and len(a["entries"]) == 4 and a["chain"]["held"] == 0 and a, timeout=20)
    time.sleep(2.5)  # epochs close while the chain is away; their posts fail and wait
    anvil.start()
    spent = -account["balance"]
    wait_for(lambda: escrow.standing(CLIENT).charged == spent, timeout=30)
    node_owed = httpx.get(f"{net.op_url}/accounts/{NODE}").json()["balance"]
    wait_for(lambda: httpx.get(f"{net.op_url}/settlement/claims/{NODE}").json().get("owed") == node_owed, timeout=20)
    claimed = script(net, "node.py", "claim", NODE_PRIVATE_KEY=NODE_KEY)
    assert claimed.returncode == 0, claimed.stderr
    assert escrow.standing(NODE).claimed == node_owed


def test_a_node_caught_padding_has_its_open_charges_reversed_before_the_epoch_closes(net, anvil, tmp_path):
    settled_network(net, anvil, tmp_path, epoch_seconds=3600)  # the epoch stays open
    assert script(net, "client.py", "login").returncode == 0
    assert script(net, "client.py", "deposit", "500000").returncode == 0
    assert script(net, "client.py", "allow", "500000").returncode == 0
    auth = bearer(tmp_path)
    for i in range(3):
        assert httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": f"q{i}"}, headers=auth,
                          timeout=10).status_code == 200
    charged = wait_for(lambda: (a := httpx.get(f"{net.op_url}/accounts/me", headers=auth).json())
                       and len(a["entries"]) == 3 and a, timeout=15)
    assert charged["balance"] < 0 and charged["chain"]["spent"] == -charged["balance"]
    httpx.post(f"{net.sims_url()}/_sim/config", json={"cheat": "pad"}).raise_for_status()
    assert httpx.post(f"{net.op_url}/api/generate", json={"model": "llama3", "prompt": "padded"}, headers=auth,
                      timeout=10).status_code == 200
    undone = wait_for(lambda: (a := httpx.get(f"{net.op_url}/accounts/me", headers=auth).json())
                      and a["balance"] == 0 and a, timeout=15)
    assert [e["kind"] for e in undone["entries"]].count("reversal") == 3 and undone["chain"]["spent"] == 0
    assert httpx.get(f"{net.op_url}/accounts/{NODE}").json()["balance"] == 0  # the cheat earns nothing
    assert net.listing()["n1"]["quarantined"]
    assert httpx.get(f"{net.op_url}/settlement/claims/{NODE}").status_code == 404
