"""Checking a job's proof (``GET /jobs/{id}/proof``), online or from a file: every signature and
the Merkle path, each part said to hold or not, and why.

    for part, problem in check(document): ...     # problem None: that part holds

A proof document::

    {"job_id", "receipt": <EIP-712 typed data>, "node_signature", "operator_signature", "disputed",
     "leaf_index", "proof": ["0x…", …], "epoch": <EIP-712 typed data>, "epoch_signature"}

The typed data are standard EIP-712: any tool that recovers a signer from them (eth-account's
``Account.recover_message(encode_typed_data(full_message=…), signature=…)``, a wallet) finds the
same addresses; the Merkle path is what OpenZeppelin's ``MerkleProof.verify`` checks.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

from odla.proofs.epochs import Epoch
from odla.proofs.identity import hex_signature, recover
from odla.proofs.merkle import leaf, verify
from odla.proofs.receipts import Receipt
from odla.proofs.typed import DOMAIN

MAX_PROOF_BYTES = 2048


def check(document: Any) -> list[tuple[str, Optional[str]]]:
    """Each part of the proof and what is wrong with it (None: it holds). A part that cannot be
    checked because an earlier one is unreadable says so."""
    results: list[tuple[str, Optional[str]]] = []

    def part(name: str, test: Callable[[], Optional[str]]) -> bool:
        try:
            problem = test()
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            problem = f"unreadable: {exc}"
        results.append((name, problem))
        return problem is None

    parsed: dict[str, Any] = {}

    def read() -> Optional[str]:
        if not isinstance(document, dict):
            return "a proof is a JSON object"
        for key in ("receipt", "epoch"):
            typed = document[key]
            if typed.get("domain") != DOMAIN:
                return f"{key}: not ODLA's EIP-712 domain {DOMAIN}"
        parsed["receipt"] = Receipt.from_message(document["receipt"]["message"])
        parsed["epoch"] = Epoch.from_message(document["epoch"]["message"])
        if document["receipt"] != parsed["receipt"].typed_data() or document["epoch"] != parsed["epoch"].typed_data():
            return "the typed data are not a receipt and an epoch as ODLA signs them"
        return None

    if not part("document", read):
        return results
    receipt, epoch = parsed["receipt"], parsed["epoch"]
    digest = receipt.digest()

    def signed_by(signature: str, who: str, what: bytes) -> Optional[str]:
        signer = recover(what, hex_signature(signature))
        return None if signer == who else f"signed by {signer}, not {who}"

    part("node signature", lambda: signed_by(document["node_signature"], receipt.node, digest))
    part("operator signature", lambda: signed_by(document["operator_signature"], receipt.operator, digest))
    part("epoch signature", lambda: signed_by(document["epoch_signature"], epoch.operator, epoch.digest()))
    part("same operator", lambda: None if epoch.operator == receipt.operator else
         f"the epoch is operator {epoch.operator}'s, the receipt operator {receipt.operator}'s")

    def path() -> Optional[str]:
        proof = [bytes.fromhex(h[2:]) if isinstance(h, str) and h.startswith("0x") and len(h) == 66 else None
                 for h in document["proof"]]
        if None in proof:
            return "each step is 0x and 64 hex digits"
        if len(proof) * 32 > MAX_PROOF_BYTES or len(proof) > max(0, math.ceil(math.log2(max(epoch.count, 1)))):
            return f"{len(proof)} steps: too many for an epoch of {epoch.count} receipts"
        if not verify(proof, bytes.fromhex(epoch.root[2:]), leaf(digest)):
            return "the path from the receipt does not reach the epoch's root"
        return None

    part("merkle path", path)
    return results
