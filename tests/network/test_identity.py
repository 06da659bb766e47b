"""Node identity over real processes: keys made and kept, signed registrations on both transports,
an id bound to its key across an operator's restart (issue 26)."""

import json
import os

import httpx
from eth_account import Account

from odla.core import protocol as p
from tests.helpers import free_port, infer, wait_for

OTHER_KEY = "0x" + "33" * 32


def register(net, node_id: str) -> httpx.Response:
    """An unsigned registration, as an older node (or someone with only the join token) sends it."""
    return httpx.post(f"{net.op_url}/register", json={"node_id": node_id, "url": f"http://127.0.0.1:{free_port()}",
                                                      "models": ["llama3"]}, timeout=5)


def test_a_node_is_its_key_and_another_key_cannot_take_its_id_even_after_a_restart(net, tmp_path):
    sim = net.sim()
    operator = net.operator()
    net.node("n1", sim)
    net.wait_nodes("n1")
    key_file = tmp_path / "node.key"  # made on first start, next to the config, for its owner only
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"
    address = Account.from_key(key_file.read_text().strip()).address
    assert net.listing()["n1"]["address"] == address
    assert infer(net.op_url)[0] == 200

    thief = net.start("node.py", NODE_ID="n1", NODE_PORT=str(free_port()), OLLAMA_HOST=sim,
                      NODE_PRIVATE_KEY=OTHER_KEY)
    assert thief.proc.wait(timeout=20) != 0
    assert f"belongs to key {address}" in thief.output()
    assert OTHER_KEY[2:] not in thief.output()  # a key never reaches a log
    refused = register(net, "n1")
    assert refused.status_code == 409 and "not signed" in refused.json()["error"]
    assert register(net, "old-node").status_code == 200  # unsigned nodes are taken unless required
    assert net.listing()["old-node"]["address"] is None

    operator.stop()
    net.operator()  # the same jobs_db: the binding is kept
    wait_for(lambda: net.listing()["n1"]["address"] == address, timeout=15)
    assert register(net, "n1").status_code == 409


def test_a_key_file_others_can_read_stops_the_node_with_the_fix(net, tmp_path):
    key_file = tmp_path / "loose.key"
    key_file.write_text(OTHER_KEY)
    os.chmod(key_file, 0o644)
    node = net.start("node.py", NODE_ID="n1", NODE_PORT=str(free_port()), OLLAMA_HOST="http://127.0.0.1:9",
                     ODLA_NODE_KEY_FILE=str(key_file))
    assert node.proc.wait(timeout=20) != 0
    assert f"chmod 600 {key_file}" in node.output() and OTHER_KEY[2:] not in node.output()


def test_dial_nodes_sign_their_hello_and_a_strict_operator_takes_only_their_keys(net):
    sim = net.sim()
    mine = Account.from_key(OTHER_KEY).address
    net.operator(require_signed_nodes=True, node_addresses={"d1": mine})
    wrong = net.node("d1", sim, NODE_LINK="dial", NODE_PRIVATE_KEY="0x" + "44" * 32)
    assert wrong.proc.wait(timeout=20) != 0
    assert f"belongs to key {mine}" in wrong.output()
    net.node("d1", sim, NODE_LINK="dial", NODE_PRIVATE_KEY=OTHER_KEY)
    net.wait_nodes("d1")
    row = net.listing()["d1"]
    assert row["link"] == "dial" and row["address"] == mine
    resp = httpx.post(f"{net.op_url}/inference", json={"model": "llama3", "prompt": "over the link"}, timeout=10)
    job_id = resp.headers[p.JOB_HEADER]
    job = wait_for(lambda: (j := httpx.get(f"{net.op_url}/jobs/{job_id}").json())["operator_signature"] and j)
    assert job["receipt"]["message"]["node"] == mine and job["disputed"] is None  # receipts come up the link too
    unsigned = register(net, "u1")
    assert unsigned.status_code == 401 and "require_signed_nodes" in unsigned.json()["error"]
    assert json.loads(net.config.read_text())["node_addresses"] == {"d1": mine}
