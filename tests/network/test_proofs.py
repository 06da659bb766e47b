"""Proofs over real processes: a job's receipt, signed by its node and countersigned, sits in a
signed epoch; client.py verify checks it online and offline; a receipt altered in the operator's
SQLite fails; epochs and keys survive a restart (issue 26)."""

import json
import sqlite3
import subprocess
import sys
import time

import httpx

from odla.core import protocol as p
from tests.helpers import ROOT, wait_for


def verify(net, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "client.py", "verify", *args, "--operator", net.op_url], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_a_proof_verifies_online_and_offline_and_an_altered_receipt_does_not(net, tmp_path):
    sim = net.sim()
    operator = net.operator(epoch_seconds=1)
    net.node("n1", sim)
    net.wait_nodes("n1")
    ids = []
    for i in range(3):
        resp = httpx.post(f"{net.op_url}/inference", json={"model": "llama3", "prompt": f"proof {i}"}, timeout=10)
        ids.append(resp.headers[p.JOB_HEADER])
    early = httpx.get(f"{net.op_url}/jobs/{ids[0]}/proof")
    assert early.status_code in (200, 409)  # 409 until its receipt came and its epoch closed
    proof = wait_for(lambda: (r := httpx.get(f"{net.op_url}/jobs/{ids[0]}/proof")).status_code == 200 and r.json(),
                     timeout=15)
    assert len(json.dumps(proof["proof"])) <= 2048
    done = verify(net, ids[0])
    assert done.returncode == 0, done.stdout + done.stderr
    assert "ok     merkle path" in done.stdout and f"job {ids[0]}" in done.stdout
    saved = tmp_path / "proof.json"
    saved.write_text(json.dumps(proof))
    began = time.monotonic()
    offline = subprocess.run([sys.executable, "client.py", "verify", "--file", str(saved)], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    print(f"verify --file took {time.monotonic() - began:.2f} s")

    epochs = httpx.get(f"{net.op_url}/epochs").json()["epochs"]
    assert epochs and epochs[-1]["number"] == 1 and epochs[0]["operator"] == proof["epoch"]["message"]["operator"]
    assert httpx.get(f"{net.op_url}/epochs/{epochs[0]['number']}").json() == epochs[0]
    assert httpx.get(f"{net.op_url}/epochs/999").status_code == 404

    # a receipt altered in the database: its signatures no longer hold
    db = sqlite3.connect(next(tmp_path.glob("jobs-*.db")))
    with db:
        message = json.loads(db.execute("SELECT receipt FROM jobs WHERE id = ?", (ids[1],)).fetchone()[0])
        message["outputTokens"] += 100
        db.execute("UPDATE jobs SET receipt = ? WHERE id = ?", (json.dumps(message), ids[1]))
    db.close()
    wait_for(lambda: httpx.get(f"{net.op_url}/jobs/{ids[1]}/proof").status_code == 200, timeout=15)
    altered = verify(net, ids[1])
    assert altered.returncode == 1
    assert "FAILED node signature" in altered.stdout and "FAILED merkle path" in altered.stdout
    assert "the proof does not hold" in altered.stderr

    # a restart keeps the epochs, the operator's key and the proofs
    operator.stop()
    net.operator(epoch_seconds=1)
    again = verify(net, ids[0])
    assert again.returncode == 0, again.stdout + again.stderr
    assert httpx.get(f"{net.op_url}/epochs").json()["epochs"][-1] == epochs[-1]

    assert verify(net).returncode == 2  # neither a job nor a file
    assert httpx.get(f"{net.op_url}/jobs/nope/proof").status_code == 404
