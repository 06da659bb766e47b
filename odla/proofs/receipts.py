"""A job's receipt as its node and its operator sign it: EIP-712 typed data.

    receipt = Receipt(job_id=..., operator=..., node=..., model=..., ...)
    digest = receipt.digest()           # what both sign (keccak-256, EIP-712)
    receipt.typed_data()                # the whole typed message, as eth-account and wallets take it
    Receipt.from_message(typed["message"])

Hashed by ``odla.proofs.typed`` (the same words ``eth_account.messages.encode_typed_data`` makes,
which tests/proofs checks on random receipts), because the library's encoding costs about 0.6 ms
a receipt and the operator checks one per job. ``request_hash`` and ``output_hash`` are
SHA-256 of the exact bytes the operator sent the node and the node sent back: both ends hash what
crossed the wire, whatever it was (ODLA's JSON lines, or Ollama's own answer on a door).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional

from odla.proofs.typed import ZERO, Struct, Typed

FIELDS = (("jobId", "string"), ("operator", "address"), ("node", "address"), ("model", "string"),
          ("modelDigest", "bytes32"), ("requestHash", "bytes32"), ("outputHash", "bytes32"),
          ("promptTokens", "uint32"), ("outputTokens", "uint32"), ("startedMs", "uint64"), ("endedMs", "uint64"),
          ("outcome", "string"))
RECEIPT = Struct("Receipt", FIELDS)
UINT32 = 2 ** 32 - 1
OUTCOMES = ("ok", "error", "cancelled")
"How the job ended at the node: its answer complete, an error in its last line, or cut short."


def sha256_hex(data: bytes) -> str:
    return "0x" + hashlib.sha256(data).hexdigest()


def digest_hex(ollama_digest: Optional[str]) -> str:
    """Ollama's model digest (``sha256:…`` or 64 hex digits) as bytes32 hex; zero when unknown."""
    text = (ollama_digest or "").removeprefix("sha256:")
    return "0x" + text.lower() if len(text) == 64 and all(c in "0123456789abcdefABCDEF" for c in text) else ZERO


@dataclass(frozen=True)
class Receipt(Typed):
    STRUCT = RECEIPT
    job_id: str
    operator: str
    node: str
    model: str
    model_digest: str
    request_hash: str
    output_hash: str
    prompt_tokens: int
    output_tokens: int
    started_ms: int
    ended_ms: int
    outcome: str

    def __post_init__(self) -> None:
        super().__post_init__()  # each field against its type
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome is one of {', '.join(OUTCOMES)}")
