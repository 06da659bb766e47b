"""ODLA proofs benchmark: what signing and checking receipts cost, and how epochs scale.

    make bench                (or: .venv/bin/python bench/proofs_bench.py [--smoke] [--out FILE])

- The operator's CPU per job for a node's receipt: its signature recovered, its facts checked
  against the job, the operator's countersignature (``Countersigner.check``, as on a report);
  target at most 300 us.
- A Merkle root over 1,000,000 receipts (target at most 10 s) and a proof's size (at most 2 KiB).
- ``client.py verify --file`` on a saved proof, a whole process (target under a second).

Prints a table and the verdict of each target; writes bench/results/proofs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from odla.core import protocol as p  # noqa: E402
from odla.operator.countersign import Countersigner  # noqa: E402
from odla.operator.registry import Node  # noqa: E402
from odla.proofs.epochs import Epoch  # noqa: E402
from odla.proofs.identity import Identity  # noqa: E402
from odla.proofs.merkle import Tree, leaf  # noqa: E402
from odla.proofs.receipts import Receipt, sha256_hex  # noqa: E402
from odla.serving.jobs import Job  # noqa: E402


class Store:
    """The receipts store's one call the countersigner makes (no database: its writes are batched
    off the event loop, and not what is measured here)."""

    def __init__(self) -> None:
        self.signed = 0

    def countersigned(self, job: Job) -> None:
        self.signed += 1


def countersign_cost(jobs: int) -> float:
    """Operator CPU microseconds per job to check and countersign a node's receipt."""
    node_key, operator = Identity(os.urandom(32)), Identity(os.urandom(32))
    signer = Countersigner(operator, Store())  # type: ignore[arg-type]
    node = Node("n1", "http://127.0.0.1:1", ["llama3:latest"], 0.0)
    node.address = node_key.address
    now = time.time()
    reports = []
    for i in range(jobs):
        job = Job(door="inference", model="llama3:latest", node="n1", node_address=node_key.address,
                  request_hash=sha256_hex(b"request %d" % i), output_hash=sha256_hex(b"output %d" % i),
                  delivered=100, outcome="ok", finished=now, started=now - 2)
        signer.awaiting[job.id] = job
        receipt = Receipt(job_id=job.id, operator=operator.address, node=node_key.address, model="llama3:latest",
                          model_digest="0x" + "ab" * 32, request_hash=job.request_hash, output_hash=job.output_hash,
                          prompt_tokens=20, output_tokens=100, started_ms=int((now - 1.9) * 1000),
                          ended_ms=int(now * 1000), outcome="ok")
        reports.append(p.SignedReceipt.model_construct(receipt=receipt.message(),
                                                       signature="0x" + node_key.sign(receipt.digest()).hex()))
    began = time.process_time()
    for i in range(0, jobs, 16):  # as reports bring them: a few at a time
        signer.check(node, reports[i:i + 16])
    took = time.process_time() - began
    assert signer.store.signed == jobs, "every receipt checks out"  # type: ignore[attr-defined]
    return took / jobs * 1e6


def merkle(leaves: int) -> tuple[float, int, int, str]:
    """Seconds to build the tree over ``leaves`` receipt digests, a proof's JSON size, its steps,
    and that proof as a file (for verify)."""
    digests = [os.urandom(32) for _ in range(leaves)]
    began = time.perf_counter()
    tree = Tree([leaf(d) for d in digests])
    took = time.perf_counter() - began
    path = tree.proof(leaves // 2)
    return took, len(json.dumps(["0x" + s.hex() for s in path])), len(path), "0x" + tree.root.hex()


def proof_file(folder: str) -> str:
    """A whole proof document (small epoch) saved to a file, as GET /jobs/{id}/proof gives it."""
    node_key, operator = Identity(os.urandom(32)), Identity(os.urandom(32))
    receipts = [Receipt(job_id=f"job{i}", operator=operator.address, node=node_key.address, model="llama3:latest",
                        model_digest="0x" + "ab" * 32, request_hash=sha256_hex(b"q%d" % i),
                        output_hash=sha256_hex(b"a%d" % i), prompt_tokens=1, output_tokens=6, started_ms=1,
                        ended_ms=2, outcome="ok") for i in range(1000)]
    tree = Tree([leaf(r.digest()) for r in receipts])
    epoch = Epoch(operator=operator.address, number=1, root="0x" + tree.root.hex(), count=len(receipts),
                  started_ms=0, ended_ms=3)
    one = receipts[500]
    document = {"job_id": one.job_id, "receipt": one.typed_data(), "node_signature": "0x" + node_key.sign(
        one.digest()).hex(), "operator_signature": "0x" + operator.sign(one.digest()).hex(), "disputed": None,
        "leaf_index": 500, "proof": ["0x" + s.hex() for s in tree.proof(500)], "epoch": epoch.typed_data(),
        "epoch_signature": "0x" + operator.sign(epoch.digest()).hex()}
    path = os.path.join(folder, "proof.json")
    Path(path).write_text(json.dumps(document))
    return path


def verify_time(path: str, runs: int) -> float:
    """Median wall seconds of ``client.py verify --file`` (a whole process: start, imports, checks)."""
    times = []
    for _ in range(runs):
        began = time.perf_counter()
        done = subprocess.run([sys.executable, "client.py", "verify", "--file", path], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        times.append(time.perf_counter() - began)
        assert done.returncode == 0, done.stdout + done.stderr
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: that it runs, not its figures")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "proofs.json"))
    args = parser.parse_args()
    jobs, leaves, runs = (200, 10_000, 1) if args.smoke else (5000, 1_000_000, 5)
    per_job = min(countersign_cost(jobs) for _ in range(1 if args.smoke else 3))
    root_s, proof_bytes, steps, _ = merkle(leaves)
    with tempfile.TemporaryDirectory() as folder:
        verify_s = verify_time(proof_file(folder), runs)
    targets = [
        ("receipt checked and countersigned", f"{per_job:.0f} us/job", per_job <= 300, "<= 300 us"),
        (f"Merkle root over {leaves:,} receipts", f"{root_s:.2f} s", root_s <= 10 or args.smoke, "<= 10 s"),
        (f"a proof ({steps} steps)", f"{proof_bytes} B", proof_bytes <= 2048, "<= 2 KiB"),
        ("client.py verify --file", f"{verify_s:.2f} s", verify_s < 1.0 or args.smoke, "< 1 s"),
    ]
    width = max(len(t[0]) for t in targets)
    for name, figure, met, target in targets:
        print(f"{name:<{width}}  {figure:>12}  target {target:<10} {'met' if met else 'NOT MET'}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"countersign_us_per_job": per_job, "merkle_leaves": leaves,
                                          "merkle_root_s": root_s, "proof_bytes": proof_bytes, "proof_steps": steps,
                                          "verify_file_s": verify_s,
                                          "targets_met": all(met for _, _, met, _ in targets)}, indent=2))


if __name__ == "__main__":
    main()
