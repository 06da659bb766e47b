"""An epoch: the Merkle root over the receipts an operator countersigned in it, signed by that
operator as EIP-712 typed data (as a settlement contract will check it).

    epoch = Epoch(operator=..., number=7, root="0x…", count=1200, started_ms=..., ended_ms=...)
    epoch.digest(); epoch.typed_data(); Epoch.from_message(message)
"""

from __future__ import annotations

from dataclasses import dataclass

from odla.proofs.typed import Struct, Typed

EPOCH = Struct("Epoch", (("operator", "address"), ("number", "uint64"), ("root", "bytes32"), ("count", "uint32"),
                         ("startedMs", "uint64"), ("endedMs", "uint64")))


@dataclass(frozen=True)
class Epoch(Typed):
    STRUCT = EPOCH
    operator: str
    number: int
    root: str
    count: int
    started_ms: int
    ended_ms: int

